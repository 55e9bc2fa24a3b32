"""torchrun data parallel on the CPU (gloo, two processes): training runs, the loss falls,
only rank 0 writes, and a checkpoint written by two ranks resumes on one."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT, run_train


@pytest.mark.slow
def test_two_ranks_then_resume_on_one(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "train.py"), "experiment=smoke", "trainer.epochs=2", "trainer.log_every=1",
           f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 steps per epoch on cpu x 2 ranks" in proc.stdout  # batch 64 = 2 x 32, 256 images per rank
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "train_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 17)), "one writer: each step logged once"
    first, last = sum(m["train_loss"] for m in train[:4]) / 4, sum(m["train_loss"] for m in train[-4:]) / 4
    assert last < first - 0.2, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"]), "DDP wrapper leaked into the checkpoint"

    resumed = run_train("experiment=smoke", "trainer.epochs=3", "trainer.log_every=1", f"hydra.run.dir={run}")
    assert "resumed from" in resumed.stdout and "at step 16" in resumed.stdout
    assert json.loads((run / "results.json").read_text())["steps"] == 24
