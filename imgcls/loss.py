"""The loss: the one definition that training, evaluation and the benchmarks use (a fork that
wants another loss changes it here).

Cross-entropy on the logits, against class indices or, after MixUp/CutMix (imgcls/augment.py),
soft targets (class probabilities). Training smooths the targets by ``trainer.label_smoothing``
(here only, once: ``(1 - e) * target + e / classes``, soft targets included);
evaluation reports the plain cross-entropy (``label_smoothing=0``), so a run's test loss does
not depend on its training smoothing and runs with different smoothing compare.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def classification_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, reduction: str = "mean"
) -> torch.Tensor:
    """Cross-entropy of ``logits`` [B, classes] against class indices ``targets`` int64 [B] or
    class probabilities float [B, classes]."""
    return F.cross_entropy(logits, targets, label_smoothing=label_smoothing, reduction=reduction)


def training_loss(trainer) -> functools.partial:
    """The loss train.py (and the benchmarks) step with, from the ``trainer`` config node:
    ``(logits, targets) -> mean loss`` with ``trainer.label_smoothing``."""
    return functools.partial(classification_loss, label_smoothing=float(trainer.label_smoothing))
