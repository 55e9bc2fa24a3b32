"""One process per run directory: an OS-level lock (``fcntl.flock``) on ``<run dir>/.lock``.

A requeued SLURM job while the old one still runs, or the same command started twice, would
write the same checkpoints. The first process holds an exclusive ``flock`` while its run runs
(train.py: ``with hold(run_dir) as lock``; the lock is the run's, no module keeps it); the kernel
releases it when the process ends in any way (exit, crash, SIGKILL), so a stale lock never
blocks a restart. The file itself is only where the lock lives; it holds the holder's PID for
the message, and may stay behind (an unlocked ``.lock`` means nothing). Also here: the config
files a run writes once it holds the lock (``write_config``), and the clean-up of a run
directory a failed start left (``remove_if_unused``).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirBusy(ValueError):
    """Another live process holds the run directory (a bad-input exit, code 2)."""


class RunLock:
    """``with RunLock(run_dir):`` or ``lock = RunLock(run_dir).acquire()`` ... ``lock.release()``."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd = None

    def acquire(self, note_pid: bool = True) -> "RunLock":
        """``note_pid=False``: the lock file keeps what it holds until ``note_pid()`` (train.py
        notes its PID once its config was accepted: a refused start changes no file)."""
        import fcntl

        from imgcls.io import WriteFault, is_write_fault

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            if not is_write_fault(e):
                raise
            raise WriteFault(
                f"could not create the run-directory lock {self.path}: {e.strerror}; nothing was written",
                self.path,
                e.errno,
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"hydra.run.dir: {self.path.parent} is in use by another training process (PID {holder}); "
                f"wait for it to end or stop it, or choose another hydra.run.dir"
            ) from None
        self.fd = fd
        if note_pid:
            self.note_pid()
        return self

    def note_pid(self) -> None:
        """Our PID into the lock file, for the message a second process prints; the lock holds without it."""
        from imgcls.io import is_write_fault

        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        except OSError as e:
            if not is_write_fault(e):  # a full disk: the first file the run writes reports it
                self.release()
                raise

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False


@contextmanager
def hold(run_dir: str | Path, is_main: bool = True):
    """train.py's lock on its run directory, for the run's life (``with hold(run_dir,
    dist.is_main) as lock``: the RunLock, None on ranks other than 0): a second process on it
    (a requeued job while the old one runs) exits 2 naming the holder. The PID goes into the
    lock file once the config is accepted (``lock.note_pid()``: a refused start changes no
    file). Ctrl-C while it is held: the lock is released and a run directory holding nothing
    but start-up files removed (remove_if_unused), then the interrupt goes on."""
    lock = RunLock(run_dir).acquire(note_pid=False) if is_main else None
    try:
        yield lock
    except KeyboardInterrupt:
        if lock is not None:
            lock.release()
            remove_if_unused(run_dir)  # only a directory with nothing but start-up files
        raise
    finally:
        if lock is not None:
            lock.release()  # the next job of a multirun, in this process, takes its own


def write_config(run, composed: str | None = None) -> None:
    """The run's config files, written once this process holds the run lock and its config was
    accepted (a refused start leaves an existing run directory as it was): ``config.yaml`` (the
    resolved config), and under Hydra ``.hydra/config.yaml`` (``composed``, as Hydra composed
    it), ``.hydra/hydra.yaml`` and ``.hydra/overrides.yaml``, which Hydra itself would write
    before the run starts (conf/config.yaml: ``hydra.output_subdir: null``). Then the lock
    file names this process (run.lock). ``run``: train.py's Run (cfg, run_dir, dist, lock)."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from imgcls.io import write_text_atomic

    cfg, run_dir = run.cfg, run.run_dir
    if not run.dist.is_main:
        return
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True), "the resolved config")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        files = {
            "config.yaml": composed if composed is not None else OmegaConf.to_yaml(cfg),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
        }
        (run_dir / ".hydra").mkdir(exist_ok=True)
        for name, text in files.items():
            write_text_atomic(run_dir / ".hydra" / name, text, f"Hydra's {name}")
    if run.lock is not None:
        run.lock.note_pid()


# What Hydra and train.py put into a run directory before the first step: nothing a user needs
# once start-up failed (the error is on stderr). A directory holding anything else is left alone.
_STARTUP_FILES = (".hydra", "train.log", "config.yaml", "checkpoints", LOCK_NAME)
_PROGRESS_FILES = ("metrics.jsonl", "results.json")


def remove_if_unused(run_dir: str | Path) -> bool:
    """Delete a run directory that a failed start-up left with nothing but start-up files
    (Hydra's .hydra/ and log, the resolved config, an empty checkpoints/, the lock). Returns
    whether it was removed. Never touches a directory with a checkpoint, metrics or results, or
    with any file it did not expect."""
    import shutil

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return False
    names = {p.name for p in run_dir.iterdir()}
    ckpt = run_dir / "checkpoints"
    if names - set(_STARTUP_FILES) or names & set(_PROGRESS_FILES) or (ckpt.is_dir() and any(ckpt.iterdir())):
        return False
    for name in names:
        p = run_dir / name
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    try:
        run_dir.rmdir()
    except OSError:
        return False
    return True
