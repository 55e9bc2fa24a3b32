"""Where the images come from and where their tensors are kept: archive extraction (safe
members, atomically, with a clear error on a full disk), the tensor cache under
``<root>/cache/`` (60,000 JPEGs decoded once, not once per run), the official CIFAR readers,
image-folder listing and decoding, and the synthetic generator. imgcls/data.py's builders
call these; a fork adding a dataset rarely reads this file.

All paths in messages and logs are absolute. A relative ``data.dataset.root`` /
``data.dataset.path`` is resolved against the directory train.py was launched from (the cwd), as
every path of the command line is; the default root, ``${project_dir:data}``, is the project's
``data/`` folder wherever that is.
"""

from __future__ import annotations

import concurrent.futures
import errno
import hashlib
import logging
import os
import pickle
import shutil
import tarfile
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from imgcls.io import WriteFault, free_bytes, human_bytes, is_write_fault, torch_save

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
"""The project root (its ``data/`` is the default data root, ``${project_dir:data}`` in conf/data/)."""

_CACHE_VERSION = 1  # bump when the cache layout changes: old cache files are then ignored
_ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")

# name -> (torchvision.datasets class holding the official url/filename/md5 constants,
#          label key in the batch pickles, class-name key in the meta pickle, training images)
# torchvision is imported only where it is used (it pulls in torch._dynamo: ~2 s of start-up)
OFFICIAL = {
    "cifar10": ("CIFAR10", "labels", "label_names", 50_000),
    "cifar100": ("CIFAR100", "fine_labels", "fine_label_names", 50_000),
}


def _official_class(name: str):
    import torchvision.datasets

    return getattr(torchvision.datasets, OFFICIAL[name][0])


def check_integrity(fpath: str, md5: str) -> bool:
    """torchvision's MD5 check, imported on first use."""
    from torchvision.datasets.utils import check_integrity as check

    return check(fpath, md5)


def download_and_extract_archive(*args, **kwargs) -> None:
    """torchvision's download, imported on first use."""
    from torchvision.datasets.utils import download_and_extract_archive as fetch

    fetch(*args, **kwargs)


class DataNotFoundError(FileNotFoundError):
    """The data a config asks for is not on disk (and was not, or could not be, downloaded)."""


@dataclass
class Dataset:
    """One dataset, fully in memory.

    ``*_images`` are uint8 ``[N, 3, H, W]`` (contiguous, 0..255), ``*_labels`` int64 ``[N]``
    in ``0..len(classes)-1``. ``mean`` / ``std`` are per channel, in 0..1 units (pixel/255),
    computed from the train images (population std, float64 math). ``source`` is the
    absolute path the data was read from ("" for synthetic).
    """

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    source: str = ""
    extra: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------
# paths, stats, cache
# --------------------------------------------------------------------------------------


def resolve_path(value: str | os.PathLike, key: str = "data.dataset.root") -> Path:
    """Absolute path for a config value: ``~`` expanded, relative -> against the cwd (where the
    command was launched), as every path of the command line."""
    if value is None or str(value) == "":
        raise ValueError(
            f"{key}: {value!r} is empty; give a folder path (absolute, or relative to the launch directory {os.getcwd()})"
        )
    p = Path(os.path.expanduser(str(value)))
    if not p.is_absolute():
        p = Path.cwd() / p
    return Path(os.path.abspath(p))


def normalize_stats(images: torch.Tensor, chunk: int = 2048) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) of uint8 ``[N, C, H, W]`` images, in 0..1 units.

    Sums are exact int64 (chunked, so memory stays small), then float64: the population
    std (ddof=0) over all pixels of all images.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(
            f"images: expected a non-empty uint8 [N, C, H, W] tensor, got {images.dtype} {tuple(images.shape)}"
        )
    c = images.shape[1]
    s = torch.zeros(c, dtype=torch.int64)
    ss = torch.zeros(c, dtype=torch.int64)
    for i in range(0, images.shape[0], chunk):
        x = images[i : i + chunk].to(torch.int64)
        s += x.sum(dim=(0, 2, 3))
        ss += (x * x).sum(dim=(0, 2, 3))
    n = images.numel() // c
    mean = s.double() / n
    var = (ss.double() / n - mean * mean).clamp_min(0.0)
    return (tuple((mean / 255.0).tolist()), tuple((var.sqrt() / 255.0).tolist()))


def _source_key(name: str, source: Path, extra: str = "") -> str:
    """Short hash of the dataset name and absolute source path: the caches of one source share it."""
    return hashlib.sha1(f"{name}\0{source}\0{extra}".encode()).hexdigest()[:8]


def _file_key(source: Path, files: Sequence[Path], extra: str = "") -> str:
    """Short hash of the absolute source path and each file's (relative path, size, mtime_ns)."""
    h = hashlib.sha1()
    h.update(f"v{_CACHE_VERSION}\0{source}\0{extra}\0".encode())
    for rel, f in sorted((str(f.relative_to(source)), f) for f in files):
        st = f.stat()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


_CACHE_KEYS = ("train_images", "train_labels", "test_images", "test_labels", "classes", "mean", "std")


def _load_cache(path: Path) -> dict | None:
    """The cached tensors at ``path``, or None when absent or unreadable (then rebuilt)."""
    if not path.is_file():
        return None
    try:
        # mmap: pages are read when used (evaluate touches only the test split of a 60k-image cache)
        d = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(d, dict) or any(k not in d for k in _CACHE_KEYS):
            raise ValueError("missing keys")
    except Exception as e:  # a cache is disposable: rebuild it rather than fail the run
        log.warning("ignoring unreadable data cache %s (%s); rebuilding it", path, e)
        return None
    log.info("loaded data cache %s", path)
    return d


def _save_cache(path: Path, d: dict) -> None:
    """``torch.save`` to a temp file in the same folder, then ``os.replace`` (atomic).
    A full disk raises OSError(ENOSPC) (not torch's RuntimeError "unexpected pos")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch_save(d, f)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    log.info("wrote data cache %s", path)


def _to_dataset(d: dict, name: str, source: Path | str) -> Dataset:
    return Dataset(
        train_images=d["train_images"].contiguous(),
        train_labels=d["train_labels"].to(torch.int64),
        test_images=d["test_images"].contiguous(),
        test_labels=d["test_labels"].to(torch.int64),
        classes=[str(c) for c in d["classes"]],
        mean=tuple(float(v) for v in d["mean"]),
        std=tuple(float(v) for v in d["std"]),
        name=name,
        source=str(source),
    )


def _cache_bytes(d: dict) -> int:
    """Bytes of tensor data in a cache dict: about the size of its file."""
    return sum(v.numel() * v.element_size() for v in d.values() if isinstance(v, torch.Tensor))


def _remove_superseded(cache: Path) -> None:
    """Delete the other caches of the same source (``<name>-<source key>-*.pt``): built from an
    older state of its files (e.g. before a re-extraction gave them new mtimes), never read again."""
    stem_prefix = cache.name.rsplit("-", 1)[0] + "-"
    for old in cache.parent.glob(f"{stem_prefix}*.pt"):
        if old != cache:
            try:
                size = old.stat().st_size
                old.unlink()
                log.info("removed superseded data cache %s (%s)", old, human_bytes(size))
            except OSError as e:
                log.warning("could not remove superseded data cache %s: %s", old, e)


def _cached(name: str, root: Path, source: Path, files: Sequence[Path], build, key_extra: str = "") -> Dataset:
    """Load ``<root>/cache/<name>-<source key>-<file key>.pt`` or ``build()`` it, add mean/std,
    save it (replacing the superseded caches of the same source). The cache is disposable: when it
    cannot be written (a full disk) the run warns in one line and goes on from memory."""
    cache = root / "cache" / f"{name}-{_source_key(name, source, key_extra)}-{_file_key(source, files, key_extra)}.pt"
    d = _load_cache(cache)
    if d is None:
        d = build()
        d["mean"], d["std"] = normalize_stats(d["train_images"])
        d["mean"], d["std"] = list(d["mean"]), list(d["std"])
        if cache.parent.is_dir():
            _remove_superseded(cache)  # first: their space may be what the new one needs
        try:
            _save_cache(cache, d)
        except (OSError, RuntimeError) as e:
            cause = (
                f"{e.strerror} ({errno.errorcode.get(e.errno, e.errno)})"
                if isinstance(e, OSError) and e.strerror
                else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            )
            free = free_bytes(cache.parent)
            log.warning(
                "could not write the data cache %s: %s; it needs about %s%s; training on from "
                "memory (the next run decodes the data again)",
                cache,
                cause,
                human_bytes(_cache_bytes(d)),
                f", {human_bytes(free)} free on the disk under {cache.parent}" if free is not None else "",
            )
    return _to_dataset(d, name, source)


# --------------------------------------------------------------------------------------
# archives
# --------------------------------------------------------------------------------------


def _safe_members(tf: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """Members of ``tf``; ValueError for absolute paths, ``..``, links and special files."""
    out = []
    for m in tf.getmembers():
        parts = Path(m.name).parts
        if m.name.startswith(("/", "\\")) or Path(m.name).is_absolute() or ".." in parts:
            raise ValueError(
                f"{archive}: member {m.name!r} has an absolute path or '..'; "
                f"refusing to extract this archive (only relative paths inside "
                f"the archive are accepted)"
            )
        if m.issym() or m.islnk() or not (m.isfile() or m.isdir()):
            raise ValueError(
                f"{archive}: member {m.name!r} is a link or special file; "
                f"refusing to extract this archive (only files and folders are "
                f"accepted)"
            )
        out.append(m)
    return out


def _extraction_bytes(members: Sequence[tarfile.TarInfo], block: int) -> int:
    """Disk space the extracted members take: each file rounded up to whole blocks, a block per folder."""
    return sum(-(-m.size // block) * block if m.isfile() else block for m in members)


def _image_cache_bytes(archive: Path, members: Sequence[tarfile.TarInfo]) -> int | None:
    """About the size of the tensor cache of an image_folder archive: its images under
    ``train/`` or ``test/`` times 3 x H x W bytes of the first one (+ 8 bytes of label). None if
    the first image cannot be read."""
    images = [
        m
        for m in members
        if m.isfile()
        and len(Path(m.name).parts) >= 3
        and Path(m.name).parts[-3] in ("train", "test")
        and not Path(m.name).name.startswith(".")
    ]
    if not images:
        return None
    try:
        with tarfile.open(archive) as tf, Image.open(tf.extractfile(images[0])) as im:
            w, h = im.size
    except Exception:
        return None
    return len(images) * (3 * w * h + 8)


def _extraction_fault(archive: Path, dest: Path, e: OSError, members, cache_bytes) -> WriteFault:
    """The one-line error of an extraction that the disk under data.dataset.root refused."""
    root = dest.parent
    try:
        st = os.statvfs(root)
        block = st.f_frsize or 4096
    except (OSError, AttributeError):
        block = 4096
    need = _extraction_bytes(members, block) if members else None
    cache = (cache_bytes(members) if members else None) if callable(cache_bytes) else cache_bytes
    free = free_bytes(root)
    what = (
        "the disk under data.dataset.root " + str(root) + " is full"
        if e.errno in (errno.ENOSPC, errno.EDQUOT)
        else f"data.dataset.root {root} cannot be written"
    )
    cause = f"{e.strerror or e}, {errno.errorcode.get(e.errno, e.errno)}"
    sizes = []
    if need is not None:
        sizes.append(f"the extraction needs about {human_bytes(need)}")
    if cache is not None:
        sizes.append(f"the data cache about {human_bytes(cache)} more")
    if free is not None:
        sizes.append(f"{human_bytes(free)} are free")
    return WriteFault(
        f"cannot extract {archive}: {what} ({cause})"
        + (f"; {', '.join(sizes)}" if sizes else "")
        + f"; nothing was left behind (the partial extraction was removed, {archive.name} is untouched): "
        f"free some space or set data.dataset.root to a folder on a bigger disk",
        root,
        e.errno,
    )


def _extract_atomic(archive: Path, dest: Path, subfolder: str | None = None, cache_bytes=None) -> None:
    """Extract ``archive`` so that ``dest`` appears complete or not at all.

    The archive is extracted into a temp folder next to ``dest``, then renamed into place
    (``<tmp>/<subfolder>`` when given, else the whole temp folder). If another process
    got there first, its copy is kept and ours deleted. A full or read-only disk under
    ``dest`` raises WriteFault saying how much the extraction (and ``cache_bytes``: a number,
    or a function of the members) needs; the temp folder is removed either way.
    """
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if not is_write_fault(e):
            raise
        raise _extraction_fault(archive, dest, e, None, None) from e
    tmp = dest.parent / f".{dest.name}.extract-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("extracting %s -> %s", archive, dest)
    try:
        members = None
        try:
            with tarfile.open(archive) as tf:
                members = _safe_members(tf, archive)
                kw = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
                tf.extractall(tmp, members=members, **kw)
        except OSError as e:
            # the disk refused a write (full, read-only, quota): the archive itself is fine
            writing_tmp = e.errno in (errno.EACCES, errno.EPERM) and str(e.filename or "").startswith(str(tmp))
            if members is None or not (is_write_fault(e) or writing_tmp):
                raise ValueError(f"{archive}: cannot be read as a tar archive ({e}); delete or replace it") from e
            shutil.rmtree(tmp, ignore_errors=True)  # before measuring what is free
            raise _extraction_fault(archive, dest, e, members, cache_bytes) from e
        except (tarfile.TarError, EOFError) as e:
            raise ValueError(f"{archive}: cannot be read as a tar archive ({e}); delete or replace it") from e
        src = tmp / subfolder if subfolder else tmp
        if not src.is_dir():
            raise ValueError(f"{archive}: holds no folder {subfolder!r}; is it the right archive?")
        try:
            os.rename(src, dest)
        except OSError:
            if not dest.is_dir():
                raise
            log.info("%s was extracted concurrently by another process; using it", dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------
# official CIFAR archives
# --------------------------------------------------------------------------------------


def _not_found_message(name: str, root: Path, archive: Path, folder: Path, cause: str = "") -> str:
    """``cause``: why downloading failed (then downloading again is not the advice)."""
    fetch = (
        f"  copy {archive.name} into {root}   (fetched elsewhere: this machine could not download it)"
        if cause
        else f"  data.dataset.download=true                download it into data.dataset.root={root}"
    )
    lines = [
        f"data={name}: the official archive was not found{cause}.",
        f"  expected: {archive}",
        f"        or: its extracted folder {folder}",
        "Do one of:",
        fetch,
        f"  data.dataset.root=/path/with/the/archive  a folder that holds {archive.name}",
        "  data=image_folder data.dataset.path=/path/to/tree_or_archive",
        "                                            train/<class>/* and test/<class>/* images (a folder or .tar.gz)",
        "  experiment=smoke                          an offline smoke run on synthetic data",
    ]
    return "\n".join(lines)


def _unpickle(path: Path) -> dict:
    with open(path, "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in d.items()}


def _read_official(folder: Path, files: list[str], label_key: str) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 [N,3,32,32] images and int64 labels from official batch pickles in ``folder``."""
    xs, ys = [], []
    for fn in files:
        p = folder / fn
        d = _unpickle(p)
        if "data" not in d or label_key not in d:
            raise ValueError(f"{p}: expected keys 'data' and {label_key!r}, found {sorted(d)}")
        data = np.asarray(d["data"], dtype=np.uint8)
        labels = np.asarray(d[label_key], dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{p}: expected data [N, 3072] and N labels, got data {data.shape} and {labels.shape[0]} labels"
            )
        xs.append(torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()))
        ys.append(torch.from_numpy(labels.copy()))
    return torch.cat(xs).contiguous(), torch.cat(ys)


def load_official(name: str, root: Path, download: bool) -> Dataset:
    _, label_key, names_key, _ = OFFICIAL[name]
    cls = _official_class(name)
    archive = root / cls.filename
    folder = root / cls.base_folder
    train_files = [f for f, _ in cls.train_list]
    test_files = [f for f, _ in cls.test_list]
    meta_file = cls.meta["filename"]
    needed = train_files + test_files + [meta_file]

    if not folder.is_dir():
        if archive.is_file():
            if not check_integrity(str(archive), cls.tgz_md5):
                raise ValueError(
                    f"{archive}: the md5 checksum does not match the official "
                    f"{cls.filename} (expected {cls.tgz_md5}); the file is corrupt "
                    f"or not the official archive. Delete it and download again "
                    f"(data.dataset.download=true), or point data.dataset.root elsewhere."
                )
            # the cache: 3x32x32 bytes + an int64 label per image (CIFAR-10 and -100: 60,000 images)
            _extract_atomic(archive, folder, subfolder=cls.base_folder, cache_bytes=60_000 * (3 * 32 * 32 + 8))
        elif download:
            root.mkdir(parents=True, exist_ok=True)
            tmp = root / f".{cls.base_folder}.download-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                download_and_extract_archive(
                    cls.url, download_root=str(root), extract_root=str(tmp), filename=cls.filename, md5=cls.tgz_md5
                )
                try:
                    os.rename(tmp / cls.base_folder, folder)
                except OSError:
                    if not folder.is_dir():
                        raise
            except (OSError, RuntimeError) as e:
                # our own partial or corrupt download: never leave it to be mistaken for the archive
                if archive.is_file() and not check_integrity(str(archive), cls.tgz_md5):
                    archive.unlink()
                raise DataNotFoundError(
                    _not_found_message(
                        name,
                        root,
                        archive,
                        folder,
                        cause=f" and downloading {cls.url} failed ({type(e).__name__}: {e})",
                    )
                ) from e
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        else:
            raise DataNotFoundError(_not_found_message(name, root, archive, folder))

    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise ValueError(
            f"{folder}: incomplete, {missing[0]!r} is missing (expected "
            f"{needed}); delete the folder so it is extracted again from {archive}"
        )

    def build() -> dict:
        log.info("parsing %s", folder)
        xtr, ytr = _read_official(folder, train_files, label_key)
        xte, yte = _read_official(folder, test_files, label_key)
        classes = [str(c) for c in _unpickle(folder / meta_file)[names_key]]
        return {"train_images": xtr, "train_labels": ytr, "test_images": xte, "test_labels": yte, "classes": classes}

    return _cached(name, root, folder, [folder / f for f in needed], build)


# --------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------


def _archive_stem(p: Path) -> str | None:
    for suf in _ARCHIVE_SUFFIXES:
        if p.name.lower().endswith(suf):
            return p.name[: -len(suf)]
    return None


def _find_tree(base: Path) -> Path:
    """``base`` if it holds ``train/`` and ``test/``, else its single subfolder that does."""
    if (base / "train").is_dir() and (base / "test").is_dir():
        return base
    subs = [d for d in base.iterdir() if d.is_dir() and not d.name.startswith(".")]
    if len(subs) == 1 and (subs[0] / "train").is_dir() and (subs[0] / "test").is_dir():
        return subs[0]
    raise ValueError(
        f"data.dataset.path: {base} holds no train/ and test/ folders (expected "
        f"train/<class>/* and test/<class>/*, possibly under one top folder)"
    )


def _list_split(split_dir: Path) -> tuple[list[str], list[list[Path]]]:
    """Sorted class names and, per class, the sorted image files (dotfiles skipped)."""
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"{split_dir}: holds no class folders (expected {split_dir}/<class>/*)")
    files = []
    for c in classes:
        fs = sorted(f for f in (split_dir / c).iterdir() if f.is_file() and not f.name.startswith("."))
        if not fs:
            raise ValueError(
                f"{split_dir / c}: empty class folder; every class folder needs at "
                f"least one image (delete it or add images)"
            )
        files.append(fs)
    return classes, files


def _decode(path: Path) -> np.ndarray:
    """One image as uint8 [H, W, 3]; ValueError naming the file if PIL cannot read it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Exception as e:
        raise ValueError(
            f"{path}: not a readable image ({type(e).__name__}: {e}); image_folder "
            f"accepts only image files that PIL can open"
        ) from e


def _decode_all(files: list[Path], expected: tuple[int, int] | None, workers: int) -> torch.Tensor:
    """uint8 [N, 3, H, W] from ``files``; all images must share one size (W, H)."""
    first = _decode(files[0])
    exp = expected or (first.shape[1], first.shape[0])
    out = np.empty((len(files), first.shape[0], first.shape[1], 3), dtype=np.uint8)

    def one(i: int) -> None:
        a = first if i == 0 else _decode(files[i])
        if (a.shape[1], a.shape[0]) != exp:
            raise ValueError(
                f"{files[i]}: image size {a.shape[1]}x{a.shape[0]} (WxH) differs from "
                f"the expected {exp[0]}x{exp[1]} (the first image's, {files[0]}); "
                f"image_folder needs all images to have one size"
            )
        out[i] = a

    def chunk(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            one(i)

    step = 512
    ex = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [ex.submit(chunk, lo, min(lo + step, len(files))) for lo in range(0, len(files), step)]
        for f in futures:
            f.result()  # re-raises the first failing chunk's error, in file order
    finally:
        ex.shutdown(wait=True, cancel_futures=True)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


def image_folder_path(path) -> Path:
    """``data.dataset.path`` checked: an existing folder, or a file with an archive suffix."""
    accepted = "a folder with train/<class>/* and test/<class>/* or a .tar.gz/.tgz/.tar archive of one"
    if path is None or str(path) == "":
        raise ValueError(f"data.dataset.path: {path!r} is not accepted; expected {accepted}")
    src = resolve_path(path, "data.dataset.path")
    if not src.exists():
        raise ValueError(f"data.dataset.path: {src} does not exist; expected {accepted}")
    if src.is_file() and _archive_stem(src) is None:
        raise ValueError(f"data.dataset.path: {src} is a file but not a .tar.gz/.tgz/.tar archive; expected {accepted}")
    return src


def count_train(root: Path, src: Path) -> int:
    """Training images under ``src`` (or its extraction), listed as the loader lists them;
    for an archive not yet extracted, its member list is read (no image is decoded)."""
    if src.is_file() and not (root / _archive_stem(src)).is_dir():
        try:
            with tarfile.open(src) as tf:
                names = [PurePosixPath(m.name) for m in _safe_members(tf, src) if m.isfile()]
        except (tarfile.TarError, EOFError) as e:
            raise ValueError(f"data.dataset.path: {src} is not a readable archive ({type(e).__name__}: {e})") from e
        # train/<class>/<file>, possibly under one top folder (as _find_tree accepts)
        return sum(1 for p in names if len(p.parts) in (3, 4) and p.parts[-3] == "train" and not p.name.startswith("."))
    base = root / _archive_stem(src) if src.is_file() else src
    _, files = _list_split(_find_tree(base) / "train")
    return sum(len(fs) for fs in files)


def load_image_folder(root: Path, src: Path) -> Dataset:
    if src.is_file():
        dest = root / _archive_stem(src)
        if dest.is_dir():
            log.info("using %s, extracted earlier from %s", dest, src)
        else:
            root.mkdir(parents=True, exist_ok=True)
            _extract_atomic(src, dest, cache_bytes=lambda members: _image_cache_bytes(src, members))
        base = dest
    else:
        root.mkdir(parents=True, exist_ok=True)
        base = src
    tree = _find_tree(base)

    classes, train_files = _list_split(tree / "train")
    test_classes, test_files = _list_split(tree / "test")
    if test_classes != classes:
        raise ValueError(
            f"{tree / 'test'}: class folders {test_classes} differ from "
            f"{tree / 'train'}'s {classes}; test must have the same class names"
        )

    flat_train = [f for fs in train_files for f in fs]
    flat_test = [f for fs in test_files for f in fs]

    def labels(per_class: list[list[Path]]) -> torch.Tensor:
        return torch.cat([torch.full((len(fs),), i, dtype=torch.int64) for i, fs in enumerate(per_class)])

    def build() -> dict:
        workers = max(1, min(8, os.cpu_count() or 1))
        log.info(
            "decoding %d images under %s (%d threads; cached afterwards)",
            len(flat_train) + len(flat_test),
            tree,
            workers,
        )
        xtr = _decode_all(flat_train, None, workers)
        xte = _decode_all(flat_test, (xtr.shape[3], xtr.shape[2]), workers)
        return {
            "train_images": xtr,
            "train_labels": labels(train_files),
            "test_images": xte,
            "test_labels": labels(test_files),
            "classes": classes,
        }

    return _cached("image_folder", root, tree, flat_train + flat_test, build)


# --------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------


def make_synthetic(n_train: int, n_test: int, num_classes: int, seed: int) -> Dataset:
    """Learnable 3x32x32 data: per class a random colour + low-frequency template, plus noise.

    Templates are left-right symmetric and smooth (4x4 upsampled to 32x32), so random
    flips and small crops keep them recognisable.
    """
    g = torch.Generator().manual_seed(int(seed))
    colour = torch.rand(num_classes, 3, 1, 1, generator=g) * 2 - 1
    coarse = torch.rand(num_classes, 3, 4, 4, generator=g) * 2 - 1
    coarse = (coarse + coarse.flip(-1)) / 2
    tmpl = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    tmpl = 128.0 + 40.0 * colour + 60.0 * tmpl  # [C, 3, 32, 32] in pixel units

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        x = tmpl[y] + 24.0 * torch.randn(n, 3, 32, 32, generator=g)
        return x.round_().clamp_(0, 255).to(torch.uint8).contiguous(), y

    xtr, ytr = split(n_train)
    xte, yte = split(n_test)
    mean, std = normalize_stats(xtr)
    return Dataset(
        xtr, ytr, xte, yte, [f"class{i}" for i in range(num_classes)], mean, std, name="synthetic", source=""
    )
