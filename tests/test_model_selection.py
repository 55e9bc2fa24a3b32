"""train.py end to end on the CPU for issue 11: the validation split, best.pt, evaluate/predict on a
real run, EMA/SWA and fp16 in the bit-exact resume, and the "no lost progress" behaviours."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from tests.conftest import ROOT, run_module, run_recipe, run_recipe_until_sigterm, run_train, train_cmd

SMOKE_VAL = ["experiment=smoke", "data.val_size=64"]  # 448 train images: 7 steps of 64 per epoch


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ckpt(run_dir, name="last.pt"):
    return torch.load(run_dir / "checkpoints" / name, weights_only=True)


def assert_same_tensors(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


def evaluate_cli(*args):
    return run_module("imgcls.evaluate", *args)


@pytest.mark.slow
def test_val_split_best_checkpoint_and_evaluate_equals_results(tmp_path):
    run = tmp_path / "run"
    proc = run_train(*SMOKE_VAL, "trainer.progress=true", f"hydra.run.dir={run}")
    out = proc.stdout
    assert out.count("synthetic: ") == 1, out  # the dataset line once
    assert "448 train / 64 val / 256 test" in out
    assert "it/s]" in proc.stderr or "step/s]" in proc.stderr  # the bar...
    assert out.count("val_acc=") == 2 and "train_loss=" not in out  # ...and a line per evaluation
    evals = [m for m in metrics(run) if "val_acc" in m]
    assert [m["epoch"] for m in evals] == [1, 2]
    assert not any("test_acc" in m for m in metrics(run))  # the test split is not read during training
    results = json.loads((run / "results.json").read_text())
    best = max(evals, key=lambda m: m["val_acc"])  # the first of equal ones
    assert results["best_val_acc"] == best["val_acc"] and results["best_epoch"] == best["epoch"]
    assert results["final_val_acc"] == evals[-1]["val_acc"]
    assert ckpt(run, "best.pt")["state"]["epoch"] == best["epoch"]
    if best["epoch"] == 2:
        assert results["best_ckpt_test_acc"] == results["final_test_acc"]

    evaluate_cli(f"checkpoint={run / 'checkpoints' / 'last.pt'}", f"out={tmp_path / 'e1'}")
    last = json.loads((tmp_path / "e1" / "metrics.json").read_text())
    assert last["acc"] == results["final_test_acc"] and last["split"] == "test"
    assert last["loss"] == pytest.approx(results["final_test_loss"], rel=1e-6)
    default = evaluate_cli(f"checkpoint={run}", "split=val").stdout  # a run dir: its best.pt
    assert "best.pt" in default and f"accuracy {results['best_val_acc']:.4f}" in default


def _popen(run_dir, overrides):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.Popen(
        train_cmd(*overrides, f"hydra.run.dir={run_dir}"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.slow
def test_resume_is_bit_identical_with_ema_swa_fp16_and_clipping(tmp_path):
    common = [
        *SMOKE_VAL,
        "data.dataset.train_size=224",  # 160 train images: 5 steps of 32 per epoch (fp16 is slow on a CPU)
        "data.dataset.test_size=64",
        "trainer.batch_size=32",
        "trainer.epochs=3",
        "trainer.log_every=1",
        "trainer.precision=fp16",
        "trainer.grad_clip_norm=1.0",
        "trainer.ema_decay=0.9",
        "trainer.swa_start=0.5",
    ]
    full = tmp_path / "full"
    run_recipe(full, *common)
    part = tmp_path / "part"
    stopped = run_recipe_until_sigterm(part, common, after_lines=9)  # 6 lines an epoch (5 steps, 1 evaluation)
    assert stopped.returncode == 143, stopped.stdout[-2000:]
    assert 5 < ckpt(part)["state"]["step"] < 15
    run_recipe(part, *common)
    assert metrics(part) == metrics(full)
    a, b = ckpt(full), ckpt(part)
    for key in ("model", "optimizer", "averaging", "scaler"):
        assert_same_tensors(a[key], b[key], key)
    assert a["scaler"]["scale"] > 0 and int(a["averaging"]["swa"]["n_averaged"]) == 2  # epochs 2 and 3
    assert_same_tensors(ckpt(full, "best.pt")["model"], ckpt(part, "best.pt")["model"])
    results = json.loads((full / "results.json").read_text())
    assert json.loads((part / "results.json").read_text())["final_test_acc"] == results["final_test_acc"]
    final_eval = [m for m in metrics(full) if "val_acc" in m][-1]
    assert {"val_acc", "ema_val_acc", "swa_val_acc"} <= set(final_eval)
    assert results["weights"] == "swa" and results["final_val_acc"] == final_eval["swa_val_acc"]


@pytest.mark.slow
def test_second_process_on_a_run_dir_exits_2_naming_the_holder(tmp_path):
    run = tmp_path / "run"
    first = _popen(run, [*SMOKE_VAL, "trainer.epochs=1000"])
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.05)
        second = run_train(*SMOKE_VAL, "trainer.epochs=1000", f"hydra.run.dir={run}", check=False)
        assert second.returncode == 2, second.stderr
        assert f"(PID {first.pid})" in second.stderr and second.stderr.count("\n") == 1
        assert (run / "metrics.jsonl").exists()  # the holder's run directory is untouched
    finally:
        first.kill()  # SIGKILL: the kernel releases the lock
        first.communicate()
    again = run_train(*SMOKE_VAL, "trainer.epochs=1", "resume=never", f"hydra.run.dir={run}", check=False)
    assert "in use by another" not in again.stderr


@pytest.mark.slow
def test_resume_path_then_the_same_command_continues_the_new_run(tmp_path):
    first = tmp_path / "first"
    run_recipe(first, *SMOKE_VAL, "trainer.epochs=1")
    source = first / "checkpoints" / "last.pt"
    second = tmp_path / "second"
    # the source run finished at lr 0: another epoch from it only when forced
    command = [*SMOKE_VAL, "trainer.epochs=2", "trainer.log_every=1", f"resume={source}", "resume_force=true"]
    stopped = run_recipe_until_sigterm(second, command, after_lines=4)
    assert stopped.returncode == 143, stopped.stdout[-2000:]
    step = ckpt(second)["state"]["step"]
    assert step > 7
    again = run_recipe(second, *command)
    assert f"continuing from {second / 'checkpoints' / 'last.pt'} (step {step})" in again.stdout
    assert [m["step"] for m in metrics(second) if "train_loss" in m] == list(range(8, 15))


def test_startup_failure_leaves_no_run_dir(tmp_path):
    run = tmp_path / "run"
    proc = run_train(
        "data=image_folder", f"data.dataset.path={tmp_path / 'missing'}", f"hydra.run.dir={run}", check=False
    )
    assert proc.returncode == 2 and "data.dataset.path" in proc.stderr
    assert not run.exists()


def test_limited_evaluation_is_a_fixed_class_balanced_subset():
    """trainer.limit_eval_batches takes a class-balanced subset of each evaluated split (imgcls.build's
    load_data), not its first images (a folder sorted by class would give its first classes)."""
    from imgcls import build, distributed
    from imgcls.config import compose_config

    overrides = ["experiment=smoke", "data.val_size=100", "trainer.limit_eval_batches=2", "trainer.eval_batch_size=10"]
    cfg, _ = compose_config(overrides)
    data = build.load_data(cfg, torch.device("cpu"), distributed.init(use_cuda=False))
    for loader in (data.val, data.test):
        assert torch.bincount(loader.labels, minlength=10).tolist() == [2] * 10  # 2 batches of 10
    again = build.load_data(compose_config(overrides)[0], torch.device("cpu"), distributed.init(use_cuda=False))
    assert torch.equal(again.test.labels, data.test.labels) and torch.equal(again.val.images, data.val.images)
