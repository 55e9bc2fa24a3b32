"""train.py end to end on the CPU: a smoke run, exact resume, sweeps, bad input, real data."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml

from tests.conftest import (
    ROOT,
    assert_same_weights,
    extract_cifar_subset,
    metrics,
    run_recipe,
    run_train,
    run_until_sigterm,
    train_cmd,
    weights,
)

SMOKE = ["experiment=smoke"]


@pytest.mark.slow
def test_sigterm_mid_run_then_resume_is_bit_identical(tmp_path):
    common = [*SMOKE, "trainer.epochs=4", "trainer.log_every=1"]
    full = tmp_path / "full"
    run_recipe(full, *common)

    part = tmp_path / "part"
    stopped = run_until_sigterm(part, common, after_lines=11)
    assert stopped.returncode == 143, stopped.stdout  # 128 + SIGTERM, documented in docs/resume-and-faults.md
    assert "SIGTERM: checkpoint saved at step" in stopped.stdout
    state = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["state"]
    # saved at the step boundary after the signal: at most the one step in flight past the
    # last step logged before it (log_every=1), not an older epoch-end checkpoint
    assert stopped.signalled_at <= state["step"] <= stopped.signalled_at + 1, (stopped.signalled_at, state)
    assert not state["finished"]

    resumed = run_recipe(part, *common)
    assert f"resumed from {part / 'checkpoints' / 'last.pt'} at step {state['step']}" in resumed.stdout
    # the same lr at every step (log_every=1), the same losses and evaluations, the same weights
    assert metrics(part) == metrics(full)
    assert_same_weights(weights(part), weights(full))


@pytest.mark.slow
def test_multirun_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    # warmup_exp warms up over 2 epochs: in a 1-epoch run only with the explicit opt-out
    run_train(
        "-m",
        *SMOKE,
        "trainer.epochs=1",
        "scheduler=warmup_exp,warmup_cosine",
        "optimizer.lr=0.1,0.05",
        "schedule.allow_truncated=true",
        f"hydra.sweep.dir={sweep}",
    )
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
    assert summary[0] == (
        "job,overrides,status,best_val_acc,final_val_acc,final_test_acc,best_ckpt_test_acc,"
        "best_test_acc,train_seconds,error"
    )
    assert len(summary) == 5 and all(",completed," in row for row in summary[1:])
    assert (sweep / "summary.md").read_text().startswith("| job | overrides | status |")


@pytest.mark.slow
def test_a_failed_sweep_job_is_listed_and_does_not_stop_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", *SMOKE, "trainer.epochs=1", "optimizer.lr=-1,0.1", f"hydra.sweep.dir={sweep}", check=False)
    assert proc.returncode == 1  # once all jobs have run: some failed
    # the refused job says why in the one line it would print alone: no Hydra traceback
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert errors == ["error: optimizer.lr: -1 is not accepted; expected a finite number > 0"], proc.stderr
    table = proc.stdout[proc.stdout.index("| job | overrides | status |") :]  # printed at the end
    failed_row = next(line for line in table.splitlines() if line.startswith("| 0 |"))
    assert "optimizer.lr=-1" in failed_row and "| failed |" in failed_row and "(1 of 2 jobs failed)" in table
    rows = (sweep / "summary.csv").read_text().splitlines()[1:]
    assert rows[0].startswith("0,") and ",failed," in rows[0] and "optimizer.lr: -1 is not accepted" in rows[0]
    assert rows[1].startswith("1,") and ",completed," in rows[1]
    assert json.loads((sweep / "1" / "results.json").read_text())["steps"] == 8


def test_help_and_cfg_do_not_import_torch():
    proc = subprocess.run(
        [*train_cmd("--cfg", "job")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "scheduler:" in proc.stdout and "_target_: sched.SequentialLR" in proc.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "hydra" in imported and "torch" not in imported


def test_bad_input_in_a_real_process_exits_2_with_one_line(tmp_path):
    """The bad-input table (docs/bad-input.md) runs in-process (tests/test_bad_input.py); this is one row
    through a real process: exit code 2, one `error:` line, no traceback, nothing trained."""
    proc = run_train(*SMOKE, "optimizer.lr=-0.1", f"hydra.run.dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert proc.stderr == "error: optimizer.lr: -0.1 is not accepted; expected a finite number > 0\n"
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.slow
def test_real_cifar10_subset_beats_chance(tmp_path):
    sub = extract_cifar_subset(tmp_path / "cifar10-sub", {"train": 500, "test": 100})
    run = tmp_path / "run"
    run_recipe(
        run,
        "data=image_folder",
        f"data.dataset.path={sub}",
        f"data.dataset.root={tmp_path / 'cache'}",
        "model.width=8",  # 0.52 and 0.51 test accuracy (seeds 0, 1): ample margin over 0.30
        "trainer.device=cpu",
        "trainer.epochs=4",
        "trainer.batch_size=100",
        "trainer.log_every=25",
        "optimizer.lr=0.2",
    )
    acc = json.loads((run / "results.json").read_text())["final_test_acc"]
    assert acc > 0.30, f"test accuracy {acc:.3f} on 1,000 real test images; chance is 0.10"


def test_cfg_job_resolve_prints_the_resolved_config():
    proc = subprocess.run(
        train_cmd("experiment=smoke", "--cfg", "job", "--resolve"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["schedule"]["steps_per_epoch"] == 8  # 512 synthetic images // batch 64, as the run counts
    assert cfg["scheduler"]["milestones"] == [3]  # ${run_fraction:0.2} of 16 steps
    assert "${" not in proc.stdout


def _tiny_tree(base, per_class: dict) -> None:
    """base/{train,test}/{cat,dog}/*.png: 32x32 images, a colour per class."""
    from PIL import Image

    for split, n in per_class.items():
        for i, cls in enumerate(("cat", "dog")):
            (base / split / cls).mkdir(parents=True)
            for k in range(n):
                Image.new("RGB", (32, 32), (200 * i, 40 * k, 30 * k + 90 * i)).save(base / split / cls / f"{k}.png")


@pytest.mark.slow
def test_every_relative_path_is_the_launch_directorys(tmp_path):
    """One rule, from a directory that is not the project's: data.dataset.path, data.dataset.root,
    hydra.run.dir, resume=, and evaluate's/predict's checkpoint=, images=, out= are relative to
    where the command runs; the default data root is the project's data/ wherever that is."""
    _tiny_tree(tmp_path / "mysub", {"train": 4, "test": 2})
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}

    def run(*args):
        proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"{args} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    data = ["data=image_folder", "data.dataset.path=mysub", "data.dataset.root=droot", "data.val_size=0"]
    small = ["trainer.batch_size=4", "trainer.epochs=1", "model.width=8", "trainer.device=cpu"]
    run(*train_cmd(*data, *small, "hydra.run.dir=run1"))
    assert (tmp_path / "run1" / "results.json").is_file() and list((tmp_path / "droot" / "cache").iterdir())
    run(
        *train_cmd(
            *data,
            *small,
            "trainer.epochs=2",
            "resume=run1/checkpoints/last.pt",
            "resume_force=true",
            "hydra.run.dir=run2",
        )
    )
    assert json.loads((tmp_path / "run2" / "results.json").read_text())["steps"] == 4
    run(sys.executable, "-m", "imgcls.evaluate", "checkpoint=run2", "out=ev")
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["images"] == 4
    run(sys.executable, "-m", "imgcls.predict", "checkpoint=run2", "images=mysub/test", "out=p.csv")
    assert len((tmp_path / "p.csv").read_text().splitlines()) == 1 + 4
    resolved = yaml.safe_load(run(*train_cmd("--cfg", "job", "--resolve")).stdout)
    assert resolved["data"]["dataset"]["root"] == str(ROOT / "data")
    assert not (ROOT / "droot").exists() and not (ROOT / "run1").exists() and not (ROOT / "ev").exists()
