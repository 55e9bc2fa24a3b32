"""Gradient accumulation (trainer.accumulate_grad_batches): N micro-batches make one optimizer
step with the whole batch's update (in-process imgcls.step.train_step, and one real stopped and
resumed run)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from imgcls.loss import classification_loss
from imgcls.step import StepSettings, train_step
from tests.conftest import assert_same_weights, metrics, run_recipe, run_recipe_until_sigterm, weights


def _steps(accumulate: int, clip: float | None, seen: list | None = None) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 5))  # no BatchNorm
    if seen is not None:
        net.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    settings = StepSettings("fp32", clip_norm=clip, accumulate=accumulate)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        x, y = torch.randn(32, 3, 4, 4, generator=g), torch.randint(0, 5, (32,), generator=g)
        train_step(net, opt, classification_loss, x, y, settings)
    return net


@pytest.mark.parametrize("clip", [None, 0.5])
def test_four_micro_batches_make_the_whole_batch_update(clip):
    seen = []
    one, four = _steps(1, clip), _steps(4, clip, seen)
    assert seen == [8] * 12  # 3 steps x 4 micro-batches of 32 / 4 images
    for a, b in zip(one.parameters(), four.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # float sums in another order


@pytest.mark.slow
def test_an_accumulating_run_stopped_and_resumed_equals_an_uninterrupted_one(tmp_path):
    overrides = ["experiment=smoke", "trainer.accumulate_grad_batches=4"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_recipe(whole, *overrides)  # in process: bit-identical to a subprocess, without its start-up
    stopped = run_recipe_until_sigterm(parts, overrides, after_lines=3)  # mid-epoch 1: between optimizer steps
    assert stopped.returncode == 143, stopped.stdout[-2000:]
    run_recipe(parts, *overrides)
    assert metrics(parts) == metrics(whole)
    assert_same_weights(weights(parts), weights(whole))
