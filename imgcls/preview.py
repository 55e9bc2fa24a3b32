"""Preview the learning-rate schedule of a config: no training, no data loading.

    python -m imgcls.preview                                     # the default config -> schedule.png
    python -m imgcls.preview scheduler=warmup_cosine trainer.epochs=30 optimizer.lr=0.1
    python -m imgcls.preview experiment=smoke --out smoke.png    # any override train.py takes
    python -m imgcls.preview data=image_folder --steps-per-epoch 40 --no-plot

The config is composed from conf/ with the same overrides as ``train.py``, checked by the same
start-up validation, and ``schedule.steps_per_epoch`` is filled in as ``train.py`` fills it;
the optimizer (on one dummy parameter) and the scheduler are built from it and stepped as
``train.py`` steps them: after every optimizer step when ``schedule.interval`` is ``step``,
after every epoch otherwise. The learning rate at step N is the one optimizer step N (from 0)
uses; step ``epochs x steps_per_epoch`` is the lr the run ends with (the last ``lr`` of
metrics.jsonl).

Steps per epoch: ``--steps-per-epoch N`` stands for the batches the data would give;
otherwise they come from the data config, without reading images (the ``DataSource`` that
``data.dataset`` builds counts them: cifar10/cifar100 50,000 training images, synthetic
``data.dataset.train_size``, image_folder the files under ``train/<class>/`` of its folder or
archive), less the validation split, divided by ``trainer.batch_size`` (the last partial
batch is dropped). Either way
``trainer.limit_train_batches`` caps them, as in ``train.py``.

A ReduceLROnPlateau phase is fed a synthetic test loss that stops improving at 30% of the
run: a real run's learning rates depend on the measured loss.

Prints a table (step, epoch, lr) on stdout and writes a PNG (matplotlib, imported only to
draw: ``pip install -e '.[plots]'``). A bad config ends with one ``error: ...`` line on
stderr and exit code 2, as in ``train.py`` (``HYDRA_FULL_ERROR=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, open_dict

from imgcls.config import compose_config, validate_config
from imgcls.exits import EXIT_BAD_INPUT, config_errors, one_line
from imgcls.schedule import SchedulerStepper, check_schedule_fits, steps_per_epoch

TABLE_ROWS = 10  # evenly spaced table rows (plus the first, the milestones and the end)
PLATEAU_AT = 0.3  # the synthetic test loss stops improving at this fraction of the run
EXIT_NO_MATPLOTLIB = 1  # the PNG was asked for but matplotlib is not installed


class PreviewError(ValueError):
    """A refused input: printed as one ``error:`` line, exit code 2."""


# --------------------------------------------------------------------------------------
# config
# --------------------------------------------------------------------------------------
def check_config(cfg: DictConfig) -> None:
    """train.py's start-up validation (the device and the run directory are not checked:
    a cuda preset previews on a CPU)."""
    probe = copy.deepcopy(cfg)
    with open_dict(probe):
        probe.resume = "never"
    validate_config(probe)


# --------------------------------------------------------------------------------------
# the schedule, stepped as train.py steps it
# --------------------------------------------------------------------------------------
@dataclass
class Schedule:
    option: str  # the scheduler option (conf/scheduler/<option>.yaml)
    epochs: int
    steps_per_epoch: int
    source: str  # where steps_per_epoch came from
    interval: str  # "step" or "epoch"
    lrs: list[list[float]]  # [step][param group], steps 0 .. total (total: after the run)
    milestones: list[int] = field(default_factory=list)  # top-level phase starts, in steps
    nested_milestones: list[int] = field(default_factory=list)  # phase starts of nested phases
    plateau_epoch: int | None = None  # the synthetic loss stops improving here (ReduceLROnPlateau)
    experiment: str | None = None

    @property
    def total(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def peak(self) -> float:
        return max(max(row) for row in self.lrs)

    @property
    def peak_step(self) -> int:
        return next(s for s, row in enumerate(self.lrs) if max(row) == self.peak)


def synthetic_test_loss(epochs_done: int, plateau_epoch: int) -> float:
    """Falls linearly from 2.0 to 1.0 until ``plateau_epoch``, then stays at 1.0."""
    return 1.0 + max(0, plateau_epoch - epochs_done) / max(1, plateau_epoch)


def simulate(cfg: DictConfig) -> tuple[list[list[float]], object, int | None]:
    """Build the optimizer (on one dummy parameter) and the scheduler from ``cfg`` and step
    them as train.py does. Returns the lr per step (0 .. total), the scheduler and, where a
    ReduceLROnPlateau is fed the synthetic loss, the epoch at which that loss plateaus."""
    import torch

    with config_errors("optimizer"):
        optimizer = _instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    with config_errors("scheduler"):
        scheduler = _instantiate(cfg.scheduler)(optimizer)
    check_schedule_fits(scheduler, cfg)  # as train.py: a milestone past the end is refused
    epochs, spe = cfg.trainer.epochs, cfg.schedule.steps_per_epoch
    stepper = SchedulerStepper(scheduler, optimizer, cfg.schedule.interval)  # as train.py steps it
    plateau_epoch = max(1, round(PLATEAU_AT * epochs)) if stepper.wants_metric else None

    lrs = [stepper.lrs()]  # the lr step 0 uses
    with config_errors("scheduler"):
        for epoch in range(epochs):
            for i in range(spe):
                optimizer.step()  # no gradients: nothing changes, but torch sees the order
                stepper.after_step()
                if i + 1 < spe:
                    lrs.append(stepper.lrs())
            loss = synthetic_test_loss(epoch + 1, plateau_epoch) if plateau_epoch is not None else None
            stepper.after_epoch(loss)
            lrs.append(stepper.lrs())  # after the epoch's last step (and the end of the run)
    return lrs, scheduler, plateau_epoch


def _instantiate(node):
    import hydra.utils

    return hydra.utils.instantiate(node, _convert_="all")


def phase_starts(scheduler, offset: int = 0, end: float = float("inf"), depth: int = 0) -> list[tuple[int, int]]:
    """(start, depth) of every phase but the first of each SequentialLR in the tree, in the
    schedule's units (steps or epochs); depth 0 is the top level. A nested milestone counts
    from its phase's start; one its phase never reaches is left out."""
    milestones = getattr(scheduler, "_milestones", None)
    children = getattr(scheduler, "_schedulers", None)
    if milestones is None or children is None:
        return []
    starts = [0, *milestones]
    out = []
    for i, child in enumerate(children):
        start = offset + starts[i]
        stop = min(end, offset + milestones[i]) if i < len(milestones) else end
        if start >= end:
            break
        if i > 0:
            out.append((start, depth))
        out += phase_starts(child, start, stop, depth + 1)
    return out


def preview(overrides: list[str], steps_per_epoch_arg: int | None = None) -> Schedule:
    """Compose, check and step the schedule of ``overrides`` (PreviewError if refused)."""
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg, choices = compose_config(overrides)  # a ConfigError is one line already
        check_config(cfg)
        spe, source = steps_per_epoch(cfg, steps_per_epoch_arg)
        with open_dict(cfg):
            cfg.schedule.steps_per_epoch = spe  # as train.py fills it from the data
        lrs, scheduler, plateau_epoch = simulate(cfg)
    except PreviewError:
        raise
    except (ValueError, FileNotFoundError, OmegaConfBaseException) as e:
        raise PreviewError(one_line(e)) from e
    unit = spe if cfg.schedule.interval == "epoch" else 1
    total = cfg.trainer.epochs * spe
    starts = [(s * unit, d) for s, d in phase_starts(scheduler) if 0 <= s * unit <= total]
    return Schedule(
        option=choices.get("scheduler") or "?",
        epochs=cfg.trainer.epochs,
        steps_per_epoch=spe,
        source=source,
        interval=cfg.schedule.interval,
        lrs=lrs,
        milestones=sorted({s for s, d in starts if d == 0}),
        nested_milestones=sorted({s for s, d in starts if d > 0} - {s for s, d in starts if d == 0}),
        plateau_epoch=plateau_epoch,
        experiment=choices.get("experiment"),
    )


# --------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------
def describe(s: Schedule) -> str:
    exp = f" (experiment={s.experiment})" if s.experiment else ""
    return (
        f"scheduler={s.option}{exp}: {s.epochs} epochs x {s.steps_per_epoch} steps/epoch "
        f"({s.source}) = {s.total} optimizer steps; stepped per {s.interval}"
    )


def plateau_note(s: Schedule) -> str | None:
    if s.plateau_epoch is None:
        return None
    return (
        f"ReduceLROnPlateau is fed a synthetic test loss that stops improving after epoch "
        f"{s.plateau_epoch}: a real run's lr depends on the measured test loss"
    )


def table_steps(s: Schedule, every: int | None = None) -> list[int]:
    if every:
        regular = set(range(0, s.total + 1, every))
    elif s.interval == "epoch":  # the lr changes at epoch boundaries: list those
        regular = {round(i * s.epochs / TABLE_ROWS) * s.steps_per_epoch for i in range(TABLE_ROWS + 1)}
    else:
        regular = {round(i * s.total / TABLE_ROWS) for i in range(TABLE_ROWS + 1)}
    return sorted(regular | {0, s.total} | set(s.milestones) | set(s.nested_milestones))


def format_table(s: Schedule, every: int | None = None) -> str:
    groups = len(s.lrs[0])
    heads = ["lr"] if groups == 1 else [f"lr[{g}]" for g in range(groups)]
    lines = [f"{'step':>7}  {'epoch':>7}  " + "  ".join(f"{h:>12}" for h in heads)]
    for step in table_steps(s, every):
        note = (
            "end of run (the lr after the last step)"
            if step == s.total
            else "milestone"
            if step in s.milestones
            else "milestone (nested)"
            if step in s.nested_milestones
            else ""
        )
        lrs = "  ".join(f"{lr:>12.6g}" for lr in s.lrs[step])
        lines.append(f"{step:>7}  {step / s.steps_per_epoch:>7.2f}  {lrs}  {note}".rstrip())
    return "\n".join(lines)


def plot(s: Schedule, out: Path) -> None:
    """Write the lr per step as a PNG (matplotlib's Agg canvas; pyplot is not touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(7.0, 3.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    steps = range(s.total + 1)
    groups = len(s.lrs[0])
    for g in range(groups):
        ax.plot(
            steps,
            [row[g] for row in s.lrs],
            drawstyle="steps-post",
            lw=1.6,
            label=f"param group {g}" if groups > 1 else "lr",
        )
    for i, m in enumerate(s.milestones):
        ax.axvline(m, ls=":", lw=1.2, color="0.25", label="milestone" if i == 0 else None)
    for i, m in enumerate(s.nested_milestones):
        ax.axvline(m, ls=":", lw=1.0, color="0.6", label="nested milestone" if i == 0 else None)
    ax.set_xlim(0, s.total)
    ax.set_ylim(0, (s.peak or 1.0) * 1.08)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.25)
    spe = s.steps_per_epoch
    top = ax.secondary_xaxis("top", functions=(lambda x: x / spe, lambda e: e * spe))
    top.set_xlabel("epoch", fontsize=8)
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    top.tick_params(labelsize=8)
    ax.tick_params(labelsize=8)
    if s.milestones or s.nested_milestones or groups > 1:
        ax.legend(fontsize=8, loc="upper right")
    exp = f", experiment={s.experiment}" if s.experiment else ""
    title = (
        f"scheduler={s.option}{exp}: {s.epochs} epochs x {spe} steps/epoch, "
        f"peak lr {s.peak:.4g}, stepped per {s.interval}"
    )
    if s.plateau_epoch is not None:
        title += (
            f"\nReduceLROnPlateau fed a SYNTHETIC test loss, flat after epoch {s.plateau_epoch}:"
            f"\na real run's lr depends on its measured test loss"
        )
    ax.set_title(title, fontsize=9)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png", metadata={"Software": None})


# --------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------
class OneLineParser(argparse.ArgumentParser):
    """argparse whose refusals are one ``error:`` line and exit code 2, like train.py's (the
    preview's and the lr finder's)."""

    def error(self, message):
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr, flush=True)
        sys.exit(EXIT_BAD_INPUT)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not accepted; expected an int >= 1")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(
        prog="python -m imgcls.preview",
        description="Draw the learning rate per step of the configured schedule (no training, no data "
        "loading). Takes the same Hydra overrides as train.py.",
        epilog="example: python -m imgcls.preview scheduler=warmup_cosine trainer.epochs=30 optimizer.lr=0.1",
    )
    p.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="Hydra overrides, as for train.py")
    p.add_argument(
        "--steps-per-epoch",
        type=_positive_int,
        metavar="N",
        help="batches per epoch instead of counting them from the data config "
        "(trainer.limit_train_batches still caps them)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("schedule.png"),
        metavar="PATH.png",
        help="where to write the plot (default: schedule.png)",
    )
    p.add_argument("--no-plot", action="store_true", help="print the table only (no matplotlib needed)")
    p.add_argument(
        "--every",
        type=_positive_int,
        metavar="K",
        help=f"a table row every K steps (default: {TABLE_ROWS} evenly spaced); the first "
        f"step, the milestones and the end are always listed",
    )
    args = p.parse_intermixed_args(argv)  # overrides may stand between the options
    if not args.no_plot and args.out.suffix.lower() != ".png":
        p.error(f"--out: {str(args.out)!r} is not accepted; expected a path ending in .png")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        print(
            "error: --out needs matplotlib, which is not installed: pip install -e '.[plots]' "
            "(or pass --no-plot for the table only)",
            file=sys.stderr,
            flush=True,
        )
        return EXIT_NO_MATPLOTLIB
    try:
        s = preview(args.overrides, args.steps_per_epoch)
    except PreviewError as e:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_BAD_INPUT
    if not args.no_plot:  # first: a reader that closes stdout early (| head) still gets it
        try:
            plot(s, args.out)
        except OSError as e:
            print(f"error: --out: cannot write {args.out}: {e.strerror or e}", file=sys.stderr, flush=True)
            return EXIT_BAD_INPUT
    print(describe(s))
    print(f"peak lr {s.peak:.6g} at step {s.peak_step}")
    if note := plateau_note(s):
        print(f"note: {note}")
    print(format_table(s, args.every))
    if not args.no_plot:
        print(f"wrote {args.out}")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except BrokenPipeError:  # stdout closed early (| head): quietly, as other filters do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    sys.exit(code)
