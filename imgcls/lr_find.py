"""The learning-rate range test (Smith 2017; fastai's and Lightning's lr finder): train a fresh
model from the config for a few hundred steps at most while the lr grows exponentially, and
read off where the loss falls fastest.

    python -m imgcls.lr_find                                   # the default config -> lr_find.png
    python -m imgcls.lr_find experiment=smoke --out smoke_lr.png
    python -m imgcls.lr_find model=resnet18 optimizer=adamw --steps 200 --end-lr 1

The config is composed with the same overrides as ``train.py``, validated the same way, and
the data, model and optimizer are built as ``train.py`` builds them (imgcls/build.py); each
step is ``train.py``'s step (imgcls/step.py: precision, accumulation, clipping) with the
optimizer's lr set to ``start * (end / start) ** (i / (steps - 1))`` instead of the scheduler's
(param groups keep their ratios to the first). It stops at divergence: a running average of
the loss (beta 0.9, bias-corrected) above 4x its lowest, or a NaN/inf loss.

Suggested: fastai's "valley" on the loss smoothed by a centred moving average (no lag): the
lr two thirds of the way down the longest fall of the loss, printed as the schedule's peak lr
and as the ``optimizer.lr`` that gives that peak with the chosen scheduler (a schedule whose
peak is ``optimizer.lr`` gets the same number). Nothing of a run is written or read: no run
directory, no checkpoint; only the ``--out`` PNG. A bad config or option is one ``error:`` line
and exit code 2, as in train.py.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from imgcls import build, distributed
from imgcls.config import compose_config, validate_config
from imgcls.device import pick_device
from imgcls.exits import EXIT_BAD_INPUT, interrupted
from imgcls.io import write_text_atomic
from imgcls.loss import training_loss
from imgcls.precision import make_scaler, resolve_precision
from imgcls.preview import OneLineParser, preview
from imgcls.step import StepSettings, train_step

BETA = 0.9  # the running average that decides when to stop (bias-corrected)
DIVERGED = 4.0  # stop when it exceeds its lowest by this factor


@dataclass
class RangeTest:
    lrs: list[float]  # the lr of each step taken
    losses: list[float]  # the raw training loss of each step
    diverged: bool  # stopped before the last step

    @property
    def smoothed(self) -> list[float]:
        """A centred moving average of the losses (2k+1 steps, k = steps/50, at least 2): no lag,
        so the curve is not shifted to higher lrs, as a running average's would be."""
        k, n = max(2, len(self.losses) // 50), len(self.losses)
        return [
            sum(self.losses[max(0, i - k) : i + k + 1]) / len(self.losses[max(0, i - k) : i + k + 1]) for i in range(n)
        ]

    @property
    def suggested(self) -> int:
        """fastai's "valley": the longest run of falling smoothed loss (a longest decreasing
        subsequence), and the step two thirds of the way down it.

        >>> RangeTest([1, 2, 4, 8, 16, 32, 64], [5, 5, 4, 3, 2, 1, 9], False).suggested  # a short test: raw
        1
        """
        loss = self.smoothed if len(self.losses) >= 13 else self.losses
        n = len(loss)
        depth, start, end = [1] * n, 0, 0
        for i in range(1, n):
            for j in range(i):
                if loss[i] < loss[j] and depth[i] < depth[j] + 1:
                    depth[i] = depth[j] + 1
            if depth[end] < depth[i]:
                end, start = i, i - depth[i]
        third = (end - start) / 3
        return min(max(start + int(third) + int(third / 2), 0), n - 1)


def lr_at(step: int, steps: int, start: float, end: float) -> float:
    """The exponential sweep: ``start`` at step 0, ``end`` at step ``steps - 1``.

    >>> [round(lr_at(i, 3, 1e-4, 1.0), 6) for i in range(3)]
    [0.0001, 0.01, 1.0]
    """
    return start * (end / start) ** (step / max(steps - 1, 1))


def range_test(cfg, steps: int, start: float, end: float) -> RangeTest:
    """Build data, model and optimizer from ``cfg`` as train.py does and sweep the lr."""
    device = pick_device(cfg.trainer.device)
    t = cfg.trainer
    build.seed_everything(t.seed, t.deterministic, device)
    data = build.load_data(cfg, device, distributed.Dist())
    model = build.build_model(cfg, data.num_classes, device, data.info["size"])
    optimizer = build.build_optimizer(cfg, model, device)
    ratios = [g["lr"] / optimizer.param_groups[0]["lr"] for g in optimizer.param_groups]
    precision = resolve_precision(t.precision, device)
    settings = StepSettings(
        precision, make_scaler(device, precision), t.grad_clip_norm, False, t.accumulate_grad_batches
    )
    loss_fn, model = training_loss(t), model.train()
    result, average, lowest, epoch = RangeTest([], [], False), 0.0, math.inf, 0
    batches = data.train.epoch_batches(epoch)
    for i in range(steps):
        lr = lr_at(i, steps, start, end)
        for group, ratio in zip(optimizer.param_groups, ratios):
            group["lr"] = lr * ratio
        try:
            x, y = next(batches)
        except StopIteration:  # the data is shorter than the sweep: the next epoch's batches
            epoch += 1
            batches = data.train.epoch_batches(epoch)
            x, y = next(batches)
        loss = float(train_step(model, optimizer, loss_fn, x, y, settings))  # a host sync per step: a tool
        if not math.isfinite(loss):
            result.diverged = True
            break
        result.lrs.append(lr), result.losses.append(loss)
        average = BETA * average + (1 - BETA) * loss
        running = average / (1 - BETA ** (i + 1))
        lowest = min(lowest, running)
        if running > DIVERGED * lowest:
            result.diverged = i < steps - 1
            break
    return result


def schedule_peak_factor(overrides: list[str], steps_per_epoch: int, lr: float) -> float:
    """The chosen schedule's peak lr as a multiple of ``optimizer.lr`` (imgcls.preview steps it)."""
    return preview(overrides, steps_per_epoch).peak / lr


def plot_png(r: RangeTest, suggested: int, title: str) -> bytes:
    """Loss against lr (log scale), the suggestion marked, as PNG bytes (imgcls/plot.py's way)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    finite = r.smoothed
    fig = Figure(figsize=(7.0, 4.0), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.plot(r.lrs, r.losses, color="0.7", lw=1.0, label="loss")
    ax.plot(r.lrs, r.smoothed, color="C0", lw=2.0, label="smoothed (centred average)")
    ax.axvline(r.lrs[suggested], color="C3", ls="--", label=f"suggested peak lr {r.lrs[suggested]:.3g}")
    ax.set_xscale("log")
    ax.set_ylim(min(finite) * 0.9, min(max(finite), DIVERGED * min(finite)) * 1.05)
    ax.set(xlabel="learning rate", ylabel="training loss", title=title)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m imgcls.lr_find",
        description="The lr range test: a fresh model from the config trained while the lr grows "
        "exponentially; writes a plot and prints a suggested peak lr. Takes train.py's overrides.",
        epilog="example: python -m imgcls.lr_find experiment=smoke --out lr_find.png",
    )
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, as for train.py")
    p.add_argument("--steps", type=int, default=100, metavar="N", help="steps at most (default 100)")
    p.add_argument("--start-lr", type=float, default=1e-6, metavar="LR", help="the first step's lr (default 1e-6)")
    p.add_argument("--end-lr", type=float, default=10.0, metavar="LR", help="the last step's lr (default 10)")
    p.add_argument("--out", type=Path, default=Path("lr_find.png"), metavar="PATH.png", help="default lr_find.png")
    args = p.parse_intermixed_args(argv)
    if args.steps < 20:
        p.error(f"--steps: {args.steps} is not accepted; expected an int >= 20")
    if not (0 < args.start_lr < args.end_lr < math.inf):
        p.error(f"--start-lr {args.start_lr} --end-lr {args.end_lr} is not accepted; expected 0 < start < end")
    if args.out.suffix.lower() != ".png":
        p.error(f"--out: {str(args.out)!r} is not accepted; expected a path ending in .png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg, choices = compose_config(args.overrides)
        validate_config(cfg)
        r = range_test(cfg, args.steps, args.start_lr, args.end_lr)
        if len(r.lrs) < 13:
            raise ValueError(f"the loss diverged at once (lr {r.lrs[-1]:.3g}); expected a lower --start-lr")
        factor = schedule_peak_factor(args.overrides, cfg.schedule.steps_per_epoch, cfg.optimizer.lr)
    except ValueError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return interrupted("lr_find")
    best = r.suggested
    peak = r.lrs[best]
    how = f"diverged at step {len(r.lrs) - 1}, lr {r.lrs[-1]:.3g}" if r.diverged else "no divergence"
    print(f"lr range test: {len(r.lrs)} steps, lr {r.lrs[0]:.3g} -> {r.lrs[-1]:.3g} ({how})")
    low = min(range(len(r.lrs)), key=r.smoothed.__getitem__)
    print(f"lowest smoothed loss {r.smoothed[low]:.4f} at lr {r.lrs[low]:.3g}")
    print(f"suggested peak lr {peak:.3g} (step {best}: two thirds down the longest fall of the loss)")
    scheduler = choices.get("scheduler", "?")
    print(f"suggested for scheduler={scheduler} (peak = {factor:.3g} x optimizer.lr): optimizer.lr={peak / factor:.3g}")
    png = plot_png(r, best, f"lr range test: {' '.join(args.overrides) or 'the default config'}")
    write_text_atomic(args.out, png, "the lr finder's plot")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
