"""SequentialLR: phases of learning-rate schedules, each as if built alone at its milestone.

A drop-in for :class:`torch.optim.lr_scheduler.SequentialLR` (same constructor, ``step``,
``get_last_lr``, ``get_lr``, ``state_dict``, ``load_state_dict``, ``recursive_undo``; the same
learning rates wherever torch is right) that also

* takes children as scheduler objects *or* as callables ``optimizer -> scheduler``
  (``functools.partial``, Hydra ``_partial_: true`` configs, lambdas), nested to any depth;
* restarts every phase from the base learning rates at its milestone, so chainable children
  (``MultiplicativeLR``) and composite children (``SequentialLR``, ``ChainedScheduler``) work
  in any position;
* gives the param-group keys a phase's constructor writes (``OneCycleLR``'s ``initial_lr``,
  ``max_lr``, ``min_lr``; ``CyclicLR``'s momentum bounds) to that phase alone;
* forwards ``step(metrics)`` to a ``ReduceLROnPlateau`` phase;
* resumes at step ``N`` when built with ``last_epoch=N`` (torch issue 162591);
* validates its milestones and keeps a ``state_dict`` that ``torch.load(weights_only=True)`` reads.

The schedule arithmetic (which phase is active, its local step) is in pure functions of the
step at the top of this module; the class only keeps the children in step with them.
"""

from __future__ import annotations

import bisect
import numbers
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import ChainedScheduler, LRScheduler, ReduceLROnPlateau
from torch.optim.lr_scheduler import SequentialLR as TorchSequentialLR

__all__ = [
    "SequentialLR",
    "phase_index",
    "phase_start",
    "local_step",
    "validate_milestones",
    "needs_metrics",
]

_NO_MILESTONE = sys.maxsize  # the last phase never ends (an int: int/int compares are fastest)
# Keys that every LRScheduler may have, whatever its class: ignored when a saved state is
# matched against a phase (they also vary between torch versions, e.g. ``verbose``).
_COMMON_STATE_KEYS = frozenset({"last_epoch", "base_lrs", "verbose"})
# The warning torch's LRScheduler.step emits when it runs before any optimizer.step(); it
# is expected (and meaningless) while we replay steps to resume at ``last_epoch=N``.
_REPLAY_WARNING = r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`"


# --------------------------------------------------------------------------------------
# Schedule arithmetic: pure functions of the global step.
# --------------------------------------------------------------------------------------
def phase_index(step: int, milestones: Sequence[int]) -> int:
    """Index of the phase active at global ``step``: the number of milestones ``<= step``.

    >>> [phase_index(t, [3, 6]) for t in range(8)]
    [0, 0, 0, 1, 1, 1, 2, 2]
    >>> phase_index(0, [0, 0, 1])  # phases 0 and 1 have length zero
    2
    """
    return bisect.bisect_right(milestones, step)


def phase_start(index: int, milestones: Sequence[int]) -> int:
    """Global step at which phase ``index`` starts: ``m(0) = 0``, ``m(k) = milestones[k-1]``."""
    return 0 if index == 0 else milestones[index - 1]


def local_step(step: int, milestones: Sequence[int]) -> int:
    """Step of the active phase's own schedule at global ``step``: ``t - m(k)``.

    >>> [local_step(t, [3, 6]) for t in range(8)]
    [0, 1, 2, 0, 1, 2, 0, 1]
    """
    return step - phase_start(phase_index(step, milestones), milestones)


def validate_milestones(milestones: Any, num_phases: int) -> list[int]:
    """Return ``milestones`` as a list of Python ints, or raise ``ValueError`` naming the bad one.

    Accepted: a sequence (list, tuple, OmegaConf ``ListConfig``...) of exactly
    ``num_phases - 1`` integers (``bool`` refused), each ``>= 0``, in non-decreasing order.
    Equal milestones are allowed: the phases between them have length zero and never run.
    """
    if isinstance(milestones, (str, bytes)) or not isinstance(milestones, Sequence):
        raise ValueError(f"milestones must be a list of ints, got {type(milestones).__name__} {milestones!r}")
    if len(milestones) != num_phases - 1:
        raise ValueError(
            f"milestones must have exactly one fewer entry than schedulers: got "
            f"{len(milestones)} milestones {list(milestones)!r} for {num_phases} schedulers"
        )
    out: list[int] = []
    for i, m in enumerate(milestones):
        if isinstance(m, bool) or not isinstance(m, numbers.Integral):
            raise ValueError(f"milestones[{i}] must be an int (bool refused), got {type(m).__name__} {m!r}")
        m = int(m)
        if m < 0:
            raise ValueError(f"milestones[{i}] must be >= 0, got {m}")
        if out and m < out[-1]:
            raise ValueError(
                f"milestones must be non-decreasing: milestones[{i}] = {m} is smaller than "
                f"milestones[{i - 1}] = {out[-1]}"
            )
        out.append(m)
    return out


def needs_metrics(scheduler: Any) -> bool:
    """Whether ``scheduler`` (or any phase inside it) is a ``ReduceLROnPlateau``."""
    if isinstance(scheduler, ReduceLROnPlateau):
        return True
    return any(needs_metrics(s) for s in getattr(scheduler, "_schedulers", ()))


# --------------------------------------------------------------------------------------
# Helpers on param groups and children.
# --------------------------------------------------------------------------------------
def _copy(value: Any) -> Any:
    return value.clone() if isinstance(value, torch.Tensor) else value


def _set(group: dict, key: str, value: Any) -> None:
    """``group[key] = value`` that keeps a tensor entry the same tensor (fused/capturable
    optimizers hold on to it), as torch's schedulers do."""
    current = group.get(key)
    if isinstance(current, torch.Tensor):
        current.fill_(value.item() if isinstance(value, torch.Tensor) else value)
    else:
        group[key] = _copy(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    return type(a) is type(b) and a == b


def _group_snapshot(optimizer: Optimizer) -> list[dict]:
    return [{k: _copy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _restore_groups(optimizer: Optimizer, snapshot: list[dict]) -> None:
    """Put every param-group key but ``params`` back to ``snapshot`` (removing new keys)."""
    for group, saved in zip(optimizer.param_groups, snapshot):
        for k in (set(group) | set(saved)) - {"params"}:
            if k in saved:
                _set(group, k, saved[k])
            else:
                group.pop(k, None)


def _is_scheduler(obj: Any) -> bool:
    return hasattr(obj, "optimizer") and callable(getattr(obj, "step", None))


def _current_lrs(optimizer: Optimizer) -> list:
    return [_copy(g["lr"]) for g in optimizer.param_groups]


def restart(scheduler: Any) -> None:
    """Put ``scheduler`` in the state its constructor leaves it in (local step 0), reading
    the learning rates the param groups hold now, as its constructor would."""
    if isinstance(scheduler, SequentialLR):
        scheduler._restart()
    elif isinstance(scheduler, ChainedScheduler):
        for child in scheduler._schedulers:
            restart(child)
        scheduler._last_lr = _current_lrs(scheduler.optimizer)
    elif isinstance(scheduler, TorchSequentialLR):
        # torch's constructor, without its defects: reset to initial_lr, start phase 0.
        for group in scheduler.optimizer.param_groups:
            _set(group, "lr", group["initial_lr"])
        first = scheduler._schedulers[phase_index(0, scheduler._milestones)]
        restart(first)
        scheduler.last_epoch = 0
        scheduler._last_lr = first.get_last_lr()
    elif isinstance(scheduler, ReduceLROnPlateau):
        scheduler._reset()  # best, bad-epoch and cooldown counters
        scheduler.last_epoch = 0
        scheduler._last_lr = _current_lrs(scheduler.optimizer)
    elif isinstance(scheduler, LRScheduler):
        scheduler.last_epoch = -1
        scheduler._initial_step()  # exactly what LRScheduler.__init__ does last
    else:  # a duck-typed scheduler
        scheduler.last_epoch = -1
        scheduler.step()


def _plain(obj: Any) -> Any:
    """``obj`` with OmegaConf containers (and any other non-builtin Mapping/Sequence) turned
    into dicts and lists, so ``torch.load(weights_only=True)`` accepts it."""
    if isinstance(obj, (str, bytes, torch.Tensor)) or obj is None:
        return obj
    if isinstance(obj, dict):
        if type(obj) is not dict:  # Counter, OrderedDict: weights_only accepts them as they are
            return obj
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj) if type(obj) in (list, tuple) else obj
    if isinstance(obj, Mapping):
        return {_plain(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, Sequence):
        return [_plain(v) for v in obj]
    return obj


def _class_keys(state: Mapping) -> set[str]:
    return {k for k in state if not k.startswith("_") and k not in _COMMON_STATE_KEYS}


# --------------------------------------------------------------------------------------
# The class: thin bookkeeping around the functions above.
# --------------------------------------------------------------------------------------
class SequentialLR(LRScheduler):
    r"""Runs learning-rate schedules one after another, switching at milestone steps.

    **Definition.** Let :math:`m(0) = 0` and :math:`m(k)` = ``milestones[k-1]``. At global step
    :math:`t` the active phase is :math:`k` = ``phase_index(t, milestones)`` (the number of
    milestones :math:`\le t`), and every param group's learning rate is the one that phase
    :math:`k` would produce at its local step :math:`t - m(k)` had it been built alone on the
    optimizer at its milestone, on the param groups as they were when this SequentialLR was
    built (learning rates at their base values, ``initial_lr`` where present). Nothing a
    phase did carries into the next one.

    Equal milestones are allowed: the phases between them have length zero and never run
    (``milestones=[0, 0, 1]`` starts in phase 2 and moves to phase 3 at step 1).

    Args:
        optimizer: the optimizer whose param groups' ``lr`` this schedules.
        schedulers: the phases, in order. Each is a scheduler bound to ``optimizer`` or a
            callable that takes ``optimizer`` and returns one (``functools.partial``, a Hydra
            ``_partial_: true`` node, a lambda). Composites (this class, torch's
            ``SequentialLR`` and ``ChainedScheduler``) may stand anywhere. A
            ``ReduceLROnPlateau`` phase takes ``step(metrics)``.
        milestones: ``len(schedulers) - 1`` non-decreasing ints ``>= 0``: the global steps at
            which phases 1, 2, ... start.
        last_epoch: ``-1`` to start at step 0; ``N >= 0`` to resume at step ``N``: the
            learning rates are then those of step ``N`` of a run that never stopped (phases
            are replayed; a ``ReduceLROnPlateau`` phase is replayed without its metrics).

    Callable children are built in order, each on param groups put back to what they held
    when this constructor was called; param-group keys a phase's constructor writes
    (``OneCycleLR``'s ``initial_lr``, ``max_lr``, ``min_lr``; ``CyclicLR``'s momentum) are
    set when that phase starts and put back when another starts. Children passed as objects
    were built by the caller, so what their constructors wrote cannot be undone: pass
    ``OneCycleLR`` as a callable.

    Example (torch's docstring example, whose values hold here too)::

        >>> import torch
        >>> from torch.optim.lr_scheduler import ConstantLR, ExponentialLR
        >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.05)
        >>> sched = SequentialLR(
        ...     opt,
        ...     schedulers=[ConstantLR(opt, factor=0.1, total_iters=20),
        ...                 ExponentialLR(opt, gamma=0.9)],
        ...     milestones=[20],
        ... )
        >>> lrs = []
        >>> for step in range(23):
        ...     lrs.append(sched.get_last_lr()[0])
        ...     opt.step()
        ...     sched.step()
        >>> [round(lrs[t], 6) for t in (0, 1, 2, 19, 20, 21, 22)]
        [0.005, 0.005, 0.005, 0.005, 0.05, 0.045, 0.0405]

    Hydra-style children, here with ``functools.partial``::

        >>> from functools import partial
        >>> from torch.optim.lr_scheduler import LinearLR, MultiplicativeLR
        >>> sched = SequentialLR(
        ...     opt,
        ...     schedulers=[partial(LinearLR, start_factor=0.5, total_iters=2),
        ...                 partial(MultiplicativeLR, lr_lambda=lambda s: 0.5)],
        ...     milestones=[2],
        ... )
        >>> lrs = []
        >>> for step in range(5):
        ...     lrs.append(round(sched.get_last_lr()[0], 6))
        ...     opt.step()
        ...     sched.step()
        >>> lrs  # torch's class gives 0.0375 at step 2: MultiplicativeLR compounds phase 0's lr
        [0.025, 0.0375, 0.05, 0.025, 0.0125]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedulers: Sequence[Any],
        milestones: Sequence[int],
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if isinstance(schedulers, (str, bytes)) or not isinstance(schedulers, Sequence):
            raise ValueError(f"schedulers must be a list, got {type(schedulers).__name__}")
        if len(schedulers) == 0:
            raise ValueError("schedulers must hold at least one scheduler, got an empty list")
        self._milestones = validate_milestones(milestones, len(schedulers))
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, numbers.Integral) or last_epoch < -1:
            raise ValueError(f"last_epoch must be an int >= -1, got {last_epoch!r}")
        for i, s in enumerate(schedulers):
            if _is_scheduler(s):
                if s.optimizer is not optimizer:
                    raise ValueError(
                        f"schedulers[{i}] ({type(s).__name__}) is bound to another optimizer; "
                        f"every phase must schedule the optimizer given to SequentialLR"
                    )
            elif not callable(s):
                raise TypeError(
                    f"schedulers[{i}] must be a scheduler or a callable taking the optimizer, "
                    f"got {type(s).__name__} {s!r}"
                )
        self.optimizer = optimizer
        # What the param groups hold now: every callable child is built on exactly this, as
        # if it were alone; the keys its constructor writes (initial_lr among them) are its own.
        pristine = _group_snapshot(optimizer)
        self._schedulers, self._phase_keys = self._build(optimizer, schedulers, pristine)
        # ...and what the groups go back to when a phase that wrote nothing starts.
        for group in pristine:
            group.setdefault("initial_lr", _copy(group["lr"]))
        self._group_defaults = pristine
        self._base_lrs = [g["initial_lr"] for g in pristine]
        _restore_groups(optimizer, pristine)
        self._phase_key_names = sorted({k for keys in self._phase_keys for g in keys for k in g})
        # Per phase: 1 for ReduceLROnPlateau (step takes metrics), 2 for a SequentialLR of
        # ours (passes metrics on), 0 for the rest (step takes nothing).
        self._kinds = [
            1 if isinstance(s, ReduceLROnPlateau) else 2 if isinstance(s, SequentialLR) else 0 for s in self._schedulers
        ]
        self._restart()
        if last_epoch > 0:
            self._replay(last_epoch)

    @staticmethod
    def _build(optimizer: Optimizer, schedulers: Sequence[Any], pristine: list[dict]):
        built, phase_keys = [], []
        for i, s in enumerate(schedulers):
            if _is_scheduler(s):
                built.append(s)
                phase_keys.append([{} for _ in optimizer.param_groups])
                continue
            _restore_groups(optimizer, pristine)
            child = s(optimizer)
            if not _is_scheduler(child):
                _restore_groups(optimizer, pristine)
                raise TypeError(
                    f"schedulers[{i}] is a callable that returned {type(child).__name__}, not a learning-rate scheduler"
                )
            if child.optimizer is not optimizer:
                _restore_groups(optimizer, pristine)
                raise ValueError(
                    f"schedulers[{i}] built a {type(child).__name__} bound to another optimizer; "
                    f"every phase must schedule the optimizer given to SequentialLR"
                )
            # Keys (other than lr) that this constructor added or changed belong to this phase.
            keys = []
            for group, before in zip(optimizer.param_groups, pristine):
                keys.append(
                    {
                        k: _copy(v)
                        for k, v in group.items()
                        if k not in ("params", "lr") and (k not in before or not _same(v, before[k]))
                    }
                )
            built.append(child)
            phase_keys.append(keys)
        return built, phase_keys

    # -- the phase machinery ------------------------------------------------------------
    def _start_phase(self, index: int) -> None:
        """Phase ``index`` starts: its param-group keys, the base lrs, its local step 0."""
        if self._phase_key_names:
            for group, keys, defaults in zip(
                self.optimizer.param_groups, self._phase_keys[index], self._group_defaults
            ):
                for k in self._phase_key_names:
                    if k in keys:
                        _set(group, k, keys[k])
                    elif k in defaults:
                        _set(group, k, defaults[k])
                    else:
                        group.pop(k, None)
        for group, lr in zip(self.optimizer.param_groups, self._base_lrs):
            _set(group, "lr", lr)
        restart(self._schedulers[index])
        self._activate(index)
        self._last_lr = self._active.get_last_lr()

    def _activate(self, index: int) -> None:
        """Cache what step() needs about the active phase (it runs every optimizer step)."""
        self._phase = index
        self._active = self._schedulers[index]
        self._active_kind = self._kinds[index]
        self._next_milestone = self._milestones[index] if index < len(self._milestones) else _NO_MILESTONE

    def _restart(self) -> None:
        """Back to global step 0 (also what a parent composite calls at our milestone)."""
        self.last_epoch = 0
        self._start_phase(phase_index(0, self._milestones))

    def _replay(self, steps: int) -> None:
        """Advance ``steps`` steps without metrics (resuming at ``last_epoch=N``)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_REPLAY_WARNING)
            for _ in range(steps):
                self.step(None, _replaying=True)

    def step(self, metrics: Any = None, *, _replaying: bool = False) -> None:
        """Advance one step.

        ``metrics`` goes to an active ``ReduceLROnPlateau`` phase (also inside nested
        SequentialLRs) and is ignored by other phases, so a loop may pass it every step.
        While a ``ReduceLROnPlateau`` phase is active, ``step()`` without it raises
        ``ValueError`` and changes nothing. At a milestone the new phase starts (its
        local step 0) and ``metrics`` is not used.
        """
        step = self.last_epoch + 1
        if step >= self._next_milestone:
            self.last_epoch = step
            self._start_phase(phase_index(step, self._milestones))
            return
        child = self._active
        kind = self._active_kind
        if kind == 0:
            child.step()
        elif kind == 1:
            if metrics is None and _replaying:  # no metrics to replay: the lr stays
                child.last_epoch += 1
            elif metrics is None:
                raise ValueError(
                    f"SequentialLR: phase {self._phase} (ReduceLROnPlateau) is active at step "
                    f"{step} and needs the monitored value: call step(metrics)"
                )
            else:
                child.step(metrics)
        else:
            child.step(metrics, _replaying=_replaying)  # raises before changing anything
        self.last_epoch = step
        self._last_lr = child.get_last_lr()

    # -- torch's LRScheduler protocol, for when a torch composite holds us as a child ----
    def _initial_step(self) -> None:
        self._restart()

    def _update_lr(self, epoch: int | None = None) -> None:
        if epoch is None:
            self.step()
        else:
            self._restart()
            self._replay(int(epoch))

    # -- the public API -----------------------------------------------------------------
    def get_last_lr(self) -> list:
        """The learning rates of the current step, one per param group (a new list)."""
        return list(self._last_lr)

    def get_lr(self) -> list:
        """The learning rates the schedule sets at the current step (``get_last_lr()``).

        torch's SequentialLR inherits an ``LRScheduler.get_lr`` that raises
        ``NotImplementedError``; a composite has no rule of its own to compute.
        """
        return list(self._last_lr)

    def recursive_undo(self, sched: Any = None) -> None:
        """Decrement ``last_epoch`` of every leaf scheduler (as torch's method does).

        Kept for API compatibility: this class never needs it, because it restarts each
        phase explicitly.
        """
        scheds = self if sched is None else sched
        if hasattr(scheds, "_schedulers"):
            for s in scheds._schedulers:
                self.recursive_undo(s)
        elif hasattr(scheds, "last_epoch"):
            scheds.last_epoch -= 1

    def state_dict(self) -> dict[str, Any]:
        """``{'_milestones', 'last_epoch', '_last_lr', '_schedulers'}``: torch's layout, with
        plain Python containers only (an OmegaConf ListConfig becomes a list), so
        ``torch.load(weights_only=True)`` reads it and torch's SequentialLR loads it."""
        return {
            "_milestones": list(self._milestones),
            "last_epoch": self.last_epoch,
            "_last_lr": _plain(list(self._last_lr)),
            "_schedulers": [_plain(s.state_dict()) for s in self._schedulers],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state from :meth:`state_dict` (or from torch's SequentialLR).

        Refuses, with ``ValueError``, a state whose phases differ in number or class from
        this scheduler's, saying what differs. ``state_dict`` itself is not modified.
        """
        if not isinstance(state_dict, Mapping):
            raise ValueError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        missing = {"_milestones", "last_epoch", "_schedulers"} - set(state_dict)
        if missing:
            raise ValueError(f"not a SequentialLR state: missing keys {sorted(missing)}")
        saved = list(state_dict["_schedulers"])
        if len(saved) != len(self._schedulers):
            raise ValueError(
                f"saved SequentialLR state has {len(saved)} phases, this one has "
                f"{len(self._schedulers)} ({', '.join(type(s).__name__ for s in self._schedulers)})"
            )
        for i, (child, state) in enumerate(zip(self._schedulers, saved)):
            have, want = _class_keys(state), _class_keys(child.state_dict())
            if have != want:
                raise ValueError(
                    f"saved phase {i} does not match phase {i} of this SequentialLR "
                    f"({type(child).__name__}): keys missing from the saved state "
                    f"{sorted(want - have)}, unexpected keys {sorted(have - want)}"
                )
            if hasattr(child, "_schedulers") and len(state.get("_schedulers", ())) != len(child._schedulers):
                raise ValueError(
                    f"saved phase {i} has {len(state.get('_schedulers', ()))} inner schedulers, "
                    f"phase {i} of this SequentialLR ({type(child).__name__}) has {len(child._schedulers)}"
                )
        milestones = validate_milestones(state_dict["_milestones"], len(self._schedulers))
        for child, state in zip(self._schedulers, saved):
            child.load_state_dict(state)
        self._milestones = milestones
        self.last_epoch = int(state_dict["last_epoch"])
        self._activate(phase_index(self.last_epoch, milestones))
        self._last_lr = list(state_dict.get("_last_lr", self._active.get_last_lr()))
