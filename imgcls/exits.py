"""How a process of this template ends: the exit codes (the one set every command uses), the
known faults turned into one ``error:`` line and their code (``exit_cleanly``), Ctrl-C outside
the training loop (``interrupted``), and SIGTERM/SIGINT during it (``StopRequest``: a checkpoint
at the next step boundary, then the signal's code). Light: no torch, so --help stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from imgcls import distributed

EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as a shell reports it
EXIT_INTERRUPTED = EXIT_SIGNAL["SIGINT"]  # Ctrl-C
EXIT_BAD_INPUT = 2  # a config value, a data file or a checkpoint was refused at start-up
EXIT_NONFINITE = 3  # the training loss became NaN or inf (the last good checkpoint is kept)
EXIT_WRITE_FAULT = 4  # a file could not be written: disk full, read-only (what was saved is intact)
EXIT_JOB_FAILED = 1  # a multirun ran every job and some failed (the sweep summary marks them)


def interrupted(what: str | None = None) -> int:
    """Ctrl-C outside the training loop (start-up, the final test, evaluate, predict): one
    line instead of a traceback; returns the exit code, 130 (what was saved is intact)."""
    said = f"{what} stopped (Ctrl-C)" if what else "Ctrl-C; stopped (what was saved is intact)"
    print(f"interrupted: {said}", file=sys.stderr, flush=True)
    return EXIT_INTERRUPTED


class exit_cleanly:
    """Known faults end the process with one line on stderr and a documented exit code
    (HYDRA_FULL_ERROR=1 shows the traceback instead). A run that fails at start-up leaves no
    empty run directory behind (imgcls.runlock.remove_if_unused: start-up files only; a Ctrl-C
    is cleaned up by the run's lock, imgcls.runlock.hold). In a multirun the job ends instead,
    after the same one line: ``failed`` is then what main returns (a JobFailed,
    which the sweep summary marks failed), and the next job runs."""

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self.failed = None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            return False
        if issubclass(kind, KeyboardInterrupt):  # Ctrl-C at start-up (or after training)
            sys.exit(interrupted())
        from omegaconf.errors import OmegaConfBaseException

        from imgcls.io import WriteFault, is_write_fault

        if issubclass(kind, FloatingPointError):
            code = EXIT_NONFINITE
        elif issubclass(kind, WriteFault) or is_write_fault(exc):  # any file: disk full, read-only
            code = EXIT_WRITE_FAULT
        elif issubclass(kind, (ValueError, FileNotFoundError, OmegaConfBaseException)):  # CheckpointError too
            code = EXIT_BAD_INPUT
        else:
            return False
        print(f"error: {exc}", file=sys.stderr, flush=True)
        from imgcls.runlock import RunDirBusy, remove_if_unused

        if code == EXIT_BAD_INPUT and self.run_dir is not None and not issubclass(kind, RunDirBusy):
            remove_if_unused(self.run_dir)  # never the run directory of the process holding the lock
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            self.failed = JobFailed(code, str(exc))  # no Hydra traceback; the next job runs
            return True
        sys.exit(code)


class JobFailed:
    """What train.py's main returns for a multirun job it refused: the exit code the job would
    have had alone and its one-line error (already printed). Picklable (joblib workers). Not a
    number: an Optuna sweeper records the trial as failed and goes on."""

    def __init__(self, code: int, message: str):
        self.code, self.message = code, message

    def __str__(self) -> str:
        return f"{self.message} (exit code {self.code})"

    def __float__(self) -> float:
        raise TypeError(f"the job failed: {self}")


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for name in EXIT_SIGNAL:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def requested(self, loop, epoch_end: bool = False) -> bool:
        """Stop now? The same answer on every rank. Alone: the local flag, at every step.
        Under torchrun asking costs an all_reduce and a host sync, so ranks ask only every
        trainer.log_every steps and at epoch ends (all of them at the same step)."""
        if loop.dist.enabled and not epoch_end and loop.state.step % loop.t.log_every:
            return False
        if distributed.any_rank(self.signal is not None, loop.dist, loop.device):
            self.signal = self.signal or "SIGTERM"  # another rank was signalled
            return True
        return False

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def one_line(e: BaseException) -> str:
    text = str(e).split("Config search path:")[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class config_errors:
    """Re-raise a constructor's error as a ValueError that names the config group:
    ``with config_errors("optimizer"): ...`` turns torch's "Invalid momentum value: -1" into
    "optimizer: Invalid momentum value: -1" (Hydra wraps it in InstantiationException)."""

    def __init__(self, group: str):
        self.group = group

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from hydra.errors import InstantiationException

        if kind is not None and issubclass(kind, (ValueError, TypeError, InstantiationException)):
            message = one_line(exc.__cause__ or exc)
            first = message.split(" ", 1)[0]
            if not (first.startswith(self.group + ".") and first.endswith(":")):  # "data.dataset.x: ..." names its key
                message = f"{self.group}: {message}"
            raise ValueError(message) from exc
        return False
