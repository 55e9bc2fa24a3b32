"""One optimizer step: forward under the run's precision, the loss, backward (as N micro-batches
with gradient accumulation), clipping and the optimizer step (imgcls/precision.py). The loop in
train.py calls it once per batch; ``make bench`` times it (benchmarks/bench_train.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from imgcls.precision import apply_gradients, autocast, make_scaler


@dataclass
class StepSettings:
    """How train_step runs: precision fp32 | bf16 | fp16 (fp16 takes the GradScaler ``scaler``),
    clip_norm clips the total gradient norm, unscaled first (imgcls/precision.py), and
    skip_nonfinite drops a step whose loss is NaN/inf (a host sync per step, hence opt-in)."""

    precision: str = "fp32"
    scaler: object = None
    clip_norm: float | None = None
    skip_nonfinite: bool = False
    accumulate: int = 1  # trainer.accumulate_grad_batches: micro-batches per optimizer step


def train_step(net, optimizer, loss_fn, x, y, settings: StepSettings) -> object:
    """One optimizer step on batch (x, y); the detached loss, or None if it was NaN/inf and
    settings.skip_nonfinite is set. Also what `make bench` times (benchmarks/bench_train.py).

    ``settings.accumulate`` = N > 1: the batch runs as N micro-batches, each loss weighted by its
    share of the batch, gradients summed, one optimizer step (the same update as the whole batch
    but for BatchNorm, whose statistics are per micro-batch); under DDP the first N-1 backward
    passes skip the all-reduce (``no_sync``). A step never stops halfway: resume is exact."""
    scaler = settings.scaler if settings.scaler is not None else make_scaler(x.device, "fp32")
    chunks = list(zip(x.chunk(settings.accumulate), y.chunk(settings.accumulate)))
    total = None
    for i, (xc, yc) in enumerate(chunks):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with sync:
            with autocast(x.device, settings.precision):
                loss = loss_fn(net(xc), yc)
                if len(chunks) > 1:  # each micro-batch's share; no extra kernel in the common case
                    loss = loss * (len(yc) / len(y))
            if settings.skip_nonfinite and not torch.isfinite(loss):
                optimizer.zero_grad(set_to_none=True)  # drop the micro-batches already summed
                return None
            scaler.scale(loss).backward()
        total = loss.detach() if total is None else total + loss.detach()
    apply_gradients(optimizer, scaler, settings.clip_norm)
    return total
