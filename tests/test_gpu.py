"""GPU tier: the same recipe on CUDA (bf16, channels_last, fused SGD) and exact stepping there.

Skipped, with the reason printed, on a machine without CUDA (CI has none).
"""

from __future__ import annotations

import json

import pytest
import torch

from imgcls import build
from imgcls.step import StepSettings, train_step
from tests.conftest import build_recipe, metrics, run_train
from tests.conftest import run_until_sigterm as _run_until_sigterm

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine: GPU tier skipped"),
]
CUDA_SMOKE = ["experiment=smoke", "trainer.device=cuda", "trainer.epochs=4", "trainer.log_every=1"]


def test_cuda_smoke_run(tmp_path):
    run_train(*CUDA_SMOKE, f"hydra.run.dir={tmp_path}")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["device"] != "cpu" and results["final_test_acc"] > 0.3


def test_cuda_sigterm_resume_same_lr_every_step_and_deterministic_weights(tmp_path):
    common = [*CUDA_SMOKE, "trainer.deterministic=true"]
    full, part = tmp_path / "full", tmp_path / "part"
    run_train(*common, f"hydra.run.dir={full}")
    stopped = _run_until_sigterm(part, common, after_lines=11)
    assert stopped.returncode == 143, stopped.stdout
    run_train(*common, f"hydra.run.dir={part}")
    lrs = lambda run: [(m["step"], m["lr"]) for m in metrics(run) if "lr" in m]  # noqa: E731
    assert lrs(part) == lrs(full)
    a = torch.load(full / "checkpoints" / "last.pt", weights_only=True)["model"]
    b = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cuda_per_step_work_has_no_host_sync():
    """What the loop runs every step (a loader batch, train_step, scheduler.step, the loss summed
    on the device) under torch's sync debug mode: any device-to-host wait raises. The first
    batch (the epoch plan moves to the GPU) and the first steps (cudnn autotuning) run outside it."""
    cfg, device, data, model, optimizer, scheduler = build_recipe(
        "experiment=smoke",
        "trainer.device=cuda",
        "trainer.precision=auto",
        "trainer.channels_last=auto",
        "trainer.fused=auto",
    )
    build.seed_everything(cfg.trainer.seed, False, device)  # cudnn.benchmark, as a run sets it
    assert optimizer.param_groups[0]["fused"] is True
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
    loss_sum = torch.zeros((), device=device)
    batches = data.train.epoch_batches(0)
    for _ in range(2):
        x, y = next(batches)
        loss_sum += train_step(model, optimizer, loss_fn, x, y, StepSettings("bf16")).float()
        scheduler.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for x, y in batches:
            loss_sum += train_step(model, optimizer, loss_fn, x, y, StepSettings("bf16")).float()
            scheduler.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.isfinite(loss_sum).item()
