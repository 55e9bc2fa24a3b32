"""The data options: add a dataset here, as one function and one YAML.

Each option is a builder named by ``data.dataset._target_`` in ``conf/data/<option>.yaml``:
``cifar10``, ``cifar100`` (the official python archives), ``image_folder``
(``train/<class>/*`` + ``test/<class>/*``, as a folder or a tar archive) and ``synthetic``
(no files). Each takes only its own keys and returns a ``DataSource``: its training-set size
(counted without decoding an image, when it can) and ``load()``, which reads a ``Dataset``:
uint8 ``[N, 3, H, W]`` images, int64 labels, class names and per-channel mean/std. Reading,
extracting and caching the files is imgcls/datastore.py's job; batching and augmenting on the
device is imgcls/loader.py's. A checkpoint may name only builders of this module
(imgcls.evaluate rebuilds its data from them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import hydra
import numpy as np

from imgcls.datastore import (
    OFFICIAL,
    PROJECT_ROOT,
    Dataset,
    count_train,
    image_folder_path,
    load_image_folder,
    load_official,
    make_synthetic,
    resolve_path,
)
from imgcls.exits import config_errors

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# the data options: conf/data/<option>.yaml names one of these as data.dataset._target_
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DataSource:
    """What a data option's builder returns: the dataset, not yet read.

    ``load()`` reads it whole (a ``Dataset``). ``train_size()`` counts its training images
    without decoding one: the schedule preview and ``--cfg job --resolve`` need the number of
    steps per epoch before (or without) a run; ``None`` makes them load the data instead.
    """

    name: str  # for logs and the decoded-tensor cache
    load: Callable[[], Dataset]
    train_size: Callable[[], int] | None = None


def cifar10(root: str | None = None, download: bool = True) -> DataSource:
    """CIFAR-10 from the official python archive ``cifar-10-python.tar.gz`` in ``root``, the ONE
    data folder of every run (archive, extracted folder and ``cache/``; relative: against the
    launch directory; conf/data/ makes it the project's data/); fetched from torchvision's URL when absent and ``download``, its MD5 checked.
    50,000 train / 10,000 test images, 3x32x32, 10 classes."""
    return _official("cifar10", root, download)


def cifar100(root: str | None = None, download: bool = True) -> DataSource:
    """CIFAR-100 (its 100 fine labels), as ``cifar10``: 50,000 train / 10,000 test images."""
    return _official("cifar100", root, download)


def image_folder(path: str, root: str | None = None) -> DataSource:
    """``path``: a folder with ``train/<class>/*`` and ``test/<class>/*`` images of one size
    (possibly under one top folder), or a .tar.gz/.tgz/.tar archive of one, extracted once into
    ``<root>/<archive name without extension>/``. Class names are the sorted folder names.
    Decoded images are cached under ``<root>/cache/``, so a folder is decoded once, not per run."""
    src = image_folder_path(path)
    root_p = _data_root(root)
    return DataSource(
        "image_folder", load=lambda: load_image_folder(root_p, src), train_size=lambda: count_train(root_p, src)
    )


def synthetic(train_size: int = 512, test_size: int = 256, num_classes: int = 10, seed: int = 0) -> DataSource:
    """Learnable random patterns made in memory (no files, no network): smoke runs and tests."""
    for key, value, low in (
        ("train_size", train_size, 1),
        ("test_size", test_size, 1),
        ("num_classes", num_classes, 2),
    ):
        if not _is_int(value) or value < low:
            raise ValueError(f"data.dataset.{key}: {value!r} is not accepted; expected an int >= {low}")
    if not _is_int(seed):
        raise ValueError(f"data.dataset.seed: {seed!r} is not accepted; expected an int")
    n_train, n_test, k, s = int(train_size), int(test_size), int(num_classes), int(seed)
    return DataSource("synthetic", load=lambda: make_synthetic(n_train, n_test, k, s), train_size=lambda: n_train)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _data_root(root: str | None) -> Path:
    """``root`` resolved (relative: the launch directory's); None: the project's data/."""
    p = PROJECT_ROOT / "data" if root is None else resolve_path(root, "data.dataset.root")
    if p.exists() and not p.is_dir():
        raise ValueError(f"data.dataset.root: {p} exists but is not a folder; give a folder path")
    return p


def _official(name: str, root: str, download: bool) -> DataSource:
    root_p = _data_root(root)
    n_train = OFFICIAL[name][3]
    return DataSource(name, load=lambda: load_official(name, root_p, bool(download)), train_size=lambda: n_train)


def dataset_source(data) -> DataSource:
    """The DataSource a run's ``data`` config names (``data.dataset``: a ``_target_`` and its own
    keys): train.py, the preview, evaluate and the tests build it here."""

    with config_errors("data.dataset"):
        source = hydra.utils.instantiate(data.dataset, _convert_="all")
    if not isinstance(source, DataSource):
        target = data.dataset.get("_target_")
        raise ValueError(f"data.dataset._target_: {target} returned {type(source).__name__}; expected a DataSource")
    return source


def load_configured(data) -> Dataset:
    """The Dataset a run's ``data`` config names, read whole."""
    ds = dataset_source(data).load()
    log.debug("%s", describe(ds))  # train.py prints it once, with the validation split
    return ds


def describe(ds: Dataset, val: int = 0) -> str:
    """One line: name, split sizes (``val`` images held out of train), image size, class count
    and names, source path."""
    c, h, w = ds.train_images.shape[1:]
    names = ", ".join(ds.classes[:10]) + (", ..." if len(ds.classes) > 10 else "")
    src = f" from {ds.source}" if ds.source else ""
    held = f"{val} val / " if val else ""
    return (
        f"{ds.name or 'dataset'}: {ds.train_images.shape[0] - val} train / {held}{ds.test_images.shape[0]} "
        f"test images, {c}x{h}x{w} uint8, {len(ds.classes)} classes ({names}){src}"
    )
