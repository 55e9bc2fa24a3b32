"""How a process of this template ends: the exit codes (the one set every command uses), the
known faults turned into one ``error:`` line and their code (``exit_cleanly``), Ctrl-C outside
the training loop (``interrupted``), and the stop signals (``StopRequest``): SIGTERM, SIGUSR2
(SLURM's time-limit warning) at any time of a run and SIGINT in the loop; in the loop a
checkpoint at the next step boundary first; then the signal's code, or for SIGUSR2 under
submitit its requeue (``SignalStop.end``). Light: no torch, so --help stays fast.
"""

from __future__ import annotations

import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

from imgcls import distributed

EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130, "SIGUSR2": 140}  # 128 + signal number, as a shell reports it
STOP_SIGNALS = ("SIGTERM", "SIGUSR2")  # honoured for a run's whole life (SIGINT: KeyboardInterrupt outside the loop)
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
        if kind is not None and issubclass(kind, SignalStop):  # SIGTERM/SIGUSR2 (SIGINT in the loop)
            exc.end(self.run_dir)
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


class SignalStop(BaseException):
    """A stop signal ended the run (raised by StopRequest, handled by exit_cleanly): ``name``
    (SIGTERM, SIGINT, SIGUSR2), ``phase`` (start-up, training, the final test), ``step`` and
    whether a checkpoint holds it (``saved``). Not an Exception: no ``except Exception`` on the
    way (Hydra's job runner included) mistakes it for a failed job."""

    def __init__(self, name: str, phase: str, step: int | None = None, saved: bool = False, launcher=None):
        super().__init__(name)
        self.name, self.phase, self.step, self.saved = name, phase, step, saved
        self.launcher = launcher  # the launcher's own SIGUSR2 handler (submitit's requeue), if any

    @property
    def code(self) -> int:
        return EXIT_SIGNAL[self.name]

    def __str__(self) -> str:
        if self.phase == "training":
            return f"{self.name} at step {self.step}: checkpoint saved"
        if self.saved:
            return f"{self.name} in {self.phase} (the run's last checkpoint is saved; the same command finishes it)"
        return f"{self.name} in {self.phase}: nothing to save yet"

    def end(self, run_dir: Path | None) -> None:
        """Say it in one line, note the job in a sweep's summary (status.json: stopped), then exit
        with the signal's code; SIGUSR2 (SLURM's time-limit warning, conf/hydra/launcher/slurm.yaml)
        goes on to the launcher's handler when there is one: submitit saves the job, requeues it
        (``max_num_timeout`` times at most) and exits; the requeued job resumes (resume=auto)."""
        if self.phase != "training":  # the loop said its line already
            print(f"{self}; exiting", flush=True)
        requeue = self.name == "SIGUSR2" and callable(self.launcher)
        record_stop(run_dir, f"{self} ({'requeue asked of the launcher' if requeue else f'exit {self.code}'})")
        if requeue:
            try:
                self.launcher(signal.SIGUSR2, None)  # submitit: requeue, then sys.exit
            except Exception as e:  # noqa: BLE001 - submitit says why it did not requeue (max_num_timeout)
                why = one_line(e)
                print(f"{self.name}: not requeued: {why}", flush=True)
                record_stop(run_dir, f"{self}; not requeued: {why} (exit {self.code})")
        sys.exit(self.code)


def record_stop(run_dir: Path | None, message: str) -> None:
    """A job of a multirun stopped by a signal (imgcls.exits.SignalStop): status.json says
    ``stopped`` and why, so the summary lists it; Hydra's on_job_end never runs for it (the
    process exits with the signal's code, or submitit requeues it). A requeued job that then
    finishes replaces it with ``completed`` (imgcls/sweep.py reads them all). Rank 0 only;
    nothing outside a multirun."""
    import json

    from hydra.core.hydra_config import HydraConfig

    from imgcls.io import WriteFault, write_text_atomic

    if run_dir is None or not HydraConfig.initialized() or str(HydraConfig.get().mode) != "RunMode.MULTIRUN":
        return
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0) != 0:
        return
    status = {"overrides": list(HydraConfig.get().overrides.task), "status": "stopped", "error": message}
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "status.json", json.dumps(status) + "\n", "the job status")
    except (OSError, WriteFault) as e:  # the exit code says the rest; the summary shows it unfinished
        print(f"warning: could not write {run_dir / 'status.json'}: {e}", file=sys.stderr, flush=True)


class StopRequest:
    """SIGTERM and SIGUSR2 for a run's whole life, SIGINT in the training loop. In the loop
    (``with stop.loop():``) a signal sets a flag: the loop checkpoints at the next step boundary
    (evaluation included: the epoch's end is one) and raises SignalStop. Elsewhere (start-up,
    the final test) the handler raises SignalStop at once: there is nothing newer than the last
    checkpoint to save. Outside the loop SIGINT stays Python's KeyboardInterrupt (exit 130)."""

    def __init__(self):
        self.signal = None
        self.phase = "start-up"
        self._old = {}

    def __enter__(self):
        for name in STOP_SIGNALS:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name
        if self.phase != "training":
            raise self.stopped(saved=self.phase != "start-up")

    def stopped(self, step: int | None = None, saved: bool = True) -> SignalStop:
        """The SignalStop that ends this run (a checkpoint at ``step`` holds it)."""
        phase = "training" if step is not None else self.phase
        return SignalStop(self.signal or "SIGTERM", phase, step, saved, self._old.get(signal.SIGUSR2))

    @contextmanager
    def loop(self):
        """The training loop: signals (SIGINT too) only ask; the loop answers at step boundaries."""
        entered = not self._old  # not installed for the run (train.recipe called directly): for the loop
        if entered:
            self.__enter__()
        self.phase = "training"
        old_int = signal.signal(signal.SIGINT, self._handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGINT, old_int)
            self.phase = "the final test"
            if entered:
                self.__exit__()
                self._old = {}

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
