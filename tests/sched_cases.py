"""Shared builders for the sched tests: optimizers, phase factories, and the reference.

The reference implements the definition in SequentialLR's docstring literally: phase k is
built alone on a fresh optimizer with the same param groups, stepped ``t - m(k)`` times,
and its learning rates are read off.
"""

from __future__ import annotations

import functools
import math

import torch
from torch.optim.lr_scheduler import ReduceLROnPlateau

from sched import SequentialLR, phase_index, phase_start

BASE_LRS = (0.05, 0.5)


def make_optimizer(n_groups: int = 1, tensor_lr: bool = False, momentum: float = 0.9):
    """SGD over ``n_groups`` groups with lrs 0.05, 0.5 (torch's test setup)."""
    groups = []
    for i in range(n_groups):
        lr = torch.tensor(BASE_LRS[i], dtype=torch.float64) if tensor_lr else BASE_LRS[i]
        groups.append({"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr})
    return torch.optim.SGD(groups, lr=BASE_LRS[0], momentum=momentum)


def metric_at(step: int) -> float:
    """A deterministic, mostly flat validation loss: plateaus make ReduceLROnPlateau act."""
    return 1.0 / (1 + step // 4)


def lrs_of(scheduler) -> list[float]:
    return [float(x) for x in scheduler.get_last_lr()]


def run(scheduler, optimizer, steps: int, metrics: bool = False) -> list[list[float]]:
    """Learning rates at steps 0..steps-1, stepping in the documented order."""
    out = []
    for t in range(steps):
        out.append(lrs_of(scheduler))
        optimizer.step()
        if metrics:
            scheduler.step(metric_at(t + 1))
        else:
            scheduler.step()
    return out


def reference(factories, milestones, steps: int, n_groups: int = 1, tensor_lr: bool = False):
    """The definition: each phase built alone on a fresh optimizer, stepped to its local step."""
    phases = {}
    out = []
    for t in range(steps):
        k = phase_index(t, milestones)
        if k not in phases:
            opt = make_optimizer(n_groups, tensor_lr)
            phases[k] = (opt, factories[k](opt))
        opt, sched = phases[k]
        local = t - phase_start(k, milestones)
        if local > 0:
            opt.step()
            if isinstance(sched, ReduceLROnPlateau) or (isinstance(sched, SequentialLR) and _has_plateau(sched)):
                sched.step(metric_at(t))
            else:
                sched.step()
        out.append([float(g["lr"]) for g in opt.param_groups])
    return out


def _has_plateau(s) -> bool:
    from sched import needs_metrics

    return needs_metrics(s)


def assert_close(a, b, rel=1e-12, what=""):
    assert len(a) == len(b), what
    for t, (x, y) in enumerate(zip(a, b)):
        for g, (u, v) in enumerate(zip(x, y)):
            assert math.isclose(u, v, rel_tol=rel, abs_tol=1e-300), (
                f"{what} step {t} group {g}: {u!r} != {v!r}\n got {a}\n want {b}"
            )


P = functools.partial
