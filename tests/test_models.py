"""Shapes, gradients, memory formats and FLOP count of the CIFAR models (CPU, fast)."""

import pytest
import torch
from torch import nn

from imgcls.models import count_flops, resnet9, resnet18

BUILDERS = [
    pytest.param(lambda n: resnet9(num_classes=n, width=16), id="resnet9-w16"),
    pytest.param(lambda n: resnet18(num_classes=n), id="resnet18"),
]


@pytest.mark.parametrize("build", BUILDERS)
def test_output_shape_and_backward(build):
    torch.manual_seed(0)
    model = build(7)
    x = torch.randn(3, 3, 32, 32)
    out = model(x)
    assert out.shape == (3, 7)
    out.float().logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("build", BUILDERS)
def test_channels_last_matches_contiguous(build):
    torch.manual_seed(0)
    model = build(10).eval()
    x = torch.randn(2, 3, 32, 32)
    ref = model(x)
    model = model.to(memory_format=torch.channels_last)
    out = model(x.to(memory_format=torch.channels_last))
    assert out.shape == (2, 10)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_resnet9_bf16_autocast():
    model = resnet9(width=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 3, 32, 32).to(memory_format=torch.channels_last))
    assert out.shape == (2, 10) and torch.isfinite(out.float()).all()


def test_resnet9_default_width_and_scale():
    model = resnet9()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [
        (3, 64),
        (64, 128),
        (128, 128),
        (128, 128),
        (128, 256),
        (256, 512),
        (512, 512),
        (512, 512),
    ]
    assert all(c.kernel_size == (3, 3) and c.padding == (1, 1) and c.bias is None for c in convs)
    linear = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(linear) == 1 and linear[0].bias is None and linear[0].in_features == 512
    # scale_out multiplies the logits: halving it halves the output exactly.
    torch.manual_seed(0)
    a = resnet9(width=8, scale_out=1.0).eval()
    b = resnet9(width=8, scale_out=0.5).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(b(x), 0.5 * a(x))


def test_resnet9_flops_hand_computed():
    def conv_macs(c_in, c_out, side):  # 3x3 conv, padding 1, stride 1: output side == input side
        return 3 * 3 * c_in * c_out * side * side

    w, classes = 64, 10
    macs = (
        conv_macs(3, w, 32)  # prep
        + conv_macs(w, 2 * w, 32)  # layer1 conv, then pool -> 16
        + 2 * conv_macs(2 * w, 2 * w, 16)  # layer1 residual
        + conv_macs(2 * w, 4 * w, 16)  # layer2 conv, then pool -> 8
        + conv_macs(4 * w, 8 * w, 8)  # layer3 conv, then pool -> 4
        + 2 * conv_macs(8 * w, 8 * w, 4)  # layer3 residual
        + 8 * w * classes  # linear
    )
    assert macs == 379_261_952
    model = resnet9(num_classes=classes, width=w)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert count_flops(model) == 2 * macs == 758_523_904
    assert model.training  # mode restored
    # no BatchNorm running-stat update from the counting pass
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert count_flops(model, (4, 3, 32, 32)) == 4 * 2 * macs  # total for the batch


def test_resnet18_cifar_stem():
    model = resnet18(num_classes=100)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert model.conv1.padding == (1, 1) and model.conv1.bias is None
    assert isinstance(model.maxpool, nn.Identity)
    assert model.fc.out_features == 100


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_bad_num_classes(bad):
    for build in (resnet9, resnet18):
        with pytest.raises(ValueError, match="num_classes"):
            build(num_classes=bad)
