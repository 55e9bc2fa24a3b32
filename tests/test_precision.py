"""imgcls.precision: fp16 autocast + GradScaler and clipping run on the CPU; scaler state resumes."""

from __future__ import annotations

import copy

import pytest
import torch

from imgcls.precision import autocast, check_clip, make_scaler, optimizer_step, resolve_precision

CPU = torch.device("cpu")


def test_resolve_precision():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("fp16", CPU) == "fp16"
    with pytest.raises(ValueError, match=r"trainer\.precision: 'fp8'"):
        resolve_precision("fp8", CPU)


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _steps(net, opt, scaler, n, clip=None, start=0):
    for i in range(start, start + n):
        g = torch.Generator().manual_seed(i)
        x, y = torch.randn(32, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
        with autocast(CPU, "fp16"):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer_step(loss, opt, scaler, clip)


def test_fp16_scaler_trains_and_resumes_bit_identically():
    net = _net()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    scaler = make_scaler(CPU, "fp16")
    assert scaler.is_enabled()
    _steps(net, opt, scaler, 3)
    saved = copy.deepcopy({"m": net.state_dict(), "o": opt.state_dict(), "s": scaler.state_dict()})
    _steps(net, opt, scaler, 3, start=3)
    # resume from the saved state into fresh objects
    net2 = _net()
    opt2 = torch.optim.SGD(net2.parameters(), lr=0.1, momentum=0.9)
    scaler2 = make_scaler(CPU, "fp16")
    net2.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    scaler2.load_state_dict(saved["s"])
    assert scaler2.get_scale() == scaler.get_scale() or saved["s"]["scale"] != scaler.get_scale()
    _steps(net2, opt2, scaler2, 3, start=3)
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    assert scaler2.state_dict() == scaler.state_dict()


def test_clip_bounds_the_unscaled_gradient_norm(monkeypatch):
    """fp16 + clipping: the gradients are unscaled before they are clipped, so the clipped norm is
    the true gradient norm (not the loss scale, 65536, times it) and the step applies gradients of
    total norm clip_norm (clipping the scaled ones, then unscaling, would apply clip_norm / 65536)."""
    torch.manual_seed(0)
    x, y = torch.randn(32, 8) * 3, torch.randint(0, 3, (32,))

    def gradients_and_step(scaler, clip_norm):
        net = _net()
        opt = torch.optim.SGD(net.parameters(), lr=1.0)  # lr 1: the step is minus the applied gradient
        before = [p.detach().clone() for p in net.parameters()]
        with autocast(CPU, "fp16"):
            loss = torch.nn.functional.cross_entropy(net(x), y)
        optimizer_step(loss, opt, scaler, clip_norm)
        step = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, net.parameters())])
        return float(step.norm())

    true_norm = gradients_and_step(make_scaler(CPU, "fp32"), None)  # no scaling, no clipping
    measured = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: measured.append(float(clip(params, max_norm)))
    )
    scaler = make_scaler(CPU, "fp16")
    clip_norm = true_norm / 4
    applied = gradients_and_step(scaler, clip_norm)
    assert scaler.get_scale() == 65536.0  # no inf/NaN: the step was taken
    assert measured == [pytest.approx(true_norm, rel=1e-2)]  # the norm it clipped: unscaled
    assert applied == pytest.approx(clip_norm, rel=1e-3)


@pytest.mark.parametrize("bad", [0, -1.0, float("inf"), "1", True])
def test_clip_refused(bad):
    with pytest.raises(ValueError, match=r"trainer\.grad_clip_norm"):
        check_clip(bad)
