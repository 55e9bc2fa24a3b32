"""Weight averaging: an EMA of the weights, and SWA (equal averaging from a fraction of the run).

Both are ``torch.optim.swa_utils.AveragedModel`` copies of the model, kept beside it:

* EMA (``trainer.ema_decay``, e.g. 0.999): updated after every optimizer step with
  ``get_ema_multi_avg_fn(decay)``, buffers (BatchNorm running statistics) averaged too
  (``use_buffers=True``), so the EMA model is evaluated as it is, no BN recomputation.
* SWA (``trainer.swa_start``, a fraction of the run, e.g. 0.75): equal average of the weights at
  the end of every epoch from that point on (pair it with ``scheduler=cosine_swa``, whose SWALR
  phase starts at 75% of the run); its BatchNorm statistics are recomputed at the end with
  ``update_bn`` over the training split.

Their ``state_dict()`` (the averaged weights and ``n_averaged``) goes into the checkpoint, so a
resumed run continues the same average, bit for bit on a CPU.
"""

from __future__ import annotations

import math

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from imgcls.distributed import unwrap_model


class Averaging:
    """The EMA and/or SWA copies of ``model`` (each None when off)."""

    def __init__(
        self, model: torch.nn.Module, epochs: int, ema_decay: float | None = None, swa_start: float | None = None
    ):
        assert ema_decay is None or 0.0 < ema_decay < 1.0, ema_decay  # validated by imgcls.config
        assert swa_start is None or 0.0 <= swa_start < 1.0, swa_start
        base = unwrap_model(model)
        self.ema = None
        self.swa = None
        if ema_decay is not None:
            self.ema = AveragedModel(base, multi_avg_fn=get_ema_multi_avg_fn(float(ema_decay)), use_buffers=True)
        if swa_start is not None:
            self.swa = AveragedModel(base)
            # first epoch (0-based) whose end is averaged: at least the last one
            self.swa_first_epoch = min(int(math.floor(swa_start * epochs)), epochs - 1)

    @property
    def enabled(self) -> bool:
        return self.ema is not None or self.swa is not None

    def after_step(self, model: torch.nn.Module) -> None:
        if self.ema is not None:
            self.ema.update_parameters(unwrap_model(model))

    def after_epoch(self, model: torch.nn.Module, epoch: int) -> None:
        """``epoch``: the 0-based epoch just finished."""
        if self.swa is not None and epoch >= self.swa_first_epoch:
            self.swa.update_parameters(unwrap_model(model))

    def finish(self, batches) -> None:
        """Recompute the SWA model's BatchNorm statistics over ``batches`` (an iterable of
        (x, y)); call once, after the last epoch and before its evaluation."""
        if self.swa is not None and int(self.swa.n_averaged) > 0:
            update_bn((x for x, _ in batches), self.swa)

    def state_dict(self) -> dict:
        out = {}
        if self.ema is not None:
            out["ema"] = self.ema.state_dict()
        if self.swa is not None:
            out["swa"] = self.swa.state_dict()
        return out

    def load_state_dict(self, d: dict, path) -> None:
        for name in ("ema", "swa"):
            mine = getattr(self, name)
            if mine is None:
                continue
            if name not in d:
                raise ValueError(
                    f"resume: checkpoint {path} has no {name.upper()} weights but "
                    f"trainer.{'ema_decay' if name == 'ema' else 'swa_start'} is set; "
                    f"resume with it unset, or start a new run directory"
                )
            mine.load_state_dict(d[name])


WEIGHTS = ("auto", "raw", "ema", "swa")


def averaged_weights(ckpt: dict, which: str = "auto") -> tuple[dict, str]:
    """(weights, which) a checkpoint's model is evaluated with. auto: SWA in a finished run (its
    BN statistics are recomputed only at the end), else EMA when on, else the raw weights; or
    the one asked for (ValueError if the checkpoint does not have it). The keys are those of a
    plain model."""
    if which not in WEIGHTS:
        raise ValueError(f"weights: {which!r} is not accepted; expected one of {list(WEIGHTS)}")
    if which == "raw":
        return ckpt["model"], "raw"
    avg = ckpt.get("averaging") or {}
    finished = bool((ckpt.get("state") or {}).get("finished"))
    for name in ("swa", "ema") if which == "auto" else (which,):
        sd = avg.get(name)
        if sd is not None and int(sd.get("n_averaged", 0)) > 0 and (name == "ema" or finished):
            prefix = "module."
            return {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}, name
    if which != "auto":
        raise ValueError(
            f"weights: {which!r} but the checkpoint has no {which.upper()} weights"
            + (" yet (SWA's are complete only in a finished run)" if which == "swa" else "")
            + "; use weights=auto or raw"
        )
    return ckpt["model"], "raw"
