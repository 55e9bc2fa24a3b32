"""Learning-rate schedules for PyTorch: an exact, composable :class:`SequentialLR`.

A library: it imports torch and nothing else outside the standard library (no Hydra).
This package shadows the standard library's ``sched`` module inside this project; nothing
the project imports uses that one (``tests/test_import_sched.py`` checks it).
"""

from sched.sequential import (
    SequentialLR,
    local_step,
    needs_metrics,
    phase_index,
    phase_start,
    restart,
    validate_milestones,
)

__all__ = [
    "SequentialLR",
    "local_step",
    "needs_metrics",
    "phase_index",
    "phase_start",
    "restart",
    "validate_milestones",
]
