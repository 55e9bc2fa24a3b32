"""Mixed precision and gradient clipping: ``trainer.precision`` and ``trainer.grad_clip_norm``.

* ``fp32``: no autocast.
* ``bf16``: autocast to bfloat16 (same exponent range as fp32: no loss scaling needed).
* ``fp16``: autocast to float16 with a ``torch.amp.GradScaler`` (fp16 gradients underflow without
  it); the scaler's state goes into the checkpoint. Runs on a CPU too (tests), slowly.
* ``auto``: bf16 on a GPU that supports it (``torch.cuda.is_bf16_supported()``: Ampere and
  later), fp16 on an older GPU (a T4 or V100 has no bf16 tensor cores), fp32 on a CPU.

``optimizer_step`` is the one backward/step path for all of them: with the scaler disabled
(fp32/bf16) ``scale``/``unscale_``/``step``/``update`` are pass-throughs.
"""

from __future__ import annotations

import contextlib

import torch

from imgcls.schema import PRECISIONS

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(setting: str, device: torch.device) -> str:
    """``fp32`` | ``bf16`` | ``fp16`` for ``trainer.precision`` on ``device``. Checked here too:
    imgcls.evaluate reads a checkpoint's saved config, which no schema composed."""
    if setting not in PRECISIONS:
        raise ValueError(f"trainer.precision: {setting!r} is not accepted; expected one of {list(PRECISIONS)}")
    if setting != "auto":
        return str(setting)
    if device.type != "cuda":
        return "fp32"
    return "bf16" if torch.cuda.is_bf16_supported() else "fp16"


def autocast(device: torch.device, precision: str):
    """The autocast context of a resolved precision (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A GradScaler, enabled only for fp16 (disabled, it scales by 1 and never skips a step)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def optimizer_step(
    loss: torch.Tensor, optimizer, scaler: torch.amp.GradScaler, clip_norm: float | None, parameters=None
) -> None:
    """backward, optional clipping of the total gradient norm to ``clip_norm`` (on the unscaled
    gradients), optimizer step (skipped by the scaler if an fp16 gradient is inf/NaN), zero grads."""
    scaler.scale(loss).backward()
    apply_gradients(optimizer, scaler, clip_norm, parameters)


def apply_gradients(optimizer, scaler: torch.amp.GradScaler, clip_norm: float | None, parameters=None) -> None:
    """The step after the backward pass(es): clip (unscaled first), step, update the scale, zero
    the gradients. Gradient accumulation runs several backward passes, then this once."""
    if clip_norm is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not the loss-scaled ones
        if parameters is None:
            parameters = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def check_clip(value) -> None:
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or value == float("inf")
    ):
        raise ValueError(
            f"trainer.grad_clip_norm: {value!r} is not accepted; expected null (off) or a "
            f"finite number > 0 (the largest total gradient L2 norm)"
        )
