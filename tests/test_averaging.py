"""imgcls.averaging: EMA (buffers too) and SWA (+ update_bn), in the checkpoint, resumed exactly."""

from __future__ import annotations

import copy

import pytest
import torch

from imgcls.averaging import Averaging, averaged_weights
from imgcls.config import check_averaging


def _net():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 2))


def _batch(i):
    g = torch.Generator().manual_seed(i)
    return torch.randn(16, 4, generator=g), torch.randint(0, 2, (16,), generator=g)


def _train(net, opt, avg, steps, start=0, per_epoch=2):
    net.train()
    for i in range(start, start + steps):
        x, y = _batch(i)
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
        opt.zero_grad()
        avg.after_step(net)
        if (i + 1) % per_epoch == 0:
            avg.after_epoch(net, (i + 1) // per_epoch - 1)


def test_ema_matches_the_formula_including_buffers():
    net = _net()
    avg = Averaging(net, epochs=4, ema_decay=0.9)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    expect = {}
    for i in range(3):
        _train(net, opt, avg, 1, start=i, per_epoch=100)
        for k, v in net.state_dict().items():
            if v.is_floating_point():  # the first update copies the weights (AveragedModel)
                expect[k] = v.clone() if i == 0 else 0.9 * expect[k] + 0.1 * v
    ema = avg.ema.module.state_dict()
    for k, v in expect.items():
        torch.testing.assert_close(ema[k], v)  # running_mean/var averaged too (use_buffers=True)


def test_averaging_resumes_bit_identically():
    def fresh():
        net = _net()
        return net, torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9), Averaging(net, 4, 0.9, 0.5)

    net, opt, avg = fresh()
    _train(net, opt, avg, 4)
    saved = copy.deepcopy({"m": net.state_dict(), "o": opt.state_dict(), "a": avg.state_dict()})
    _train(net, opt, avg, 4, start=4)
    net2, opt2, avg2 = fresh()
    net2.load_state_dict(saved["m"])
    opt2.load_state_dict(saved["o"])
    avg2.load_state_dict(saved["a"], "saved")
    _train(net2, opt2, avg2, 4, start=4)
    for name in ("ema", "swa"):
        a, b = getattr(avg, name).state_dict(), getattr(avg2, name).state_dict()
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert int(avg.swa.n_averaged) == 2  # epochs 2 and 3 of 4 (swa_start=0.5)


def test_swa_update_bn_and_which_weights_evaluate():
    net = _net()
    avg = Averaging(net, epochs=2, swa_start=0.0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    _train(net, opt, avg, 4)
    before = avg.swa.module[1].running_mean.clone()
    avg.finish([_batch(i) for i in range(3)])
    assert not torch.equal(before, avg.swa.module[1].running_mean)
    ckpt = {"model": net.state_dict(), "averaging": avg.state_dict(), "state": {"finished": False}}
    assert averaged_weights(ckpt)[1] == "raw"  # SWA's BN statistics exist only at the end
    ckpt["state"]["finished"] = True
    weights, which = averaged_weights(ckpt)
    assert which == "swa" and weights.keys() == net.state_dict().keys()
    fresh = _net()
    fresh.load_state_dict(weights)


def test_resume_without_averaged_weights_is_refused():
    avg = Averaging(_net(), epochs=2, ema_decay=0.99)
    with pytest.raises(ValueError, match="no EMA weights"):
        avg.load_state_dict({}, "ckpt.pt")


@pytest.mark.parametrize(
    "kw,key",
    [
        ({"ema_decay": 1.0}, "ema_decay"),
        ({"ema_decay": 0}, "ema_decay"),
        ({"swa_start": 1.0}, "swa_start"),
        ({"swa_start": "x"}, "swa_start"),
    ],
)
def test_bad_values_refused(kw, key):
    with pytest.raises(ValueError, match=rf"trainer\.{key}"):
        check_averaging(kw.get("ema_decay"), kw.get("swa_start"))


def test_weights_can_be_chosen():
    net = _net()
    avg = Averaging(net, epochs=2, ema_decay=0.9)
    avg.after_step(net)
    ckpt = {"model": net.state_dict(), "averaging": avg.state_dict(), "state": {"finished": True}}
    assert averaged_weights(ckpt)[1] == "ema" and averaged_weights(ckpt, "raw")[1] == "raw"
    with pytest.raises(ValueError, match="no SWA weights"):
        averaged_weights(ckpt, "swa")
    with pytest.raises(ValueError, match="weights: 'best'"):
        averaged_weights(ckpt, "best")
