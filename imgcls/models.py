"""CIFAR-10 networks that Hydra instantiates by `_target_` (e.g. `imgcls.models.resnet9`).

Every builder takes `num_classes` and returns a plain `nn.Module` that maps a float
image batch [B, 3, 32, 32] to logits [B, num_classes]. Nothing here depends on the
device, dtype or memory format: move the model with `.to(device, memory_format=
torch.channels_last)` and run it under `torch.autocast(..., dtype=torch.bfloat16)` as
you like.

`count_flops` is here too, so the FLOP figures in the docstrings can be re-derived.
`timm_model` builds any architecture of the optional `timm` package by name (`model=timm`).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["resnet9", "resnet18", "timm_model", "check_input_size", "count_flops"]


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
    import torchvision  # here, not at the top: it pulls in torch._dynamo (~2 s of every start-up)

    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def timm_model(
    num_classes: int = 10, name: str = "resnet18", pretrained: bool = False, cifar_stem: bool = False, **kwargs
) -> nn.Module:
    """``timm.create_model(name, num_classes=num_classes, pretrained=pretrained, **kwargs)``.

    Any of timm's architectures by name (``timm.list_models()``), keyword arguments passed
    through (e.g. ``img_size=32, patch_size=4`` for a ViT, ``drop_path_rate=0.1``). Needs the
    optional ``timm`` package (``pip install -e '.[timm]'``); it is imported only here.

    ``cifar_stem=True`` gives a timm ResNet (one ``conv1`` + ``maxpool`` stem: resnet18/34/50,
    resnext, seresnet, wide_resnet...) the 32x32 stem of `resnet18` above: a 3x3 stride-1
    ``conv1`` and no max-pool, so the last stage sees 4x4 instead of 1x1.

    ``pretrained=True`` loads weights from timm's Hugging Face Hub cache (or downloads them);
    when the Hub cannot be reached the cache alone is used, and weights that are not there
    fail at once with one line naming the model (instead of a minute of retries).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes={num_classes!r} is invalid; expected an int >= 1")
    try:
        import timm
    except ImportError:
        raise ValueError(
            "model=timm needs the timm package: pip install timm "
            "(or the project's `timm` extra: pip install -e '.[timm]')"
        ) from None
    if not isinstance(name, str) or not name:
        raise ValueError(f"name={name!r} is invalid; expected a timm architecture name such as 'resnet18'")
    if ":" not in name and not timm.is_model(name):  # "hf-hub:org/repo" names are resolved by timm
        import difflib

        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else "; timm.list_models() lists them"
        raise ValueError(f"name={name!r} is not a timm architecture{hint}")
    if pretrained and not _hub_reachable():
        import huggingface_hub.constants

        huggingface_hub.constants.HF_HUB_OFFLINE = True  # read at call time: use the cache only
    try:
        model = timm.create_model(name, pretrained=bool(pretrained), num_classes=num_classes, **kwargs)
    except (OSError, RuntimeError) as e:
        if not pretrained:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(
            f"pretrained=true: the weights of {name!r} could not be loaded ({type(e).__name__}: {first}); "
            "they come from the Hugging Face Hub, which needs network, or its local cache (HF_HOME): "
            "set model.pretrained=false to train from scratch, or download them once where there is network"
        ) from None  # from None: config_errors reports the cause of a chained error, not this line
    if cifar_stem:
        conv1 = getattr(model, "conv1", None)
        if not isinstance(conv1, nn.Conv2d) or not hasattr(model, "maxpool"):
            raise ValueError(
                f"cifar_stem=true: {name!r} has no single conv1 + maxpool stem (it works for timm ResNets "
                "such as resnet18, resnet50, resnext50_32x4d); use the family's own arguments instead (docs/models.md)"
            )
        model.conv1 = nn.Conv2d(conv1.in_channels, conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connect within `timeout` seconds (not when
    HF_HUB_OFFLINE is set). One probe instead of huggingface_hub's retries (~45 s offline)."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def check_input_size(model: nn.Module, size, config=None) -> None:
    """Raise one ValueError line if `model` does not run on images of `size` (C, H, W).

    One forward of a single zeros image (eval mode, no gradients, mode restored: no weight,
    BatchNorm statistic or random state changes), so a model built for another input size
    (a timm ViT or Swin left at 224: "Input height (32) doesn't match model (224)") stops before
    any training step instead of at the first one. `config` (the model's config) names the key.
    Costs one image's forward (~1 GFLOP for resnet18 at 32x32, milliseconds).
    """
    c, h, w = (int(v) for v in size)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, c, h, w, device=device))
    except (AssertionError, RuntimeError, ValueError, IndexError) as e:
        if isinstance(e, torch.OutOfMemoryError) or type(e).__name__ == "AcceleratorError":
            raise  # the device, not the size: the run would fail the same way at its first step
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(_input_size_message(model, (h, w), config, f"{type(e).__name__}: {first}")) from None
    finally:
        model.train(was_training)


def _input_size_message(model: nn.Module, hw: tuple[int, int], config, cause: str) -> str:
    """What check_input_size says: the key, the model's input size where the model states one
    (timm: patch_embed.img_size, else pretrained_cfg's input_size), the data's size, and what
    is accepted (+model.img_size where the architecture takes one)."""
    import inspect

    h, w = hw
    config = dict(config or {})
    built = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if built is None:
        built = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (None,))[1:] or None
    built = f" is built for {built[0]}x{built[1]} inputs and" if built and len(built) == 2 else ""
    key = "model.img_size" if "img_size" in config else "model.name" if "name" in config else "model"
    value = config.get("img_size", config.get("name"))
    what = f"{key}={value!r}" if key != "model" else f"model {type(model).__name__}"
    takes = inspect.signature(type(model).__init__).parameters
    if "img_size" in takes:

        def arg(k, v):  # "+" adds a key that the config does not have yet (Hydra refuses it otherwise)
            return f"{'' if k in config else '+'}model.{k}={v}"

        accepted = "set " + arg("img_size", h if h == w else f"[{h},{w}]")
        if "patch_size" in takes:
            accepted += (
                f" {arg('patch_size', max(1, min(h, w) // 8))} (an 8x8 grid of patches; docs/models.md 'timm models')"
            )
    else:
        accepted = f"use a model that takes {h}x{w} images"
    return f"{what}{built} does not run on the data's {h}x{w} images ({cause}); {accepted}"


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
