"""train.py end to end on the CPU: a smoke run, exact resume, sweeps, bad input, real data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import torch

from tests.conftest import ROOT, extract_cifar_subset, run_train, train_cmd

SMOKE = ["experiment=smoke"]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def weights(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"weights differ at {k}"


def test_smoke_run_writes_metrics_results_and_checkpoint(tmp_path):
    run = tmp_path / "run"
    run_train(*SMOKE, f"hydra.run.dir={run}")
    lines = metrics(run)
    train_lines = [m for m in lines if "train_loss" in m]
    eval_lines = [m for m in lines if "test_acc" in m]
    assert [m["step"] for m in train_lines] == list(range(2, 17, 2))  # log_every=2, 8 steps x 2 epochs
    assert all(set(m) == {"step", "epoch", "lr", "train_loss"} for m in train_lines)
    assert [m["epoch"] for m in eval_lines] == [1, 2]
    assert train_lines[-1]["lr"] == [0.0]  # warmup_linear decays to 0 at the last step
    results = json.loads((run / "results.json").read_text())
    assert results["final_test_acc"] > 0.3, "synthetic classes are easy: far above chance (0.1)"
    assert results["steps"] == 16 and results["device"] == "cpu"
    for key in ("best_test_acc", "train_seconds", "images_per_second", "wall_seconds"):
        assert results[key] is not None
    assert "steps_per_epoch: 8" in (run / "config.yaml").read_text()
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "state", "rng", "config"} <= set(ckpt)
    assert not any(k.startswith("_orig_mod") for k in ckpt["model"])
    assert ckpt["state"]["finished"] and ckpt["config"]["schedule"]["steps_per_epoch"] == 8

    again = run_train(*SMOKE, f"hydra.run.dir={run}")
    assert "already finished" in again.stdout


def _run_until_sigterm(run_dir, overrides, after_lines: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        train_cmd(*overrides, f"hydra.run.dir={run_dir}"), cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    log = run_dir / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= after_lines:
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.005)
    out, _ = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, "")


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_is_bit_identical(tmp_path):
    common = [*SMOKE, "trainer.epochs=4", "trainer.log_every=1"]
    full = tmp_path / "full"
    run_train(*common, f"hydra.run.dir={full}")

    part = tmp_path / "part"
    stopped = _run_until_sigterm(part, common, after_lines=11)
    assert stopped.returncode == 143, stopped.stdout  # 128 + SIGTERM, documented in the README
    assert "SIGTERM: checkpoint saved at step" in stopped.stdout
    state = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert 0 < state["step"] < 32 and not state["finished"]

    resumed = run_train(*common, f"hydra.run.dir={part}")
    assert f"resumed from {part / 'checkpoints' / 'last.pt'} at step {state['step']}" in resumed.stdout
    # the same lr at every step (log_every=1), the same losses and evaluations, the same weights
    assert metrics(part) == metrics(full)
    assert_same_weights(weights(part), weights(full))


@pytest.mark.slow
def test_resume_from_an_epoch_boundary_is_bit_identical(tmp_path):
    common = [*SMOKE, "trainer.epochs=4", "trainer.log_every=1", "trainer.keep_checkpoints=4"]
    full = tmp_path / "full"
    run_train(*common, f"hydra.run.dir={full}")
    epoch2 = full / "checkpoints" / "last.2.pt"  # last.pt is epoch 4, last.1 epoch 3, last.2 epoch 2
    assert torch.load(epoch2, weights_only=True)["state"]["epoch"] == 2

    other = tmp_path / "other"
    run_train(*common, f"hydra.run.dir={other}", f"resume={epoch2}")
    assert metrics(other) == [m for m in metrics(full) if m["step"] > 16]
    assert_same_weights(weights(other), weights(full))


def test_changed_structure_is_refused_on_resume(tmp_path):
    run = tmp_path / "run"
    run_train(*SMOKE, "trainer.epochs=1", f"hydra.run.dir={run}")
    refused = run_train(*SMOKE, "trainer.epochs=2", "model.width=16", f"hydra.run.dir={run}", check=False)
    assert refused.returncode != 0
    assert "differing keys: model.width" in refused.stderr
    more = run_train(*SMOKE, "trainer.epochs=2", f"hydra.run.dir={run}")  # more epochs: a safe change
    assert "config changed" in more.stdout and "trainer.epochs" in more.stdout
    assert json.loads((run / "results.json").read_text())["steps"] == 16


@pytest.mark.slow
def test_multirun_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    run_train("-m", *SMOKE, "trainer.epochs=1", "scheduler=warmup_exp,warmup_cosine", "optimizer.lr=0.1,0.05",
              f"hydra.sweep.dir={sweep}")
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 4
    for job in jobs:
        assert json.loads((job / "results.json").read_text())["steps"] == 8
    combos = set()
    for job in jobs:
        overrides = (job / ".hydra" / "overrides.yaml").read_text()
        combos.add(tuple(x for x in ("warmup_exp", "warmup_cosine", "lr=0.1", "lr=0.05") if x in overrides))
    assert len(combos) == 4
    summary = (sweep / "summary.csv").read_text().splitlines()
    assert summary[0] == ("job,overrides,status,best_val_acc,final_val_acc,final_test_acc,best_ckpt_test_acc,"
                          "best_test_acc,train_seconds,error")
    assert len(summary) == 5 and all(",completed," in row for row in summary[1:])
    assert (sweep / "summary.md").read_text().startswith("| job | overrides | status |")


@pytest.mark.slow
def test_a_failed_sweep_job_is_listed_and_does_not_stop_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", *SMOKE, "trainer.epochs=1", "optimizer.lr=-1,0.1", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1  # Hydra reports the failed job once all jobs have run
    table = proc.stdout[proc.stdout.index("| job | overrides | status |"):]  # printed at the end
    failed_row = next(line for line in table.splitlines() if line.startswith("| 0 |"))
    assert "optimizer.lr=-1" in failed_row and "| failed |" in failed_row and "(1 of 2 jobs failed)" in table
    rows = (sweep / "summary.csv").read_text().splitlines()[1:]
    assert rows[0].startswith("0,") and ",failed," in rows[0] and "optimizer.lr: -1 is not accepted" in rows[0]
    assert rows[1].startswith("1,") and ",completed," in rows[1]
    assert json.loads((sweep / "1" / "results.json").read_text())["steps"] == 8


def test_help_and_cfg_do_not_import_torch():
    proc = subprocess.run([*train_cmd("--cfg", "job")], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "scheduler:" in proc.stdout and "_target_: sched.SequentialLR" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "hydra" in imported and "torch" not in imported


def test_bad_input_in_a_real_process_exits_2_with_one_line(tmp_path):
    """The README's bad-input table runs in-process (tests/test_bad_input.py); this is one row
    through a real process: exit code 2, one `error:` line, no traceback, nothing trained."""
    proc = run_train(*SMOKE, "optimizer.lr=-0.1", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr == "error: optimizer.lr: -0.1 is not accepted; expected a finite number > 0\n"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_real_cifar10_subset_beats_chance(tmp_path):
    sub = extract_cifar_subset(tmp_path / "cifar10-sub", {"train": 500, "test": 100})
    run = tmp_path / "run"
    run_train(
        "data=image_folder", f"data.path={sub}", f"data.root={tmp_path / 'cache'}", "model.width=16",
        "trainer.device=cpu", "trainer.epochs=4", "trainer.batch_size=100", "trainer.log_every=25",
        "optimizer.lr=0.2", f"hydra.run.dir={run}", timeout=600,
    )
    acc = json.loads((run / "results.json").read_text())["final_test_acc"]
    assert acc > 0.30, f"test accuracy {acc:.3f} on 1,000 real test images; chance is 0.10"
