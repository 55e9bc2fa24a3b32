"""Write faults on a real file system: a small tmpfs mounted by each test, filled up or remounted
read-only (tests/test_faults.py injects the same faults by patching os.fsync / os.replace).

Needs root (mount -t tmpfs); where mounting is refused every test here is skipped with the
reason. Each tmpfs is unmounted when its test ends, passed or failed. The cases (issue 13):

1. A checkpoint that does not fit: torch.save's zip writer reports a full disk as
   `RuntimeError: ... unexpected pos`; the run must end with exit 4 and one line, keep the previous
   checkpoint, and the same command must resume once there is room (the result equals a clean run).
2. metrics.jsonl on a full disk: exit 4 and one line naming it, no torn line left; a torn last line
   (as a kill, or the writer before this fix, left) is dropped on resume instead of failing it.
3. The resolved config on a full disk, and a read-only run directory: exit 4, one line.
4. results.json, a logger's file and the sweep summary on a full or read-only disk (in-process):
   a WriteFault (exit 4 in train.py) naming the file; what was written before is intact.
5. A data root too small for the extraction: exit 4, one line that says the disk under data.dataset.root
   is full, how much is needed and that nothing was left behind (never "delete the archive").
6. A data root too small for the data cache: one warning line, training goes on from memory.
7. A new cache of the same source replaces the superseded one (on a disk with room for one only).

Tiny synthetic image archives are written by the tests themselves (80 noise PNGs, ~0.3 MB).
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import subprocess
import tarfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from imgcls.io import WriteFault
from imgcls.reporting import MetricsLog
from tests.conftest import assert_same_weights, metrics, weights
from tests.test_faults import _assert_clean_error, _load, _parallel, _run, _sha, _temp_files

SMOKE = ["experiment=smoke"]
PAGE = 4096  # tmpfs allocates whole pages: sizes below are rounded up to them


# --------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_process():
    """OMP_NUM_THREADS=1 for every train.py started here: runs compared bit for bit must use the
    same thread count, and two at a time on 2 cores must not spin-wait on each other."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture
def tmpfs(tmp_path):
    """mount(name, size) -> a new tmpfs of `size` (mount's syntax: 64k, 2m) at tmp_path/name.
    Skips the test, with the reason, where mounting is refused; unmounts all of them at the end."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root: these tests fill a real file system; not root here")
    mounted = []

    def mount(name: str, size: str):
        point = tmp_path / name
        point.mkdir()
        try:
            proc = subprocess.run(
                ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(point)],
                capture_output=True,
                text=True,
                timeout=60,
            )
        except FileNotFoundError:
            pytest.skip("no `mount` command here: cannot make a real full file system")
        if proc.returncode:
            pytest.skip(f"mounting a tmpfs was refused (exit {proc.returncode}): {proc.stderr.strip()}")
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(mounted):
            if subprocess.run(["umount", str(point)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(point)], capture_output=True)  # busy: detach it


def _remount(point, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(point)], check=True, capture_output=True)


def _fill(point) -> int:
    """Write zeros into point/filler until the file system says ENOSPC; the bytes written."""
    fd = os.open(point / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    written = 0
    try:
        while True:
            written += os.write(fd, bytes(PAGE))
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return written


def _pages(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _jsonl(path) -> list[dict]:
    """Every line of a JSON-lines file, each complete (ends in a newline) and valid JSON."""
    text = path.read_text()
    assert text == "" or text.endswith("\n"), f"{path} ends in a torn line: {text[-80:]!r}"
    return [json.loads(line) for line in text.splitlines()]


def _image_archive(path, per_class=(32, 8), mtime=1_577_836_800):
    """A .tar.gz image_folder tree: tiny/{train,test}/{a,b}/NNN.png, 32x32 random-noise PNGs
    (incompressible: each takes one tmpfs page). Returns (bytes the extraction takes on a tmpfs,
    bytes of its tensor cache)."""
    rng = np.random.default_rng(0)
    extracted, images = 0, 0
    with tarfile.open(path, "w:gz") as tf:
        for split, n in zip(("train", "test"), per_class):
            for cls in ("a", "b"):
                for i in range(n):
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, "PNG")
                    info = tarfile.TarInfo(f"tiny/{split}/{cls}/{i:03d}.png")
                    info.size, info.mtime = len(buf.getvalue()), mtime
                    tf.addfile(info, io.BytesIO(buf.getvalue()))
                    extracted += _pages(info.size)
                    images += 1
    return extracted, images * (3 * 32 * 32 + 8)


def _output_lines(proc, needle: str) -> list[str]:
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if needle in ln]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A default smoke run on the ordinary disk (2 epochs, 2 checkpoints): metrics, weights and
    the size of its checkpoint (which sizes the tmpfs of the full-disk test)."""
    run = tmp_path_factory.mktemp("reference") / "run"
    proc = _run(*SMOKE, f"hydra.run.dir={run}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return SimpleNamespace(
        dir=run, metrics=metrics(run), weights=weights(run), ckpt_bytes=(run / "checkpoints" / "last.pt").stat().st_size
    )


# --------------------------------------------------------------------------------------
# 1. a checkpoint that does not fit
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_checkpoint_on_a_full_disk_exits_4_and_the_run_resumes_once_there_is_room(tmpfs, reference):
    # Room for the first checkpoint (and Hydra's small files) but not for a second one beside it:
    # the save at the end of epoch 2 writes its temp file next to last.pt and runs out of space.
    size = _pages(int(reference.ckpt_bytes * 1.5))
    disk = tmpfs("disk", str(size))
    run = disk / "run"
    last = run / "checkpoints" / "last.pt"

    full = _run(*SMOKE, f"hydra.run.dir={run}")
    line = _assert_clean_error(full, 4, f"could not save checkpoint to {last}", "No space left on device", "is intact")
    assert "unexpected pos" not in full.stderr  # torch's RuntimeError is recognised as the full disk
    assert _load(last)["state"]["step"] == 8  # epoch 1's checkpoint, complete
    assert _temp_files(run / "checkpoints") == set()
    assert not (run / "results.json").exists()
    assert [m["step"] for m in _jsonl(run / "metrics.jsonl")] == [m["step"] for m in reference.metrics]

    _remount(disk, f"size={4 * size}")  # room again: the same command resumes and ends as a clean run
    again = _run(*SMOKE, f"hydra.run.dir={run}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {last} at step 8" in again.stdout
    assert metrics(run) == reference.metrics
    assert_same_weights(weights(run), reference.weights)
    print(f"\nfull disk at the 2nd checkpoint ({reference.ckpt_bytes} B each, tmpfs {size} B): {line}")


# --------------------------------------------------------------------------------------
# 2. metrics.jsonl on a full disk; a torn last line on resume
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_metrics_on_a_full_disk_exit_4_leave_no_torn_line_and_resume_drops_one(tmp_path, tmpfs):
    # metrics.jsonl is a link to a file on a one-page tmpfs (the checkpoints stay on the big
    # disk): ~45 lines of ~90 bytes fit, the run writes 54 (6 epochs x (8 steps + 1 evaluation)).
    disk = tmpfs("disk", "4k")
    run = tmp_path / "run"
    run.mkdir()
    (disk / "metrics.jsonl").touch()
    (run / "metrics.jsonl").symlink_to(disk / "metrics.jsonl")
    cmd = [*SMOKE, "trainer.epochs=6", "trainer.log_every=1", f"hydra.run.dir={run}"]
    expected = [(8 * epoch + i, False) for epoch in range(6) for i in range(1, 9)]
    expected = sorted(expected + [(8 * e, True) for e in range(1, 7)])

    full = _run(*cmd)
    line = _assert_clean_error(
        full,
        4,
        f"could not write metrics {run / 'metrics.jsonl'}",
        "No space left on device",
        "last checkpoint is intact",
    )
    kept = _jsonl(run / "metrics.jsonl")  # no torn line: the record that did not fit was undone
    assert 30 < len(kept) < 54
    assert [(m["step"], "test_acc" in m) for m in kept] == expected[: len(kept)]
    step = _load(run / "checkpoints" / "last.pt")["state"]["step"]
    assert 0 < step <= kept[-1]["step"]

    # a kill in mid-write (or the buffered writer before this fix) leaves a torn last line
    with open(disk / "metrics.jsonl", "a") as f:
        f.write('{"s')
    _remount(disk, "size=64k")
    again = _run(*cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "dropped its torn last line '{\"s'" in again.stdout
    assert f"at step {step}" in again.stdout
    assert [(m["step"], "test_acc" in m) for m in _jsonl(run / "metrics.jsonl")] == expected
    print(f"\nmetrics.jsonl full after {len(kept)} lines: {line}")


# --------------------------------------------------------------------------------------
# 3. the resolved config on a full disk; a read-only run directory
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_config_on_a_full_disk_and_a_read_only_run_dir_exit_4(tmpfs):
    full, readonly = tmpfs("full", "256k"), tmpfs("readonly", "256k")
    for d in (full, readonly):
        (d / "config.yaml").write_text("# the config of an earlier run\n")
        (d / "checkpoints").mkdir()
    _fill(full)
    _remount(readonly, "ro")
    # Hydra's own files (.hydra/, train.log) off: Hydra would fail on them first, with its traceback
    quiet_hydra = ["hydra.output_subdir=null", "hydra/job_logging=stdout"]
    on_full, on_ro = _parallel(
        lambda: _run(*SMOKE, *quiet_hydra, f"hydra.run.dir={full}"),
        lambda: _run(*SMOKE, *quiet_hydra, f"hydra.run.dir={readonly}"),
    )
    _assert_clean_error(
        on_full,
        4,
        f"could not write the resolved config {full / 'config.yaml'}",
        "No space left on device",
        "the previous config.yaml is intact",
    )
    _assert_clean_error(on_ro, 4, f"cannot write checkpoints into {readonly / 'checkpoints'}", "Read-only file system")
    for d in (full, readonly):
        assert (d / "config.yaml").read_text() == "# the config of an earlier run\n"
        assert not list(d.glob(".*.tmp")) and not (d / "metrics.jsonl").exists()


# --------------------------------------------------------------------------------------
# 4. results.json, a logger's file, the sweep summary (in-process)
# --------------------------------------------------------------------------------------
def _write_results(disk):
    """imgcls.results.write_results on a finished run's counters (its test-split evaluation stubbed below)."""
    from imgcls.checkpoint import State

    state = State()
    state.step, state.best_acc, state.train_seconds, state.images = 16, 0.5, 1.0, 1024
    from imgcls.results import write_results

    no_val = SimpleNamespace(val=None)
    dist = SimpleNamespace(is_main=True)
    write_results(SimpleNamespace(run_dir=disk, data=no_val, state=state, device=torch.device("cpu"), dist=dist))


def test_results_on_a_full_or_read_only_disk_are_a_write_fault_and_keep_the_old_file(tmpfs, monkeypatch):
    # The file is what is tested, not the evaluation that fills it: no model, no data.
    from imgcls import results

    monkeypatch.setattr(
        results, "final_test", lambda *a: {"final_test_acc": 0.5, "final_test_loss": 1.0, "weights": "raw"}
    )
    disk = tmpfs("disk", "64k")
    _write_results(disk)
    before = (disk / "results.json").read_bytes()
    _fill(disk)
    with pytest.raises(WriteFault, match=r"could not write the results .*results\.json: No space left on device"):
        _write_results(disk)
    assert (disk / "results.json").read_bytes() == before and not list(disk.glob(".*.tmp"))
    (disk / "filler").unlink()
    _remount(disk, "ro")
    with pytest.raises(WriteFault, match="Read-only file system") as e:
        _write_results(disk)
    assert "\n" not in str(e.value) and (disk / "results.json").read_bytes() == before


def test_a_logger_file_on_a_full_disk_is_a_write_fault_naming_it(tmp_path, tmpfs):
    from imgcls.loggers import CSVLogger

    disk = tmpfs("disk", "8k")
    run = tmp_path / "run"
    run.mkdir()
    log = MetricsLog(run / "metrics.jsonl", progress=True, logger=CSVLogger(disk, num_groups=1))
    record = {"step": 1, "epoch": 0.1, "lr": [0.1], "train_loss": 2.0}
    log.write(record, echo=False)
    _fill(disk)
    with pytest.raises(WriteFault) as e:
        try:  # as in train.train(): the loop's `finally` closes the log while the fault propagates
            for step in range(2, 2000):  # ~20-byte rows until one crosses into a page the disk lacks
                log.write({**record, "step": step}, echo=False)
        finally:
            log.close()
    assert str(e.value).startswith(f"could not write the logger's file {disk / 'metrics.csv'}: No space left")
    assert "metrics.jsonl and the last checkpoint are intact" in str(e.value)
    assert _jsonl(run / "metrics.jsonl")[0] == record


def test_the_sweep_summary_on_a_full_or_read_only_disk_exits_4_with_one_line(tmpfs, capsys):
    from omegaconf import OmegaConf

    from imgcls.sweep import SweepSummary

    sweep = tmpfs("sweep", "64k")

    def job(n):
        return OmegaConf.create(
            {
                "hydra": {
                    "mode": "RunMode.MULTIRUN",
                    "runtime": {"output_dir": str(sweep / str(n))},
                    "overrides": {"task": [f"optimizer.lr=0.{n + 1}"]},
                    "sweep": {"dir": str(sweep)},
                }
            }
        )

    done = SimpleNamespace(status=SimpleNamespace(name="COMPLETED"), _return_value=0.5)
    SweepSummary().on_job_end(job(0), done)
    summary = (sweep / "summary.csv").read_text()
    assert "optimizer.lr=0.1" in summary
    (sweep / "1").mkdir()
    _fill(sweep)
    with pytest.raises(SystemExit) as e:
        SweepSummary().on_job_end(job(1), done)
    assert e.value.code == 4
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write the job status {sweep / '1' / 'status.json'}: No space left")
    assert len(err.splitlines()) == 1
    (sweep / "filler").unlink()
    _remount(sweep, "ro")
    with pytest.raises(SystemExit) as e:
        SweepSummary().on_multirun_end(job(1))
    assert e.value.code == 4
    err = capsys.readouterr().err
    assert err.startswith(f"error: could not write the sweep summary {sweep / 'summary.csv'}: Read-only file system")
    assert (sweep / "summary.csv").read_text() == summary  # the last good summary is intact


# --------------------------------------------------------------------------------------
# 5-7. the data root: extraction, the data cache, superseded caches
# --------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_full_data_root_stops_extraction_or_only_the_cache(tmp_path, tmpfs):
    archive = tmp_path / "tiny.tar.gz"
    extracted, cache = _image_archive(archive)
    digest = _sha(archive)
    no_room = tmpfs("no_room", str(_pages(extracted // 2)))  # half of the images fit
    no_cache = tmpfs("no_cache", str(_pages(extracted + cache // 2)))  # the images fit, the cache not
    data = [*SMOKE, "data=image_folder", "data.val_size=0", f"data.dataset.path={archive}"]
    stopped, cacheless = _parallel(
        lambda: _run(*data, f"data.dataset.root={no_room}", f"hydra.run.dir={tmp_path / 'run1'}"),
        lambda: _run(*data, f"data.dataset.root={no_cache}", f"hydra.run.dir={tmp_path / 'run2'}"),
    )

    line = _assert_clean_error(
        stopped,
        4,
        f"cannot extract {archive}",
        f"the disk under data.dataset.root {no_room} is full",
        "the extraction needs about",
        "the data cache about",
        "nothing was left behind",
    )
    assert "delete or replace" not in line  # the archive is good: no advice to delete it
    assert list(no_room.iterdir()) == [] and _sha(archive) == digest

    assert cacheless.returncode == 0, cacheless.stderr[-3000:]
    warned = _output_lines(cacheless, "could not write the data cache")
    assert len(warned) == 1, cacheless.stdout[-3000:] + cacheless.stderr[-3000:]
    assert "No space left on device" in warned[0] and "it needs about" in warned[0]
    assert "training on from memory" in warned[0]
    assert "Traceback" not in cacheless.stderr and "unexpected pos" not in cacheless.stdout + cacheless.stderr
    assert list((no_cache / "cache").iterdir()) == []  # no cache, no temp file
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["steps"] == 2
    print(f"\n{line}\n{warned[0]}")


def test_a_new_cache_replaces_the_superseded_one_of_the_same_source(tmp_path, tmpfs, caplog):
    from imgcls.data import image_folder

    archive = tmp_path / "tiny.tar.gz"
    extracted, cache = _image_archive(archive)
    root = tmpfs("root", str(_pages(extracted + cache * 3 // 2)))  # room for one cache, not two
    first = image_folder(str(archive), root=str(root)).load()
    (old,) = (root / "cache").glob("*.pt")

    # the same archive, re-made: its files get new mtimes, hence a new cache key
    _image_archive(archive, mtime=1_600_000_000)
    for p in sorted((root / "tiny").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (root / "tiny").rmdir()
    with caplog.at_level(logging.INFO, logger="imgcls.datastore"):
        second = image_folder(str(archive), root=str(root)).load()
    (new,) = (root / "cache").glob("*.pt")
    assert new != old and not old.exists()
    assert f"removed superseded data cache {old}" in caplog.text
    assert "could not write the data cache" not in caplog.text  # the old one's space was reused
    assert torch.equal(first.train_images, second.train_images)
