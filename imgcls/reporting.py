"""What a training run reports while it runs: metrics.jsonl (``MetricsLog``, and the logger of
cfg.logger, imgcls/loggers.py, with the same records), the progress bar and images/s
(``Reporter``), and at the end what a tracker keeps (``log_results``). Light: no torch.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed per line so a kill loses nothing;
    the optional logger of cfg.logger gets the same records (and ``extra`` ones)."""

    KEPT = "every complete line before it is kept; the last checkpoint is intact (the same command resumes)"

    def __init__(self, path: Path | None, progress: bool, logger=None):
        from imgcls.io import JsonLines

        # None: a rank other than 0. One os.write per line: a kill loses nothing, a full disk
        # leaves no torn line (see JsonLines).
        self.file = JsonLines(path, "metrics", self.KEPT) if path is not None else None
        self.progress = progress
        self.logger = logger

    def write(self, record: dict, echo: bool | str = True, **extra) -> None:
        """echo="always": shown with the progress bar on too (evaluations)."""
        if self.file is None:
            return
        self.file.append(record)
        if self.logger is not None:
            with self._logger_writes():
                self.logger.log({**record, **extra})
        line = " ".join(f"{k}={_fmt(v)}" for k, v in record.items())
        if echo and not self.progress:
            print(line, flush=True)
        elif echo == "always":  # an evaluation: a line above the bar (the bar shows loss and lr)
            from tqdm import tqdm

            tqdm.write(line)

    def _logger_writes(self):
        """A logger's OSError (disk full, read-only) as a WriteFault naming its file."""
        from imgcls.io import writing

        where = getattr(self.logger, "path", None) or type(self.logger).__name__
        return writing(where, "the logger's file", "metrics.jsonl and the last checkpoint are intact")

    def close(self):
        """Closes everything; while another error is on its way out (sys.exc_info() inside the
        loop's `finally`), a failing close (a logger flushing to the same full disk) stays quiet
        so that error is the one reported."""
        failing = sys.exc_info()[1] is not None
        try:
            if self.file is not None:
                self.file.close()
            if self.logger is not None:
                with self._logger_writes():
                    self.logger.close()
        except Exception:
            if not failing:
                raise


def build_logger(cfg: DictConfig, run_dir: Path, optimizer, runs: dict | None = None):
    """The logger of cfg.logger (None for logger=none); imported only when chosen. A tracker
    (wandb, mlflow) gets the resolved config and `runs` (State.logger_runs, kept in the
    checkpoint): it continues the run named there and records the id of its own run there."""
    if cfg.logger.get("_target_") is None:
        return None
    import hydra

    from imgcls.exits import config_errors
    from imgcls.loggers import open_logger

    with config_errors("logger"):
        return open_logger(
            hydra.utils.instantiate(cfg.logger),
            run_dir,
            len(optimizer.param_groups),
            config=OmegaConf.to_container(cfg, resolve=True, enum_to_str=True),
            runs=runs,
        )


def log_results(run) -> None:
    """After results.json: a tracker that keeps files (MLflow) gets it and the checkpoint."""
    if run.dist.is_main and run.cfg.logger.get("_target_") is not None:
        from imgcls.loggers import log_results as tracker_log_results

        tracker_log_results(run.cfg.logger, run.state.logger_runs, run.run_dir)


class TrainLoss:
    """The training loss, summed on the device since the last log line and read once per log
    line (the one host sync); a checkpoint carries a partial sum (State.loss_sum, loss_count).
    A NaN/inf anywhere in it stops the run (exit 3)."""

    def __init__(self, state, dist, device, run_dir: Path):
        import torch

        self.state, self.dist, self.run_dir = state, dist, run_dir
        self.sum = torch.tensor(state.loss_sum, device=device, dtype=torch.float32)

    def add(self, loss) -> None:
        self.sum += loss.float()
        self.state.loss_count += 1

    def read(self) -> float:
        """The host sync: the training loss summed since the last log line (the mean over ranks)."""
        from imgcls import distributed
        from imgcls.checkpoint import checkpoint_path

        state = self.state
        value = distributed.mean_over_ranks(self.sum, self.dist).item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss is {value} between steps {state.step - state.loss_count} and "
                f"{state.step} (epoch {state.epoch}): stopped without saving; the last good checkpoint (if any) "
                f"{checkpoint_path(self.run_dir)} is intact. Lower optimizer.lr, or set "
                f"trainer.skip_nonfinite=true to skip such steps"
            )
        return value

    def take(self) -> float:
        """The mean training loss since the last log line; starts the next sum."""
        value = self.read() / max(self.state.loss_count, 1)
        self.sum.zero_()
        self.state.loss_count = 0
        self.state.loss_sum = 0.0
        return value


class Reporter:
    """What a run reports: metrics.jsonl lines (and the logger's), the progress bar, images/s.
    ``lr`` at step N is the lr after N steps and the scheduler steps due by then (the lr step
    N+1 uses), so a line at an epoch's last step waits for the epoch-end scheduler step.
    ``loop``: train.py's Loop (its run's parts, the stepper and the training loss)."""

    def __init__(self, loop):
        cfg, t, dist, state = loop.cfg, loop.t, loop.dist, loop.state
        progress = _progress_enabled(t.progress) and dist.is_main
        self.log = (
            MetricsLog(
                loop.run_dir / "metrics.jsonl",
                progress,
                build_logger(cfg, loop.run_dir, loop.optimizer, loop.state.logger_runs),
            )
            if dist.is_main
            else MetricsLog(None, progress)
        )
        self.bar = _bar(progress, total=t.epochs * loop.data.steps_per_epoch, initial=state.step)
        self.interval_start = (time.perf_counter(), state.images)  # for images/s per log interval
        self.pending = None  # (record, images/s) of a line waiting for its lr

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.log.close()
        self.bar and self.bar.close()

    def after_step(self, loop) -> None:
        state = loop.state
        if state.step % loop.t.log_every == 0:
            record = {
                "step": state.step,
                "epoch": state.epoch + state.batch / loop.data.steps_per_epoch,
                "lr": None,
                "train_loss": loop.loss.take(),
            }  # the one host sync
            now = time.perf_counter()
            speed = (state.images - self.interval_start[1]) / max(now - self.interval_start[0], 1e-9)
            self.interval_start = (now, state.images)
            self.pending = (record, speed)
            if state.batch < loop.data.steps_per_epoch:
                self.flush(loop)
        self.bar and self.bar.update(1)

    def flush(self, loop) -> None:
        if self.pending is None:
            return
        record, speed = self.pending
        self.pending = None
        record["lr"] = loop.stepper.lrs()
        self.log.write(record, images_per_second=speed)
        self.bar and self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr'][0]:.3g}")

    def evaluation(self, loop, epoch: int) -> None:
        """The evaluation's line (always echoed), and curves.png redrawn with it (trainer.plot_curves)."""
        self.log.write({"step": loop.state.step, "epoch": epoch, **loop.state.last_eval}, echo="always")
        if loop.t.plot_curves and loop.dist.is_main:
            from imgcls.plot import write_curves

            write_curves(loop.run_dir)


def _progress_enabled(setting) -> bool:
    if setting == "auto":
        return sys.stderr.isatty()
    return bool(setting)


def _bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v
