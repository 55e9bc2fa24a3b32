"""Writing files on a disk that may fill up or be read-only: one error naming the file and the cause.

A run writes checkpoints, ``metrics.jsonl``, ``results.json``, the resolved ``config.yaml``, the
loggers' files, the sweep summary and the data cache. When one of those writes fails (full disk,
read-only file system, quota, no permission) the run ends with ``WriteFault``: train.py turns it
into exit code 4 and ONE line that names the file, the cause and what was kept. What was written
before stays intact: whole files are replaced atomically (``write_text_atomic``), appended lines
are undone when they do not fit (``JsonLines``), and torch's zip writer, which hides the OSError
of a full disk behind ``RuntimeError: ... unexpected pos``, gets that OSError back (``torch_save``).

No torch import at module level: train.py imports this before torch.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "WriteFault",
    "WRITE_FAULT_ERRNOS",
    "is_write_fault",
    "fault_message",
    "writing",
    "write_text_atomic",
    "fsync_dir",
    "JsonLines",
    "torch_save",
    "free_bytes",
    "human_bytes",
]

# The errors that say "this file system cannot take the write" (not "this input is bad").
WRITE_FAULT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})


class WriteFault(RuntimeError):
    """A file could not be written (disk full, read-only, ...): exit code 4 in train.py.
    ``path`` is the file, ``errno`` the OSError's (None when unknown)."""

    def __init__(self, message: str, path: str | os.PathLike | None = None, errno: int | None = None):
        super().__init__(message)
        self.path = None if path is None else Path(path)
        self.errno = errno


def is_write_fault(e: BaseException) -> bool:
    """An OSError that means the file system refused a write (full, read-only, quota, too big)."""
    return isinstance(e, OSError) and e.errno in WRITE_FAULT_ERRNOS


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KB', 2.3e8 -> '230 MB' (decimal units, as df -H and file managers show)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" or abs(n) >= 100 else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # unreachable


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free bytes (for an unprivileged writer) on the file system holding ``path`` or, if it
    does not exist yet, its nearest existing parent; None if that cannot be asked."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        try:
            return shutil.disk_usage(p).free
        except OSError:
            return None
    return st.f_bavail * st.f_frsize


def _cause(e: OSError) -> str:
    """'No space left on device (ENOSPC)': the strerror and the errno's name, no path."""
    text = e.strerror or str(e) or type(e).__name__
    name = errno.errorcode.get(e.errno) if e.errno is not None else None
    return f"{text} ({name})" if name else text


def fault_message(path: str | os.PathLike, what: str, e: OSError, kept: str = "") -> str:
    """One line: 'could not write <what> <path>: <cause>[, N free on the disk under <dir>][; kept]'."""
    msg = f"could not write {what} {path}: {_cause(e)}"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        real = Path(os.path.realpath(path))  # the disk the file is really on (links followed)
        folder = real if real.is_dir() else real.parent
        free = free_bytes(folder)
        if free is not None:
            msg += f", {human_bytes(free)} free on the disk under {folder}"
    return f"{msg}; {kept}" if kept else msg


@contextmanager
def writing(path: str | os.PathLike, what: str, kept: str = ""):
    """Turn an OSError raised inside the block into a WriteFault naming ``path``.
    Errors that are not OSErrors (and WriteFaults) pass through unchanged."""
    try:
        yield
    except WriteFault:
        raise
    except OSError as e:
        raise WriteFault(fault_message(path, what, e, kept), path, e.errno) from e


def fsync_dir(directory: str | os.PathLike) -> None:
    """Make the renames in ``directory`` durable (the directory entry lives in the directory's own
    blocks). Best effort: some platforms/filesystems (Windows, some FUSE mounts) cannot open or
    fsync a directory, and by then the new file is already in place."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path: str | os.PathLike, text: str | bytes, what: str, kept: str = "") -> Path:
    """Replace ``path`` with ``text`` (str, or bytes: a PNG) atomically: a temp file in the same folder, fsync'ed, then
    os.replace, then the folder fsync'ed (the rename made durable). On any failure the temp file is removed and ``path`` keeps its old content
    (or stays absent); an OSError becomes a WriteFault naming ``path``."""
    path = Path(path)
    kept = kept or (f"the previous {path.name} is intact" if path.exists() else "")
    with writing(path, what, kept):
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            if hasattr(os, "fchmod"):  # mkstemp makes 0600; these are ordinary rw-r--r-- files
                os.fchmod(fd, 0o644)
            with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    fsync_dir(path.parent)
    return path


class JsonLines:
    """An append-only JSON-lines file (``metrics.jsonl``): one ``os.write`` per record, so every
    line reaches the file system before ``append`` returns (nothing buffered in the process).
    A record that does not fit is undone (the file is truncated back to its last complete line,
    which frees, never needs, space) and a WriteFault names the file."""

    def __init__(self, path: str | os.PathLike, what: str = "metrics", kept: str = ""):
        self.path = Path(path)
        self.what, self.kept = what, kept
        with writing(self.path, what, kept):
            self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, record: dict) -> None:
        data = memoryview((json.dumps(record) + "\n").encode())
        with writing(self.path, self.what, self.kept):
            size = os.fstat(self.fd).st_size
            try:
                while data:  # a full disk may take part of a write and refuse the rest
                    data = data[os.write(self.fd, data) :]
            except OSError:
                try:
                    os.ftruncate(self.fd, size)
                except OSError:
                    pass  # the torn line is dropped on resume (see train.trim_metrics)
                raise

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)


class _Recorder:
    """A binary file wrapper for torch.save that remembers the first OSError of ``write``.

    torch's zip writer (PyTorchStreamWriter, C++) swallows the OSError that a full disk raises in
    the file's write() and fails later with ``RuntimeError: [enforce fail at inline_container.cc]
    ... unexpected pos N vs M``; this keeps the real cause."""

    def __init__(self, f):
        self.f = f
        self.error: OSError | None = None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        try:
            self.f.flush()
        except OSError as e:
            self.error = self.error or e
            raise


def torch_save(obj, f) -> None:
    """``torch.save(obj, f)`` into an open binary file; when a write of the file failed inside
    torch's writer, that OSError (ENOSPC, ...) is raised instead of torch's RuntimeError."""
    import torch

    rec = _Recorder(f)
    try:
        torch.save(obj, rec)
    except Exception as e:
        if rec.error is not None and not isinstance(e, OSError):
            raise rec.error from e
        raise


def truncate_jsonl(path: str | os.PathLike, keep, what: str = "metrics") -> str | None:
    """Keep the lines of a JSON-lines file whose record satisfies ``keep(record)``; drop the others
    and a torn last line (a kill or a full disk in mid-write can leave one: no final newline, or
    not valid JSON).

    Dropping a tail (the usual case: lines are in step order) truncates the file in place, which
    needs no free space; anything else rewrites it atomically. Returns the torn line's text, or
    None. A line that is not JSON before the last one is a ValueError naming the file and line.
    """
    path = Path(path)
    if not path.exists():
        return None
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    last = max((i for i, ln in enumerate(lines) if ln.strip()), default=-1)
    kept, torn, prefix_end, gap, rewrite = [], None, 0, False, False
    for i, line in enumerate(lines):
        ok = True
        if line.strip():
            try:
                record = json.loads(line)
                if i == last and not line.endswith(b"\n"):
                    raise ValueError("no final newline")
                ok = bool(keep(record))
            except ValueError as e:
                if i != last:
                    raise ValueError(
                        f"{path}: line {i + 1} is not JSON ({e}); delete that line (or the file) to resume"
                    ) from e
                torn, ok = line.decode("utf-8", "replace"), False
            if ok:
                kept.append(line)
        if not ok:
            gap = True
        elif not gap:
            prefix_end += len(line)
        elif line.strip():
            rewrite = True  # a kept line after a dropped one: lines out of order
    if prefix_end == len(data):
        return torn
    if rewrite:
        write_text_atomic(path, b"".join(kept).decode(), what)
    else:
        with writing(path, what):
            os.truncate(path, prefix_end)
    return torn
