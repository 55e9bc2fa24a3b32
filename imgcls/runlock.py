"""One process per run directory: an OS-level lock (``fcntl.flock``) on ``<run dir>/.lock``.

A requeued SLURM job while the old one still runs, or the same command started twice, would
write the same checkpoints. The first process holds an exclusive ``flock`` for its whole life;
the kernel releases it when the process ends in any way (exit, crash, SIGKILL), so a stale lock
never blocks a restart. The file itself is only where the lock lives; it holds the holder's PID
for the message, and may stay behind (an unlocked ``.lock`` means nothing).
"""

from __future__ import annotations

import os
from pathlib import Path

LOCK_NAME = ".lock"


class RunDirBusy(ValueError):
    """Another live process holds the run directory (a bad-input exit, code 2)."""


class RunLock:
    """``with RunLock(run_dir):`` or ``lock = RunLock(run_dir).acquire()`` ... ``lock.release()``."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.fd = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunDirBusy(
                f"hydra.run.dir: {self.path.parent} is in use by another training process (PID {holder}); "
                f"wait for it to end or stop it, or choose another hydra.run.dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()
        return False
