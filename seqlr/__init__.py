"""Learning-rate schedules for PyTorch: an exact, composable :class:`SequentialLR`.

A library: it imports torch and nothing else outside the standard library (no Hydra).
``seqlr`` is the name that works everywhere, installed or not: ``from seqlr import
SequentialLR``. Inside a checkout of the template, ``sched`` is the same package under its
historical name (the standard library's ``sched`` shadows it in an installed copy).
"""

from seqlr.sequential import (
    START_FROM,
    SequentialLR,
    default_start_from,
    local_step,
    needs_metrics,
    phase_index,
    phase_start,
    restart,
    validate_milestones,
    validate_start_from,
)

__all__ = [
    "START_FROM",
    "SequentialLR",
    "default_start_from",
    "local_step",
    "needs_metrics",
    "phase_index",
    "phase_start",
    "restart",
    "validate_milestones",
    "validate_start_from",
]
