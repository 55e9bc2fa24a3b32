"""torchrun data parallel on the CPU (gloo, two processes): training runs, the loss falls,
only rank 0 writes, a checkpoint written by two ranks resumes on one, and two ranks together
see the global batches one process sees."""

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
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(ROOT / "train.py"),
        "experiment=smoke",
        "trainer.epochs=2",
        "trainer.log_every=1",
        f"hydra.run.dir={run}",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "8 steps per epoch on cpu x 2 ranks" in proc.stdout  # global batch 64 = 2 x 32 of 512 images
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in lines if "train_loss" in m]
    assert [m["step"] for m in train] == list(range(1, 17)), "one writer: each step logged once"
    first, last = sum(m["train_loss"] for m in train[:4]) / 4, sum(m["train_loss"] for m in train[-4:]) / 4
    assert last < first - 0.2, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert not any(k.startswith("module.") for k in ckpt["model"]), "DDP wrapper leaked into the checkpoint"

    more = ["trainer.epochs=3", "resume_force=true"]  # the finished run's lr is 0: more epochs only when forced
    resumed = run_train("experiment=smoke", *more, "trainer.log_every=1", f"hydra.run.dir={run}")
    assert "resumed from" in resumed.stdout and "at step 16" in resumed.stdout
    assert json.loads((run / "results.json").read_text())["steps"] == 24


def _rank_batches(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """One gloo rank: its share of every batch of two epochs, gathered onto rank 0."""
    import torch.distributed as td

    from imgcls.data import synthetic
    from imgcls.loader import Augment, BatchFormat, DeviceLoader

    td.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    ds = synthetic(96, 8, seed=3).load()
    loader = DeviceLoader(
        ds.train_images, ds.train_labels, 16, "cpu", BatchFormat(ds.mean, ds.std), Augment(seed=3), shard=(rank, world)
    )
    batches = []
    for epoch in range(2):
        for x, y in loader.epoch_batches(epoch):
            parts = [None] * world
            td.all_gather_object(parts, (x, y))
            batches.append(parts)
    if rank == 0:
        torch.save(batches, f"{out_dir}/batches.pt")
    td.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_ranks_see_the_global_batches_of_one_process(tmp_path):
    import torch.multiprocessing as mp

    from imgcls.data import synthetic
    from imgcls.loader import Augment, BatchFormat, DeviceLoader

    mp.spawn(_rank_batches, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranked = torch.load(tmp_path / "batches.pt", weights_only=False)
    ds = synthetic(96, 8, seed=3).load()
    alone = DeviceLoader(ds.train_images, ds.train_labels, 16, "cpu", BatchFormat(ds.mean, ds.std), Augment(seed=3))
    one = [batch for epoch in range(2) for batch in alone.epoch_batches(epoch)]
    assert len(ranked) == len(one) == 12  # 96 // 16 batches x 2 epochs
    for (x, y), parts in zip(one, ranked):
        assert [len(p[1]) for p in parts] == [8, 8]
        for r, (xr, yr) in enumerate(parts):  # rank r holds images r, r+2, ... of the global batch
            assert torch.equal(xr, x[r::2]) and torch.equal(yr, y[r::2])
