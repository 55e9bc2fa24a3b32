"""Atomic save, rotation, safe load, fallback, RNG capture and unwrapping (CPU, fast)."""

import errno
import os
import pickle
import random
import re

import pytest
import torch
from torch import nn

import imgcls.checkpoint as ckpt
from imgcls.checkpoint import (
    CheckpointError,
    backup_path,
    find_resumable,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from imgcls.distributed import unwrap_model


def _leftover_tmp(directory):
    return [p.name for p in directory.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def _small_state(tag: int) -> dict:
    return {"tag": tag, "weights": torch.full((4,), float(tag))}


def test_round_trip_weights_only(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()  # creates momentum buffers in the optimizer state
    state = {
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "epoch": 3,
        "best_acc": 0.875,
        "run_name": "resnet9-cifar10",
        "history": [[1, 0.5], [2, 0.25, [None, True]]],
        "rng": rng_state(),
    }
    path = tmp_path / "ckpt" / "last.pt"  # parent is created on demand
    assert save_checkpoint(state, path) == path
    assert _leftover_tmp(path.parent) == []
    # the plain torch API with weights_only=True accepts it too
    torch.load(path, weights_only=True)
    loaded = load_checkpoint(path)
    assert loaded.keys() == state.keys()
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v)
    assert loaded["epoch"] == 3 and loaded["best_acc"] == 0.875 and loaded["run_name"] == "resnet9-cifar10"
    assert loaded["history"] == state["history"]
    assert loaded["rng"]["python"] == state["rng"]["python"]
    assert torch.equal(loaded["rng"]["torch"], state["rng"]["torch"])
    opt2 = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    opt2.load_state_dict(loaded["optimizer"])
    for p in model.parameters():
        assert torch.equal(opt2.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


def test_truncated_file_is_rejected(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_small_state(1), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="last.pt"):
        load_checkpoint(path)


def test_garbage_missing_and_non_dict_are_rejected(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        load_checkpoint(garbage)
    with pytest.raises(CheckpointError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    not_dict = tmp_path / "list.pt"
    torch.save([1, 2, 3], not_dict)
    with pytest.raises(CheckpointError, match="list.pt.*list"):
        load_checkpoint(not_dict)


class _Payload:
    """Unpickling this calls open(marker, 'w'): harmless, but proves code execution."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_code_executing_pickle_is_refused(tmp_path, writer):
    # Sanity: the payload really is live under an unrestricted unpickler.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe))).close()
    assert probe.exists()

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"model": _Payload(marker)}
    if writer == "pickle":
        with open(path, "wb") as f:
            # protocol 2 (torch's own): newer protocols are refused for their FRAME opcode
            # before the payload is reached, which would not test the global check.
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="evil.pt") as info:
        load_checkpoint(path)
    assert "Unsupported global" in str(info.value)  # refused for the right reason
    assert not marker.exists()


def test_keep_3_rotation(tmp_path):
    path = tmp_path / "last.pt"
    for tag in range(1, 6):
        save_checkpoint(_small_state(tag), path, keep=3)
    assert load_checkpoint(path)["tag"] == 5
    assert backup_path(path, 1).name == "last.1.pt"
    assert load_checkpoint(tmp_path / "last.1.pt")["tag"] == 4
    assert load_checkpoint(tmp_path / "last.2.pt")["tag"] == 3
    assert not (tmp_path / "last.3.pt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.1.pt", "last.2.pt", "last.pt"]


def test_stale_temp_files_of_this_checkpoint_go_and_others_stay(tmp_path):
    """A save killed mid-write (SIGKILL) leaves .last.pt.<random>.tmp (and .bak.tmp): the next
    save of last.pt removes them; a temp file of another checkpoint or program is left alone."""
    stale = [tmp_path / ".last.pt.abc123.tmp", tmp_path / ".last.pt.def456.bak.tmp"]
    others = [tmp_path / ".other.pt.abc123.tmp", tmp_path / "notes.tmp", tmp_path / ".last.pt.tmp.keep"]
    for p in stale + others:
        p.write_bytes(b"partial")
    save_checkpoint(_small_state(1), tmp_path / "last.pt", keep=2)
    save_checkpoint(_small_state(2), tmp_path / "last.pt", keep=2)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in others)
    assert load_checkpoint(tmp_path / "last.pt")["tag"] == 2


def test_temp_file_is_fsynced_before_it_replaces_the_checkpoint(tmp_path, monkeypatch):
    """Without the fsync a crash after the rename can leave last.pt empty (the rename reached
    the disk, the data did not): the temp file's own fd is fsync'ed before os.replace."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", os.path.basename(str(src)), os.path.basename(str(dst))))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(ckpt.os, "fsync", fsync)
    monkeypatch.setattr(ckpt.os, "replace", replace)
    save_checkpoint(_small_state(1), tmp_path / "last.pt")
    final = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == "last.pt")
    tmp_name = events[final][1]
    assert tmp_name.startswith(".last.pt.") and tmp_name.endswith(".tmp")
    assert ("fsync", tmp_name) in events[:final], events


@pytest.mark.parametrize("writer", ["checkpoint", "text"])
def test_writers_fsync_the_file_before_the_rename_and_the_folder_after_it(tmp_path, monkeypatch, writer):
    """save_checkpoint and write_text_atomic (results.json, config.yaml, the sweep summary): the
    temp file's data reach the disk before it is renamed onto the target (else a crash can leave an
    empty file under the name), and the folder is fsync'ed after the rename (the rename itself)."""
    from imgcls.io import write_text_atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst, *a, **k):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / ("last.pt" if writer == "checkpoint" else "results.json")
    for n in (1, 2):  # a new file, then one replaced
        events.clear()
        if writer == "checkpoint":
            save_checkpoint(_small_state(n), target)
        else:
            write_text_atomic(target, f"{n}\n", "the results")
        final = next(i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(target))
        tmp_name = events[final][1]
        assert os.path.basename(tmp_name).startswith(f".{target.name}.") and tmp_name.endswith(".tmp")
        assert ("fsync", tmp_name) in events[:final], events
        assert ("fsync", str(tmp_path)) in events[final + 1 :], events


def test_keep_1_writes_no_backups(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_small_state(1), path)
    save_checkpoint(_small_state(2), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert load_checkpoint(path)["tag"] == 2


@pytest.mark.parametrize("keep", [1, 3])
def test_disk_full_during_write_keeps_previous(tmp_path, monkeypatch, keep):
    path = tmp_path / "last.pt"
    save_checkpoint(_small_state(1), path, keep=keep)
    save_checkpoint(_small_state(2), path, keep=keep)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def full_disk_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk_save)
    with pytest.raises(OSError) as info:
        save_checkpoint(_small_state(3), path, keep=keep)
    assert info.value.errno == errno.ENOSPC
    assert str(path) in str(info.value) and "intact" in str(info.value)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert _leftover_tmp(tmp_path) == []


@pytest.mark.parametrize("keep", [1, 3])
def test_replace_refused_keeps_previous(tmp_path, monkeypatch, keep):
    path = tmp_path / "last.pt"
    save_checkpoint(_small_state(1), path, keep=keep)
    before = path.read_bytes()

    def read_only_replace(src, dst):
        raise PermissionError(errno.EACCES, "Permission denied", str(dst))

    monkeypatch.setattr(ckpt.os, "replace", read_only_replace)
    with pytest.raises(OSError) as info:
        save_checkpoint(_small_state(2), path, keep=keep)
    monkeypatch.undo()
    assert info.value.errno == errno.EACCES
    assert str(path) in str(info.value) and "intact" in str(info.value)
    assert path.read_bytes() == before
    assert _leftover_tmp(tmp_path) == []
    assert load_checkpoint(path)["tag"] == 1


def test_unpicklable_state_raises_runtime_error(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(_small_state(1), path)
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="intact"):
        save_checkpoint({"fn": lambda: None}, path)
    assert path.read_bytes() == before
    assert _leftover_tmp(tmp_path) == []


def test_uncreatable_parent_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="cannot create checkpoint directory"):
        save_checkpoint(_small_state(1), blocker / "sub" / "last.pt")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True])
def test_bad_keep(tmp_path, bad):
    with pytest.raises(ValueError, match="keep"):
        save_checkpoint(_small_state(1), tmp_path / "last.pt", keep=bad)
    with pytest.raises(ValueError, match="keep"):
        find_resumable(tmp_path / "last.pt", keep=bad)


def test_find_resumable(tmp_path):
    path = tmp_path / "last.pt"
    assert find_resumable(path, keep=3) is None
    for tag in (1, 2, 3):
        save_checkpoint(_small_state(tag), path, keep=3)
    state, found = find_resumable(path, keep=3)
    assert found == path and state["tag"] == 3

    path.write_bytes(path.read_bytes()[:50])  # corrupt last.pt
    with pytest.warns(UserWarning, match="last.pt"):
        state, found = find_resumable(path, keep=3)
    assert found == tmp_path / "last.1.pt" and state["tag"] == 2

    (tmp_path / "last.1.pt").write_bytes(b"junk")
    (tmp_path / "last.2.pt").write_bytes(b"junk")
    with pytest.warns(UserWarning), pytest.raises(CheckpointError) as info:
        find_resumable(path, keep=3)
    assert all(name in str(info.value) for name in ("last.pt", "last.1.pt", "last.2.pt"))


def test_rng_round_trip_through_file(tmp_path):
    random.seed(123)
    torch.manual_seed(123)
    random.gauss(0, 1)  # leaves a cached gauss_next in the python state
    path = tmp_path / "rng.pt"
    save_checkpoint({"rng": rng_state()}, path)
    expected_torch = torch.rand(5)
    expected_py = [random.random() for _ in range(5)] + [random.gauss(0, 1)]

    torch.manual_seed(999)
    random.seed(999)
    set_rng_state(load_checkpoint(path)["rng"])
    assert torch.equal(torch.rand(5), expected_torch)
    assert [random.random() for _ in range(5)] + [random.gauss(0, 1)] == expected_py
    if not torch.cuda.is_available():
        assert "cuda" not in rng_state()


def test_set_rng_state_ignores_cuda_without_cuda_and_checks_keys():
    state = rng_state()
    if not torch.cuda.is_available():
        state["cuda"] = [torch.zeros(16, dtype=torch.uint8)]
        set_rng_state(state)  # no error
    with pytest.raises(ValueError, match="'torch'"):
        set_rng_state({"python": state["python"]})


def test_unwrap_compiled_and_data_parallel():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    compiled = torch.compile(model)
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    assert unwrap_model(compiled) is model
    assert not any("_orig_mod" in k for k in unwrap_model(compiled).state_dict())
    assert unwrap_model(torch.compile(nn.DataParallel(model))) is model
    assert unwrap_model(model) is model


def test_what_a_checkpoint_holds_is_written_and_read_in_one_place(tmp_path):
    """checkpoint.contents writes every entry a checkpoint has, checkpoint.restore reads back
    every entry but the ones only other tools read (the config: checked, data_info: evaluate)."""
    import inspect

    import train
    from imgcls import checkpoint
    from imgcls.checkpoint import State, contents, restore
    from tests.conftest import build_recipe

    cfg, device, data, model, optimizer, scheduler = build_recipe("experiment=smoke", "trainer.ema_decay=0.9")
    extras = train.build_extras(cfg, model, device, data)
    run = train.Run(cfg, tmp_path, device, None, data, model, optimizer, scheduler, extras)
    run.state = State()
    run.state.step = 5
    ckpt = contents(run)
    written = {"model", "optimizer", "scheduler", "state", "rng", "config", "config_unresolved"}
    assert set(ckpt) == written | {"scaler", "averaging", "data_info"}
    read = set(re.findall(r'ckpt(?:\.get\()?\[?"(\w+)"', inspect.getsource(restore)))
    assert read == set(ckpt) - {"config", "config_unresolved", "data_info"}
    assert "ckpt = contents(run)" in inspect.getsource(checkpoint._save)  # the writer uses it
    torch.save(ckpt, tmp_path / "c.pt")
    again = torch.load(tmp_path / "c.pt", weights_only=True)
    assert restore(run, again, tmp_path / "c.pt").step == 5
