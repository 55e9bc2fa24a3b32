"""Tests for imgcls.data, imgcls.datastore and imgcls.loader: the data options, the dataset
readers and the device loader (CPU only, seconds)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from imgcls import data as D
from imgcls import datastore
from imgcls.data import cifar10, cifar100, image_folder, synthetic
from imgcls.datastore import DataNotFoundError
from imgcls.loader import Augment, BatchFormat, DeviceLoader
from tests.conftest import extract_cifar_subset

# --------------------------------------------------------------------------------------
# helpers: tiny archives in the official CIFAR python format
# --------------------------------------------------------------------------------------


def _md5(p: Path) -> str:
    return hashlib.md5(p.read_bytes()).hexdigest()


def _cifar_images(n: int, offset: int) -> np.ndarray:
    """uint8 [n, 3, 32, 32] with distinct values per image, channel, row and column."""
    k = np.arange(n).reshape(n, 1, 1, 1) + offset
    c = np.arange(3).reshape(1, 3, 1, 1)
    h = np.arange(32).reshape(1, 1, 32, 1)
    w = np.arange(32).reshape(1, 1, 1, 32)
    return ((k * 7 + c * 85 + h * 3 + w * 5) % 256).astype(np.uint8)


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _tar_gz(src_dir: Path, arcname: str, out: Path) -> Path:
    with tarfile.open(out, "w:gz") as tf:
        tf.add(src_dir, arcname=arcname)
    return out


def _make_cifar10(tmp_path: Path, monkeypatch) -> tuple[Path, dict]:
    """root/cifar-10-python.tar.gz holding 5 train batches of 3, a test batch of 4."""
    folder = tmp_path / "build" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    xs, ys = [], []
    for b in range(5):
        x = _cifar_images(3, offset=b * 3)
        y = [(b * 3 + i) % 10 for i in range(3)]
        _dump(
            folder / f"data_batch_{b + 1}",
            {
                "batch_label": f"training batch {b + 1} of 5",
                "labels": y,
                "data": x.reshape(3, -1),
                "filenames": [f"f{b}_{i}.png" for i in range(3)],
            },
        )
        xs.append(x)
        ys += y
    xte = _cifar_images(4, offset=100)
    yte = [9, 8, 7, 6]
    _dump(
        folder / "test_batch",
        {"batch_label": "testing batch 1 of 1", "labels": yte, "data": xte.reshape(4, -1), "filenames": ["t"] * 4},
    )
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(folder / "batches.meta", {"num_cases_per_batch": 3, "label_names": names, "num_vis": 3072})
    root = tmp_path / "root"
    root.mkdir()
    archive = _tar_gz(folder, "cifar-10-batches-py", root / "cifar-10-python.tar.gz")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", _md5(archive))
    return root, {
        "train_images": np.concatenate(xs),
        "train_labels": ys,
        "test_images": xte,
        "test_labels": yte,
        "classes": names,
    }


# --------------------------------------------------------------------------------------
# official archives
# --------------------------------------------------------------------------------------


def test_cifar10_official_archive_exact_pixels_labels_and_stats(tmp_path, monkeypatch):
    root, exp = _make_cifar10(tmp_path, monkeypatch)
    ds = cifar10(root=str(root), download=False).load()
    assert ds.train_images.dtype == torch.uint8 and ds.train_images.is_contiguous()
    assert ds.train_images.shape == (15, 3, 32, 32) and ds.test_images.shape == (4, 3, 32, 32)
    assert torch.equal(ds.train_images, torch.from_numpy(exp["train_images"]))
    assert torch.equal(ds.test_images, torch.from_numpy(exp["test_images"]))
    assert ds.train_labels.dtype == torch.int64
    assert ds.train_labels.tolist() == exp["train_labels"]
    assert ds.test_labels.tolist() == exp["test_labels"]
    assert ds.classes == exp["classes"]
    f = exp["train_images"].astype(np.float64) / 255.0
    np.testing.assert_allclose(ds.mean, f.mean(axis=(0, 2, 3)), rtol=0, atol=1e-12)
    np.testing.assert_allclose(ds.std, f.std(axis=(0, 2, 3)), rtol=0, atol=1e-9)
    assert (root / "cifar-10-batches-py" / "data_batch_5").is_file()
    caches = list((root / "cache").glob("cifar10-*.pt"))
    assert len(caches) == 1
    # second load: from the cache, same content; no temp files left behind
    ds2 = cifar10(root=str(root), download=False).load()
    assert torch.equal(ds2.train_images, ds.train_images) and ds2.mean == ds.mean
    assert sorted(p.name for p in root.iterdir()) == ["cache", "cifar-10-batches-py", "cifar-10-python.tar.gz"]
    assert [p.name for p in (root / "cache").iterdir()] == [caches[0].name]
    assert str(root) in ds.source and "cifar10" in D.describe(ds)


def test_cifar100_official_archive_fine_labels(tmp_path, monkeypatch):
    folder = tmp_path / "build" / "cifar-100-python"
    folder.mkdir(parents=True)
    xtr, xte = _cifar_images(6, 0), _cifar_images(2, 50)
    _dump(
        folder / "train",
        {
            "filenames": ["a"] * 6,
            "batch_label": "training batch 1 of 1",
            "fine_labels": [99, 0, 42, 7, 7, 1],
            "coarse_labels": [19, 0, 1, 2, 3, 4],
            "data": xtr.reshape(6, -1),
        },
    )
    _dump(
        folder / "test",
        {
            "filenames": ["b"] * 2,
            "batch_label": "testing batch 1 of 1",
            "fine_labels": [5, 98],
            "coarse_labels": [0, 1],
            "data": xte.reshape(2, -1),
        },
    )
    fine = [f"fine{i:02d}" for i in range(100)]
    _dump(folder / "meta", {"fine_label_names": fine, "coarse_label_names": [f"c{i}" for i in range(20)]})
    root = tmp_path / "root"
    archive = _tar_gz(folder, "cifar-100-python", (root.mkdir() or root) / "cifar-100-python.tar.gz")
    monkeypatch.setattr(torchvision.datasets.CIFAR100, "tgz_md5", _md5(archive))
    ds = cifar100(root=str(root), download=False).load()
    assert torch.equal(ds.train_images, torch.from_numpy(xtr))
    assert torch.equal(ds.test_images, torch.from_numpy(xte))
    assert ds.train_labels.tolist() == [99, 0, 42, 7, 7, 1]
    assert ds.test_labels.tolist() == [5, 98]
    assert ds.classes == fine


def test_tampered_archive_is_refused_and_nothing_is_created(tmp_path, monkeypatch):
    root, _ = _make_cifar10(tmp_path, monkeypatch)
    archive = root / "cifar-10-python.tar.gz"
    with open(archive, "ab") as f:
        f.write(b"tampered")
    for download in (False, True):  # never used, never silently replaced
        with pytest.raises(ValueError) as ei:
            cifar10(root=str(root), download=download).load()
        msg = str(ei.value)
        assert str(archive) in msg and "checksum" in msg and "elete" in msg
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-python.tar.gz"]


def test_absent_archive_one_clear_error(tmp_path):
    root = tmp_path / "nothing-here"
    with pytest.raises(DataNotFoundError) as ei:
        cifar10(root=str(root), download=False).load()
    assert isinstance(ei.value, FileNotFoundError)
    msg = str(ei.value)
    for s in (
        str(root / "cifar-10-python.tar.gz"),
        "data.dataset.download",
        "data.dataset.root",
        "data=image_folder",
        "experiment=smoke",
    ):
        assert s in msg, s
    assert not root.exists()


def test_failed_download_gives_the_same_clear_error(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(datastore, "download_and_extract_archive", offline)
    with pytest.raises(DataNotFoundError) as ei:
        cifar100(root=str(tmp_path), download=True).load()
    msg = str(ei.value)
    assert "no network" in msg and str(tmp_path / "cifar-100-python.tar.gz") in msg
    assert "experiment=smoke" in msg and "data=image_folder" in msg
    # downloading is what just failed: not the advice; fetching the archive elsewhere is
    assert "data.dataset.download=true" not in msg and f"copy cifar-100-python.tar.gz into {tmp_path}" in msg


def test_a_relative_root_is_resolved_against_the_launch_directory(tmp_path, monkeypatch):
    """One rule for every path: relative to where the command was launched (the cwd), "~"
    expanded; the default root (no root given, ${project_dir:data} in conf/) is the project's data/."""
    monkeypatch.chdir(tmp_path)
    rel = "no-such-data-dir-for-tests"
    with pytest.raises(DataNotFoundError) as ei:
        cifar10(root=rel, download=False).load()
    assert str(tmp_path / rel / "cifar-10-python.tar.gz") in str(ei.value)
    assert not (tmp_path / rel).exists() and not (datastore.PROJECT_ROOT / rel).exists()  # nothing created
    with pytest.raises(ValueError, match=f"^data.dataset.path: {tmp_path / 'mysub'} does not exist"):
        image_folder(path="mysub")
    assert datastore.resolve_path("~/x") == Path(os.path.expanduser("~/x"))
    assert D._data_root(None) == datastore.PROJECT_ROOT / "data"


def test_a_data_option_is_a_builder_of_its_own_keys():
    from omegaconf import OmegaConf

    from imgcls.data import dataset_source

    def data(**dataset):
        return OmegaConf.create({"dataset": dataset})

    src = dataset_source(data(_target_="imgcls.data.synthetic", train_size=96, test_size=8, seed=1))
    assert (src.name, src.train_size()) == ("synthetic", 96)
    with pytest.raises(ValueError, match=r"^data\.dataset: .*unexpected keyword argument 'path'"):
        dataset_source(data(_target_="imgcls.data.synthetic", path="x"))  # a key of another option
    with pytest.raises(ValueError, match=r"^data\.dataset\._target_: imgcls\.data\.resolve_path returned .*DataSource"):
        dataset_source(data(_target_="imgcls.data.resolve_path", value="x"))  # not a data option
    assert cifar10(root="unused-root", download=False).train_size() == 50_000  # no file read


# --------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------

H, W = 6, 8  # H != W catches transposed decoding


def _make_tree(base: Path, fmt: str = "png", n_train: int = 3, n_test: int = 2) -> dict:
    """base/{train,test}/{cat,dog}/*.<fmt>; returns the uint8 HWC arrays written."""
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for cls in ("dog", "cat"):  # written out of order: classes must come back sorted
            d = base / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
                Image.fromarray(a).save(d / f"{i:03d}.{fmt}")
                out[(split, cls, i)] = a
    return out


def _expected(arrs: dict, split: str) -> torch.Tensor:
    keys = sorted(k for k in arrs if k[0] == split)  # cat before dog, then file order
    return torch.from_numpy(np.stack([arrs[k] for k in keys])).permute(0, 3, 1, 2)


def test_image_folder_png_exact(tmp_path):
    arrs = _make_tree(tmp_path / "tree")
    source = image_folder(str(tmp_path / "tree"), root=str(tmp_path / "root"))
    assert source.train_size() == 6  # listed, not decoded
    ds = source.load()
    assert ds.classes == ["cat", "dog"]
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1] and ds.test_labels.tolist() == [0, 0, 1, 1]
    assert ds.train_images.shape == (6, 3, H, W) and ds.train_images.is_contiguous()
    assert torch.equal(ds.train_images, _expected(arrs, "train"))
    assert torch.equal(ds.test_images, _expected(arrs, "test"))
    assert len(ds.mean) == 3 and all(0 < s < 1 for s in ds.std)


def test_image_folder_jpeg(tmp_path):
    arrs = _make_tree(tmp_path / "tree", fmt="jpg")
    ds = image_folder(str(tmp_path / "tree"), root=str(tmp_path / "root")).load()
    assert ds.train_images.shape == (6, 3, H, W) and ds.train_images.dtype == torch.uint8
    assert ds.train_labels.tolist() == [0, 0, 0, 1, 1, 1]
    # JPEG is lossy: close to, not equal with, what was written
    diff = (ds.train_images.float() - _expected(arrs, "train").float()).abs().mean()
    assert diff < 60


@pytest.mark.parametrize("suffix,mode", [(".tar.gz", "w:gz"), (".tar", "w")])
def test_image_folder_archive_extracted_once(tmp_path, monkeypatch, suffix, mode):
    arrs = _make_tree(tmp_path / "build" / "mytree")
    archive = tmp_path / f"images{suffix}"
    with tarfile.open(archive, mode) as tf:
        tf.add(tmp_path / "build" / "mytree", arcname="mytree")  # under a single top folder
    root = tmp_path / "root"
    source = image_folder(str(archive), root=str(root))
    assert source.train_size() == 6 and not root.exists()  # counted from the member list: nothing written
    ds = source.load()
    assert (root / "images" / "mytree" / "train" / "cat").is_dir()
    assert source.train_size() == len(ds.train_labels) == 6  # counted in the extracted folder
    assert torch.equal(ds.train_images, _expected(arrs, "train"))
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp folders left

    def no_extract(*a, **k):
        raise AssertionError("extracted twice")

    monkeypatch.setattr(datastore, "_extract_atomic", no_extract)
    ds2 = image_folder(str(archive), root=str(root)).load()
    assert torch.equal(ds2.test_images, ds.test_images)


def test_image_folder_archive_with_dotdot_member_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        payload = b"x"
        info = tarfile.TarInfo("../escape.txt")
        info.size = len(payload)
        tf.addfile(info, io.BytesIO(payload))
    root = tmp_path / "root"
    with pytest.raises(ValueError, match=r"\.\./escape\.txt"):
        image_folder(str(archive), root=str(root)).load()
    assert not (tmp_path / "escape.txt").exists() and not (root / "evil").exists()


def test_image_folder_mixed_sizes_names_file_and_sizes(tmp_path):
    _make_tree(tmp_path / "tree")
    bad = tmp_path / "tree" / "train" / "dog" / "001.png"
    Image.fromarray(np.zeros((5, 9, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError) as ei:
        image_folder(str(tmp_path / "tree"), root=str(tmp_path / "root")).load()
    msg = str(ei.value)
    assert str(bad) in msg and "9x5" in msg and f"{W}x{H}" in msg


def test_image_folder_mixed_sizes_across_splits(tmp_path):
    _make_tree(tmp_path / "tree")
    bad = tmp_path / "tree" / "test" / "cat" / "000.png"
    Image.fromarray(np.zeros((7, 7, 3), np.uint8)).save(bad)
    with pytest.raises(ValueError, match=str(bad).replace(".", r"\.")):
        image_folder(str(tmp_path / "tree"), root=str(tmp_path / "root")).load()


def test_image_folder_non_image_file_names_it(tmp_path):
    _make_tree(tmp_path / "tree")
    bad = tmp_path / "tree" / "train" / "cat" / "notes.txt"
    bad.write_text("not an image")
    with pytest.raises(ValueError) as ei:
        image_folder(str(tmp_path / "tree"), root=str(tmp_path / "root")).load()
    assert str(bad) in str(ei.value)
    assert not (tmp_path / "root" / "cache").exists() or not list((tmp_path / "root" / "cache").iterdir())


def test_image_folder_empty_class_folder_names_it(tmp_path):
    _make_tree(tmp_path / "tree")
    empty = tmp_path / "tree" / "train" / "emu"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty class folder") as ei:
        image_folder(str(tmp_path / "tree"), root=str(tmp_path / "root")).load()
    assert str(empty) in str(ei.value)


def test_image_folder_test_classes_must_match(tmp_path):
    _make_tree(tmp_path / "tree")
    (tmp_path / "tree" / "test" / "dog").rename(tmp_path / "tree" / "test" / "wolf")
    with pytest.raises(ValueError, match="same class names"):
        image_folder(str(tmp_path / "tree"), root=str(tmp_path / "root")).load()


def test_image_folder_missing_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(ValueError) as ei:
        image_folder(str(missing), root=str(tmp_path / "root"))
    assert "data.dataset.path" in str(ei.value) and str(missing) in str(ei.value)
    with pytest.raises(ValueError, match="data.dataset.path"):
        image_folder(None, root=str(tmp_path / "root"))


def test_image_folder_cache_written_once_reused_and_invalidated(tmp_path, monkeypatch):
    _make_tree(tmp_path / "tree")
    root, tree = tmp_path / "root", tmp_path / "tree"
    ds1 = image_folder(str(tree), root=str(root)).load()
    caches = list((root / "cache").glob("image_folder-*.pt"))
    assert len(caches) == 1
    stamp = caches[0].stat().st_mtime_ns

    real_open = Image.open

    def no_decode(*a, **k):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(Image, "open", no_decode)
    ds2 = image_folder(str(tree), root=str(root)).load()
    assert torch.equal(ds2.train_images, ds1.train_images) and ds2.classes == ds1.classes
    assert ds2.mean == ds1.mean and ds2.std == ds1.std
    assert caches[0].stat().st_mtime_ns == stamp

    # a changed file changes the key: decoded again, into a new cache file that replaces the
    # superseded one of the same source (issue 13: they used to pile up, one per re-extraction)
    monkeypatch.setattr(Image, "open", real_open)
    f = tree / "train" / "cat" / "000.png"
    os.utime(f, ns=(f.stat().st_atime_ns, f.stat().st_mtime_ns + 10**9))
    image_folder(str(tree), root=str(root)).load()
    now = list((root / "cache").glob("image_folder-*.pt"))
    assert len(now) == 1 and now != caches
    # another source keeps its own cache beside it
    other = tmp_path / "other"
    _make_tree(other)
    image_folder(str(other), root=str(root)).load()
    assert len(list((root / "cache").glob("image_folder-*.pt"))) == 2


# --------------------------------------------------------------------------------------
# synthetic
# --------------------------------------------------------------------------------------


def test_synthetic_deterministic_shapes_fast_and_learnable():
    a = synthetic(512, 256, num_classes=10, seed=3).load()
    b = synthetic(512, 256, num_classes=10, seed=3).load()
    c = synthetic(512, 256, num_classes=10, seed=4).load()
    assert a.train_images.shape == (512, 3, 32, 32) and a.test_images.shape == (256, 3, 32, 32)
    assert a.train_images.dtype == torch.uint8 and a.train_labels.dtype == torch.int64
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images, c.train_images)
    assert len(a.classes) == 10 and torch.bincount(a.train_labels).tolist() == [52] * 2 + [51] * 8
    # nearest class mean (a few lines of linear algebra) is far above chance (10%)
    xtr, xte = a.train_images.flatten(1).float(), a.test_images.flatten(1).float()
    means = torch.stack([xtr[a.train_labels == k].mean(0) for k in range(10)])
    acc = (torch.cdist(xte, means).argmin(1) == a.test_labels).float().mean().item()
    assert acc > 0.9


def test_synthetic_bad_config():
    with pytest.raises(ValueError, match=r"data\.dataset\.test_size: 0 is not accepted; expected an int >= 1"):
        synthetic(10, 0)
    with pytest.raises(ValueError, match=r"data\.dataset\.num_classes: 1 is not accepted"):
        synthetic(512, 256, num_classes=1)


# --------------------------------------------------------------------------------------
# DeviceLoader
# --------------------------------------------------------------------------------------

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _ids_data(n: int, h: int = 8, w: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3, h, w), generator=g, dtype=torch.uint8)
    return x, torch.arange(n)  # label = image id


def _norm(u8: torch.Tensor) -> torch.Tensor:
    m = torch.tensor(MEAN).view(-1, 3, 1, 1)
    s = torch.tensor(STD).view(-1, 3, 1, 1)
    return (u8.float() / 255 - m) / s


def _batches(loader, epoch, start=0):
    return [(x.clone(), y.clone()) for x, y in loader.epoch_batches(epoch, start_batch=start)]


def test_eval_loader_all_images_in_order_normalised():
    x, y = _ids_data(50)
    ld = DeviceLoader(x, y, 8, "cpu", BatchFormat(MEAN, STD))
    assert len(ld) == 7
    bs = _batches(ld, 0)
    assert [b[0].shape[0] for b in bs] == [8] * 6 + [2]
    xs, ys = torch.cat([b[0] for b in bs]), torch.cat([b[1] for b in bs])
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64
    assert torch.equal(ys, y)
    torch.testing.assert_close(xs, _norm(x), rtol=0, atol=1e-5)


def test_loader_dtype_and_channels_last():
    x, y = _ids_data(16)
    for train in (True, False):
        ld = DeviceLoader(
            x,
            y,
            4,
            torch.device("cpu"),
            BatchFormat(MEAN, STD, channels_last=True, dtype=torch.bfloat16),
            Augment() if train else None,
        )
        xb, yb = next(iter(ld.epoch_batches(0)))
        assert xb.dtype == torch.bfloat16 and xb.shape == (4, 3, 8, 10)
        assert xb.is_contiguous(memory_format=torch.channels_last)
        assert yb.dtype == torch.int64


def test_train_loader_same_seed_epoch_same_batches_regardless_of_history():
    x, y = _ids_data(50)
    a = DeviceLoader(x, y, 8, "cpu", BatchFormat(MEAN, STD), Augment(seed=7))
    b = DeviceLoader(x, y, 8, "cpu", BatchFormat(MEAN, STD), Augment(seed=7))
    assert len(a) == 6
    _batches(b, 0), _batches(b, 5)  # b has a different history
    ea, eb = _batches(a, 3), _batches(b, 3)
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(ea, eb))
    e4 = _batches(a, 4)
    assert not torch.equal(torch.cat([p[1] for p in ea]), torch.cat([p[1] for p in e4]))
    c = DeviceLoader(x, y, 8, "cpu", BatchFormat(MEAN, STD), Augment(seed=8))
    assert not torch.equal(torch.cat([p[1] for p in ea]), torch.cat([p[1] for p in _batches(c, 3)]))


def test_resume_mid_epoch_equals_tail_of_full_epoch():
    x, y = _ids_data(50)
    ld = DeviceLoader(x, y, 8, "cpu", BatchFormat(MEAN, STD), Augment(seed=1))
    full = _batches(ld, 2)
    for k in (0, 1, 4, 6):
        tail = _batches(ld, 2, start=k)
        assert len(tail) == len(full) - k
        assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(tail, full[k:]))
    with pytest.raises(AssertionError):  # the checkpoint's own counter: an invariant
        ld.epoch_batches(2, start_batch=7)


def test_every_train_image_once_per_epoch():
    x, y = _ids_data(48)
    ld = DeviceLoader(x, y, 8, "cpu", BatchFormat(MEAN, STD), Augment(seed=0))
    for epoch in range(3):
        ys = torch.cat([b[1] for b in _batches(ld, epoch)])
        assert sorted(ys.tolist()) == list(range(48))
    x, y = _ids_data(50)
    dl = DeviceLoader(x, y, 8, "cpu", BatchFormat(MEAN, STD), Augment(drop_last=True))
    ys = torch.cat([b[1] for b in _batches(dl, 0)])
    assert len(ys) == 48 and len(set(ys.tolist())) == 48
    nd = DeviceLoader(x, y, 8, "cpu", BatchFormat(MEAN, STD), Augment(drop_last=False))
    assert len(nd) == 7
    assert sorted(torch.cat([b[1] for b in _batches(nd, 0)]).tolist()) == list(range(50))


def test_no_augmentation_train_is_a_pure_shuffle():
    x, y = _ids_data(24)
    ld = DeviceLoader(x, y, 8, "cpu", BatchFormat(MEAN, STD), Augment(crop_padding=0, flip=False))
    for xb, yb in ld.epoch_batches(1):
        torch.testing.assert_close(xb, _norm(x[yb]), rtol=0, atol=1e-5)


def test_crops_and_flips_match_per_image_reference():
    x, y = _ids_data(64, h=8, w=10)
    p = 3
    ld = DeviceLoader(x, y, 32, "cpu", BatchFormat(MEAN, STD), Augment(seed=5, crop_padding=p))
    plan = ld.epoch_plan(4)
    assert plan["dx"].min() >= -p and plan["dx"].max() <= p
    assert {-p, p} <= set(plan["dx"].tolist()) and {-p, p} <= set(plan["dy"].tolist())
    assert 0 < plan["flip"].sum() < 64
    for b, (xb, yb) in enumerate(ld.epoch_batches(4)):
        ids = plan["perm"][b * 32 : (b + 1) * 32]
        assert torch.equal(yb, ids)
        for i, k in enumerate(ids.tolist()):  # slow reference: pad, slice, flip one image
            padded = F.pad(x[k : k + 1].float(), (p, p, p, p), mode="reflect")[0]
            dx, dy = int(plan["dx"][k]), int(plan["dy"][k])
            crop = padded[:, p + dy : p + dy + 8, p + dx : p + dx + 10]
            if plan["flip"][k]:
                crop = crop.flip(-1)
            torch.testing.assert_close(xb[i], _norm(crop.to(torch.uint8))[0], rtol=0, atol=1e-5)


def test_alternating_flip():
    x, y = _ids_data(41)
    ld = DeviceLoader(x, y, 41, "cpu", BatchFormat(MEAN, STD), Augment(seed=2, crop_padding=0, alternating_flip=True))

    def flipped(epoch):  # observed on the actual batches
        ((xb, yb),) = _batches(ld, epoch)
        same = (xb - _norm(x[yb])).abs().amax(dim=(1, 2, 3)) < 1e-5
        mirrored = (xb - _norm(x[yb].flip(-1))).abs().amax(dim=(1, 2, 3)) < 1e-5
        assert torch.all(same ^ mirrored)
        out = torch.empty(41, dtype=torch.bool)
        out[yb] = mirrored
        return out

    f = [flipped(e) for e in range(4)]
    assert int(f[0].sum()) == 20
    assert torch.equal(f[1], ~f[0]) and torch.equal(f[3], ~f[2])
    assert not torch.equal(f[0], f[2])
    assert torch.equal(flipped(2), f[2])


def test_loader_asserts_its_invariants():
    """The config is validated where it enters (train.py refuses a batch larger than the data, a
    crop_padding as large as the image: docs/bad-input.md); the loader only asserts."""
    x, y = _ids_data(10)
    for bad in (
        lambda: DeviceLoader(x, y, 0, "cpu", BatchFormat(MEAN, STD)),
        lambda: DeviceLoader(x, y, 11, "cpu", BatchFormat(MEAN, STD), Augment()),
        lambda: DeviceLoader(x, y, 2, "cpu", BatchFormat(MEAN, STD), Augment(crop_padding=8)),
        lambda: DeviceLoader(x, y, 2, "cpu", BatchFormat(MEAN[:2], STD), Augment()),
        lambda: DeviceLoader(x.float(), y, 2, "cpu", BatchFormat(MEAN, STD), Augment()),
        lambda: DeviceLoader(x, y[:5], 2, "cpu", BatchFormat(MEAN, STD), Augment()),
    ):
        with pytest.raises(AssertionError):
            bad()
    assert len(DeviceLoader(x, y, 10, "cpu", BatchFormat(MEAN, STD), Augment(crop_padding=7))) == 1


# --------------------------------------------------------------------------------------
# real data (the shared JPEG copy of CIFAR-10), on a subset
# --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_real_cifar10_jpeg_subset(tmp_path):
    sub = extract_cifar_subset(tmp_path / "cifar10-sub", {"train": 200, "test": 100})
    ds = image_folder(str(sub), root=str(tmp_path)).load()
    assert ds.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert ds.train_images.shape == (2000, 3, 32, 32) and ds.test_images.shape == (1000, 3, 32, 32)
    assert torch.bincount(ds.train_labels).tolist() == [200] * 10
    assert torch.bincount(ds.test_labels).tolist() == [100] * 10
    # the well-known CIFAR-10 channel statistics, roughly (a 2,000-image JPEG subset)
    np.testing.assert_allclose(ds.mean, (0.491, 0.482, 0.447), atol=0.03)
    np.testing.assert_allclose(ds.std, (0.247, 0.243, 0.262), atol=0.03)
