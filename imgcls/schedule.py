"""The schedule's lengths and stepping: how long a run is, when the scheduler steps, and
whether a built schedule fits the run.

Schedule lengths are written in epochs or as fractions of the run, never as step counts
(OmegaConf resolvers, registered by ``imgcls.config.register_resolvers``):

* ``${epochs:N}``          N epochs, in the schedule's units
* ``${run_fraction:F}``    the first fraction F of the run, in the schedule's units
* ``${run_remainder:F}``   what is left of the run after ``${run_fraction:F}``
* ``${mul:A,B}``           A x B (e.g. a minimum lr as a fraction of the peak)

The schedule's unit is one optimizer step when ``schedule.interval`` is ``step`` and one
epoch when it is ``epoch``. ``train.py`` fills ``schedule.steps_per_epoch`` from the data
(``fill_steps_per_epoch``, the one way it is counted) before it builds the scheduler, so
``trainer.epochs=30`` stretches every schedule.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf, open_dict

from imgcls.exits import one_line
from imgcls.schema import INTERVALS


def schedule_units_per_epoch(root: DictConfig) -> int:
    interval = root.schedule.interval
    if interval not in INTERVALS:
        raise ValueError(f"schedule.interval: {interval!r} is not one of {list(INTERVALS)}")
    return int(root.schedule.steps_per_epoch) if interval == "step" else 1


def schedule_total_units(root: DictConfig) -> int:
    return int(root.trainer.epochs) * schedule_units_per_epoch(root)


def _epochs(n, *, _root_: DictConfig) -> int:
    return round(float(n) * schedule_units_per_epoch(_root_))


def _run_fraction(f, *, _root_: DictConfig) -> int:
    f = float(f)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"${{run_fraction:{f}}}: the fraction must be in [0, 1]")
    return round(f * schedule_total_units(_root_))


def _run_remainder(f, *, _root_: DictConfig) -> int:
    return schedule_total_units(_root_) - _run_fraction(f, _root_=_root_)


def _mul(a, b) -> float:
    return float(a) * float(b)


# --------------------------------------------------------------------------------------
# When the scheduler steps: the ONE place (train.py, the preview and the conf tests call it)
# --------------------------------------------------------------------------------------
class SchedulerStepper:
    """Steps ``scheduler`` after every optimizer step (``schedule.interval: step``) or after
    every epoch (``epoch``); an epoch-end step gets the latest test loss when a
    ReduceLROnPlateau phase needs it. ``lrs()`` is what ``metrics.jsonl`` logs as ``lr`` at
    step N: the lr in effect after N optimizer steps and the scheduler steps due by then (the
    lr step N+1 uses; at the end of the run, the lr the run ends with), whatever the interval."""

    def __init__(self, scheduler, optimizer, interval: str):
        from sched import needs_metrics

        if interval not in INTERVALS:
            raise ValueError(f"schedule.interval: {interval!r} is not one of {list(INTERVALS)}")
        self.scheduler, self.optimizer = scheduler, optimizer
        self.per_step = interval == "step"
        self.wants_metric = needs_metrics(scheduler)

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self, test_loss: float | None) -> None:
        if self.per_step:
            return
        if self.wants_metric and test_loss is not None:
            self.scheduler.step(test_loss)
        else:
            self.scheduler.step()

    def lrs(self) -> list[float]:
        return [float(g["lr"]) for g in self.optimizer.param_groups]


# --------------------------------------------------------------------------------------
# Does the schedule fit the run? (after its lengths are resolved; train.py and the preview)
# --------------------------------------------------------------------------------------
_LENGTHS = {"LinearLR": "total_iters", "PolynomialLR": "total_iters", "CosineAnnealingLR": "T_max"}


def schedule_misfits(scheduler, cfg: DictConfig) -> list[str]:
    """What of the built ``scheduler`` the run never reaches: a milestone at or past the end of
    the run (or of its enclosing phase), so the phase after it never runs, or a phase with a
    target (LinearLR/PolynomialLR ``total_iters``, CosineAnnealingLR ``T_max``) that cannot
    complete before the end. Each in the schedule's units, steps and epochs."""
    spe = int(cfg.schedule.steps_per_epoch)
    per_step = cfg.schedule.interval == "step"
    total = schedule_total_units(cfg)

    def at(units: int) -> str:
        steps = units if per_step else units * spe
        return f"step {steps} (epoch {steps / spe:g})"

    found = []

    def walk(s, offset: int, end: int, path: str) -> None:
        where = "the run" if end == total else "its phase"
        milestones, children = getattr(s, "_milestones", None), getattr(s, "_schedulers", None)
        if milestones is not None and children is not None:  # a SequentialLR
            for i, m in enumerate(milestones):
                if offset + m >= end:
                    found.append(
                        f"{path}milestones[{i}] = {m} starts {path}schedulers[{i + 1}] at {at(offset + m)}, not "
                        f"before the end of {where} at {at(end)}: that phase never runs"
                    )
                    break
            starts = [0, *milestones]
            for i, child in enumerate(children):
                start = offset + starts[i]
                if start >= end:
                    break
                stop = min(end, offset + milestones[i]) if i < len(milestones) else end
                walk(child, start, stop, f"{path}schedulers[{i}].")
            return
        name = type(s).__name__
        if name == "MultiStepLR":
            for m in sorted(s.milestones):
                if offset + m >= end:
                    found.append(
                        f"{path}milestones: {m} is at {at(offset + m)}, not before the end of "
                        f"{where} at {at(end)}: that decay never happens"
                    )
        key = _LENGTHS.get(name)
        if key is not None and offset + int(getattr(s, key)) > end:
            n = int(getattr(s, key))
            found.append(
                f"{path}{key} = {n}: the {name} phase from {at(offset)} needs until "
                f"{at(offset + n)}, but {where} ends at {at(end)}: it never completes"
            )

    walk(scheduler, 0, total, "scheduler.")
    return found


def check_schedule_fits(scheduler, cfg: DictConfig) -> None:
    """Refuse a schedule that does not fit the run (schedule.allow_truncated=true: a warning)."""
    misfits = schedule_misfits(scheduler, cfg)
    if not misfits:
        return
    spe = cfg.schedule.steps_per_epoch
    message = (
        f"{misfits[0]} (the run: {cfg.trainer.epochs} epochs x {spe} steps = "
        f"{cfg.trainer.epochs * spe} steps); shorten the schedule, raise trainer.epochs, "
        f"or set schedule.allow_truncated=true to run it cut short"
    )
    if not cfg.schedule.allow_truncated:
        raise ValueError(message)
    print(
        f"warning: {message.split('; shorten')[0]}; running it cut short (schedule.allow_truncated=true)",
        file=sys.stderr,
        flush=True,
    )


# --------------------------------------------------------------------------------------
# Steps per epoch: counted ONE way (train.py, the preview and the conf tests), without reading images
# --------------------------------------------------------------------------------------
def batches_per_epoch(n: int, batch_size: int, limit: int | None = None) -> int:
    """Optimizer steps in an epoch of ``n`` training images: full batches only (the last, short
    one is dropped), at most ``limit`` (trainer.limit_train_batches). The one count and the one
    batch-vs-data check: train.py (the real images) and the preview (counted) both call it.

    >>> batches_per_epoch(45_000, 512), batches_per_epoch(45_000, 512, limit=20)
    (87, 20)
    """
    if batch_size > n:
        raise ValueError(f"trainer.batch_size: {batch_size} is larger than the {n} training images; use at most {n}")
    return min(n // batch_size, limit) if limit else n // batch_size


def steps_per_epoch(cfg: DictConfig, given: int | None = None) -> tuple[int, str]:
    """``schedule.steps_per_epoch`` as train.py would fill it, and where it came from."""
    t = cfg.trainer
    limit = t.limit_train_batches
    if given is not None:
        full, source = given, f"--steps-per-epoch {given}"
        steps = min(given, limit) if limit else given
    else:
        n, what = train_set_size(cfg)
        full, source = batches_per_epoch(n, t.batch_size), f"{what} // batch {t.batch_size}"
        steps = batches_per_epoch(n, t.batch_size, limit)
        source += f" = {full}" if steps < full else ""
    if steps < full:
        return steps, f"{source}, capped by trainer.limit_train_batches={limit}"
    return steps, source


def train_set_size(cfg: DictConfig) -> tuple[int, str]:
    """The number of training images the data config names, counted by its DataSource without
    reading them (a source that cannot count is loaded), less the validation split
    (data.val_size) that train.py holds out of them."""
    from imgcls.data import dataset_source  # torch: imported here, not at start-up (imgcls/__init__.py)
    from imgcls.splits import val_count

    hint = "or pass --steps-per-epoch N (N = training images // trainer.batch_size)"
    missing = sorted(OmegaConf.missing_keys(cfg.data.dataset))
    if missing:
        raise ValueError(f"data.dataset.{missing[0]}: ??? (no value) is not accepted; pass it, {hint}")
    try:
        source = dataset_source(cfg.data)
        if source.train_size is not None:
            n, how = source.train_size(), "train images"
        else:
            n, how = len(source.load().train_labels), "train images (loaded: its source does not count them)"
        held = val_count(cfg.data.get("val_size", 0), n)
    except (ValueError, OSError) as e:
        raise ValueError(f"{one_line(e)}; {hint}") from None
    what = f"{source.name}: {n} {how}"
    return (n - held, f"{what} - {held} held out for validation") if held else (n, what)


def fill_steps_per_epoch(cfg: DictConfig, given: int | None = None) -> str:
    """``schedule.steps_per_epoch`` from the data config, without reading images (as the
    preview counts it); returns where the number came from."""
    spe, source = steps_per_epoch(cfg, given)
    with open_dict(cfg):
        cfg.schedule.steps_per_epoch = spe
    return source
