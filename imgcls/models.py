"""CIFAR-10 networks that Hydra instantiates by `_target_` (e.g. `imgcls.models.resnet9`).

Every builder takes `num_classes` and returns a plain `nn.Module` that maps a float
image batch [B, 3, 32, 32] to logits [B, num_classes]. Nothing here depends on the
device, dtype or memory format: move the model with `.to(device, memory_format=
torch.channels_last)` and run it under `torch.autocast(..., dtype=torch.bfloat16)` as
you like.

`count_flops` is here too, so the FLOP figures in the docstrings can be re-derived.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn

__all__ = ["resnet9", "resnet18", "count_flops"]


def _conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    # bias=False: the BatchNorm shift that follows makes a conv bias redundant.
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _Residual(nn.Module):
    """x + f(x). A module (not a function) only because nn.Sequential needs one."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.inner(x)


class _Scale(nn.Module):
    """Multiply by a fixed float; a buffer-free module so it shows up in print(model)."""

    def __init__(self, factor: float):
        super().__init__()
        self.factor = float(factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.factor

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


def resnet9(num_classes: int = 10, width: int = 64, scale_out: float = 0.125) -> nn.Module:
    """Fast ResNet-9 for 32x32 inputs, after Page's DAWNBench ResNet-9 and airbench.

    Layout (w = `width`, spatial size after each stage in brackets):
        prep    conv(3->w)   BN ReLU                                   [32x32]
        layer1  conv(w->2w)  BN ReLU maxpool2 + residual(2x conv-BN-ReLU) [16x16]
        layer2  conv(2w->4w) BN ReLU maxpool2                          [8x8]
        layer3  conv(4w->8w) BN ReLU maxpool2 + residual(2x conv-BN-ReLU) [4x4]
        global max-pool, flatten, linear(8w->num_classes, bias=False), x scale_out
    All convs are 3x3, padding 1, bias=False.

    `scale_out` shrinks the logits (Page used 0.125) so the initial softmax is not
    over-confident; it is a constant, not a parameter.

    Cost per 32x32 image forward (FLOPs = 2 x multiply-adds, convs and linear only,
    from `count_flops`), width=64, 10 classes: 758,523,904 FLOPs (~0.76 GFLOPs).
    In multiply-adds: prep 1,769,472; layer1 conv, layer1 residual pair (16x16),
    layer2 conv, layer3 conv and layer3 residual pair (4x4) 75,497,472 each (every
    stage costs the same: channels double as the area quarters); linear 5,120.
    Parameters: 6,573,120. Conv cost grows as width**2.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is invalid; expected an int >= 1")
    if not isinstance(width, int) or isinstance(width, bool) or width < 1:
        raise ValueError(f"width={width!r} is invalid; expected an int >= 1 (64 is the reference)")
    w = width
    return nn.Sequential(
        _conv_bn_relu(3, w),  # prep
        nn.Sequential(  # layer1
            _conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),
            _Residual(nn.Sequential(_conv_bn_relu(2 * w, 2 * w), _conv_bn_relu(2 * w, 2 * w))),
        ),
        nn.Sequential(_conv_bn_relu(2 * w, 4 * w), nn.MaxPool2d(2)),  # layer2
        nn.Sequential(  # layer3
            _conv_bn_relu(4 * w, 8 * w),
            nn.MaxPool2d(2),
            _Residual(nn.Sequential(_conv_bn_relu(8 * w, 8 * w), _conv_bn_relu(8 * w, 8 * w))),
        ),
        nn.AdaptiveMaxPool2d(1),
        nn.Flatten(),
        nn.Linear(8 * w, num_classes, bias=False),
        _Scale(scale_out),
    )


def resnet18(num_classes: int = 10) -> nn.Module:
    """torchvision ResNet-18 (random init) adapted to 32x32 inputs.

    The ImageNet stem (7x7 stride-2 conv + stride-2 maxpool) would shrink a 32x32 image
    to 8x8 before the first block; the usual CIFAR variant replaces conv1 by a 3x3
    stride-1 conv and drops the maxpool, so layer4 sees 4x4.

    Cost per 32x32 image forward: 1,110,845,440 FLOPs (~1.11 GFLOPs, 2 x MACs, convs
    and linear, from `count_flops`), 10 classes; 11,173,962 parameters.
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is invalid; expected an int >= 1")
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def count_flops(model: nn.Module, input_size: tuple[int, ...] = (1, 3, 32, 32)) -> int:
    """FLOPs (2 x multiply-adds) of one forward of a zeros batch of `input_size`.

    Counts only nn.Conv2d and nn.Linear (BN, ReLU, pooling and adds are < 1% for these
    nets). The total is for the whole batch: the default batch of 1 gives per-image
    FLOPs. Runs in eval mode under no_grad so BatchNorm running stats are not touched;
    the model's train/eval mode is restored afterwards.
    """
    total = 0

    def conv_hook(mod: nn.Conv2d, inputs, output):
        nonlocal total
        k_h, k_w = mod.kernel_size
        # Each output element is a dot product over (in_channels / groups) * kh * kw inputs.
        total += 2 * output.numel() * (mod.in_channels // mod.groups) * k_h * k_w

    def linear_hook(mod: nn.Linear, inputs, output):
        nonlocal total
        total += 2 * output.numel() * mod.in_features

    handles = []
    for mod in model.modules():
        if isinstance(mod, nn.Conv2d):
            handles.append(mod.register_forward_hook(conv_hook))
        elif isinstance(mod, nn.Linear):
            handles.append(mod.register_forward_hook(linear_hook))
    was_training = model.training
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(input_size, device=device, dtype=dtype))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return total
