"""imgcls.runlock: one process per run directory, released however the holder ends."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from imgcls.runlock import RunDirBusy, RunLock

HOLD = "import sys, time; from imgcls.runlock import RunLock; RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"


def hold_in_child(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_second_holder_refused_with_pid_then_free_after_sigkill(tmp_path):
    proc = hold_in_child(tmp_path)
    try:
        with pytest.raises(RunDirBusy, match=rf"in use by another training process \(PID {proc.pid}\)"):
            RunLock(tmp_path).acquire()
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    with RunLock(tmp_path) as lock:  # the kernel dropped the dead holder's lock
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
        assert lock.fd is not None
    RunLock(tmp_path).acquire().release()  # released on exit of the with block


def test_lock_in_same_process_is_exclusive(tmp_path):
    first = RunLock(tmp_path).acquire()
    with pytest.raises(RunDirBusy, match="hydra.run.dir"):
        RunLock(tmp_path).acquire()  # flock locks belong to open file descriptions
    first.release()


def test_remove_if_unused_only_removes_startup_leftovers(tmp_path):
    from imgcls.runlock import remove_if_unused

    fresh = tmp_path / "fresh"
    (fresh / ".hydra").mkdir(parents=True)
    (fresh / ".hydra" / "config.yaml").write_text("a: 1\n")
    (fresh / "checkpoints").mkdir()
    (fresh / "train.log").write_text("")
    assert remove_if_unused(fresh) and not fresh.exists()

    for extra in ("checkpoints/last.pt", "metrics.jsonl", "notes.txt"):
        kept = tmp_path / extra.replace("/", "_")
        (kept / "checkpoints").mkdir(parents=True)
        (kept / extra).write_text("x")
        assert not remove_if_unused(kept) and (kept / extra).exists()


def _files(run_dir) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_refused_start_leaves_every_file_of_the_run_dir_as_it_was(tmp_path):
    """A changed config (refused by the resume check) and a second process (refused by the run
    lock) change no file of an existing run directory: config.yaml and .hydra/ are written only
    once the process holds the lock and its config was accepted."""
    from tests.conftest import run_train

    run = tmp_path / "run"
    smoke = ["experiment=smoke", "trainer.epochs=1", f"hydra.run.dir={run}"]
    run_train(*smoke)
    before = _files(run)
    assert {"config.yaml", ".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"} <= set(before)
    assert b"width: 8" in before[".hydra/config.yaml"] and b"trainer.epochs=1" in before[".hydra/overrides.yaml"]

    changed = run_train(*smoke, "model.width=16", "optimizer=adamw", check=False)
    assert changed.returncode == 2 and changed.stderr.startswith("error: resume:"), changed.stderr
    assert _files(run) == before

    lock = RunLock(run).acquire()  # as a run in progress holds it
    try:
        before = _files(run)
        busy = run_train(*smoke, "trainer.epochs=2", check=False)
    finally:
        lock.release()
    assert busy.returncode == 2 and "is in use by another training process" in busy.stderr, busy.stderr
    assert _files(run) == before
