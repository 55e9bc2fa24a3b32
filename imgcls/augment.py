"""Augmentation: the ``augment`` config group (conf/augment/), what the device loader
(imgcls/loader.py) does to each training batch, on the training device, as batched tensor work.

Per image, drawn once per epoch from a generator seeded by ``(seed, epoch)`` and indexed by
image: a random crop (a reflect-padded translation by up to ``crop_padding`` px), a horizontal
flip (or airbench's alternating flip), and cutout (a ``cutout``-px square per image set to 0
after normalisation, i.e. to the channel mean; the square may cross the border).

Per batch, ``batch``: a factory called once with ``num_classes=K`` that returns a transform
``(x, y) -> (x, y)``; MixUp/CutMix (:func:`mix`) return soft targets, float ``[B, K]``, which the
loss takes as they are (imgcls/loss.py; label smoothing is applied there, once). The loader runs
it with the global RNG seeded by ``(seed, epoch, batch)`` and restored after (on the CPU and the
training device), so a transform that draws from torch's global RNG (torchvision's do) gives the
same batch after a resume, and dropout elsewhere draws what it would have drawn without it.

A fork adds its own as one function and one YAML: ``def jitter(num_classes, sigma)`` returning
``lambda x, y: (x + sigma * torch.randn_like(x), y)``, and conf/augment/jitter.yaml with
``defaults: [crop_flip]`` and ``batch: {_target_: mymodule.jitter, _partial_: true, sigma: 0.1}``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable


@dataclass(frozen=True)
class Augment:
    """A training split's augmentation. Built from ``augment`` by ``imgcls.build.load_data``
    (``seed`` = trainer.seed, ``num_classes`` from the data); ``mix`` is ``batch``'s transform,
    built here once (so a bad ``augment.batch`` value is refused before any step)."""

    seed: int = 0  # trainer.seed
    crop_padding: int = 4  # random translation, px (reflect padding)
    flip: bool = True  # random horizontal flip, p=0.5
    alternating_flip: bool = False  # airbench: each image flipped in one of every two epochs
    cutout: int = 0  # side of the square set to the mean, px; 0: off
    batch: Callable | None = None  # batch(num_classes=K) -> (x, y) -> (x, y), e.g. mix
    num_classes: int = 0  # the data's; what batch's soft targets are over
    drop_last: bool = True  # drop the last, short batch of an epoch
    mix: Callable | None = field(init=False, repr=False, compare=False, default=None)

    def __post_init__(self):
        if self.batch is not None:
            object.__setattr__(self, "mix", self.batch(num_classes=self.num_classes))


def mix(num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0):
    """MixUp, CutMix, or per batch one of the two at random (p=0.5 each, as timm's
    ``switch_prob=0.5``): torchvision.transforms.v2's, one ``lam ~ Beta(alpha, alpha)`` per batch,
    each image mixed with its neighbour in the batch (``roll(1)``); targets become
    ``lam * onehot(y) + (1 - lam) * onehot(y.roll(1))``. An alpha of 0 turns that one off.

    >>> import torch
    >>> t = mix(10, mixup_alpha=0.2)
    >>> x, y = t(torch.zeros(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    >>> tuple(y.shape), bool(torch.allclose(y.sum(1), torch.ones(4)))
    ((4, 10), True)
    """
    from torchvision.transforms import v2

    for key, value in (("mixup_alpha", mixup_alpha), ("cutmix_alpha", cutmix_alpha)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
            raise ValueError(f"augment.batch.{key}: {value!r} is not accepted; expected a finite number >= 0 (0: off)")
    parts = []
    if mixup_alpha > 0:
        parts.append(v2.MixUp(alpha=float(mixup_alpha), num_classes=num_classes))
    if cutmix_alpha > 0:
        parts.append(v2.CutMix(alpha=float(cutmix_alpha), num_classes=num_classes))
    if not parts:
        raise ValueError(
            f"augment.batch: mixup_alpha={mixup_alpha} and cutmix_alpha={cutmix_alpha} is not accepted; "
            "expected at least one > 0 (or augment=crop_flip for no batch transform)"
        )
    return parts[0] if len(parts) == 1 else v2.RandomChoice(parts)
