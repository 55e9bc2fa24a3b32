"""Property-based tests: random compositions of one to four phases of every kind.

For each drawn composition:
* ours (children as callables) equals the definition (each phase built alone, concatenated);
* where torch is right, ours equals torch's SequentialLR (children as objects for both);
* saving at a random step through torch.save / torch.load(weights_only=True), building a
  fresh optimizer and scheduler, loading both and continuing is bit-identical.
"""

from __future__ import annotations

import io

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.optim.lr_scheduler import (
    ChainedScheduler,
    ConstantLR,
    CosineAnnealingLR,
    CosineAnnealingWarmRestarts,
    CyclicLR,
    ExponentialLR,
    LambdaLR,
    LinearLR,
    MultiplicativeLR,
    MultiStepLR,
    OneCycleLR,
    PolynomialLR,
    ReduceLROnPlateau,
    StepLR,
)
from torch.optim.lr_scheduler import SequentialLR as TorchSequentialLR

from sched import SequentialLR, needs_metrics
from tests.sched_cases import P, assert_close, make_optimizer, reference, run

HORIZON = 24  # steps per run
factor = st.floats(0.05, 1.0)
gamma = st.floats(0.5, 0.99)
length = st.integers(1, 8)


def _lambda(kind: int):
    return [lambda s: 1.0 / (1 + s), lambda s: 0.9**s, lambda s: 1.0 if s < 3 else 0.1][kind]


# Each strategy draws (factory, torch_is_right, name).
leaf_right = st.one_of(
    st.builds(lambda n, g: (P(StepLR, step_size=n, gamma=g), True, "step"), length, gamma),
    st.builds(
        lambda ms, g: (P(MultiStepLR, milestones=sorted(set(ms)), gamma=g), True, "multistep"),
        st.lists(st.integers(1, 12), min_size=1, max_size=3),
        gamma,
    ),
    st.builds(lambda f, n: (P(ConstantLR, factor=f, total_iters=n), True, "constant"), factor, length),
    st.builds(
        lambda a, b, n: (P(LinearLR, start_factor=a, end_factor=b, total_iters=n), True, "linear"),
        factor,
        factor,
        length,
    ),
    st.builds(lambda g: (P(ExponentialLR, gamma=g), True, "exponential"), gamma),
    st.builds(lambda n, p: (P(PolynomialLR, total_iters=n, power=p), True, "polynomial"), length, st.floats(0.5, 3.0)),
    st.builds(lambda n, e: (P(CosineAnnealingLR, T_max=n, eta_min=e), True, "cosine"), length, st.floats(0.0, 1e-3)),
    st.builds(lambda k: (P(LambdaLR, lr_lambda=_lambda(k)), True, "lambda"), st.integers(0, 2)),
    st.builds(
        lambda lo, hi, n, cm: (
            P(CyclicLR, base_lr=lo, max_lr=lo + hi, step_size_up=n, cycle_momentum=cm),
            True,
            "cyclic",
        ),
        st.floats(1e-3, 0.05),
        st.floats(0.01, 0.5),
        length,
        st.booleans(),
    ),
    st.builds(
        lambda t0, tm, e: (P(CosineAnnealingWarmRestarts, T_0=t0, T_mult=tm, eta_min=e), True, "warm_restarts"),
        st.integers(1, 5),
        st.integers(1, 2),
        st.floats(0.0, 1e-3),
    ),
)
leaf_other = st.one_of(
    st.builds(lambda f: (P(MultiplicativeLR, lr_lambda=lambda s, f=f: f), True, "multiplicative"), gamma),
    st.builds(
        lambda m, pct: (P(OneCycleLR, max_lr=m, total_steps=HORIZON + 2, pct_start=pct), False, "onecycle"),
        st.floats(0.1, 2.0),
        st.floats(0.1, 0.6),
    ),
    st.builds(
        lambda f, p: (P(ReduceLROnPlateau, factor=f, patience=p), False, "plateau"),
        st.floats(0.1, 0.9),
        st.integers(0, 2),
    ),
)


def _chained(opt, a, b):
    return ChainedScheduler([a(opt), b(opt)], optimizer=opt)


composite = st.one_of(
    st.builds(
        lambda a, b, m: (P(SequentialLR, schedulers=[a[0], b[0]], milestones=[m]), False, "ours"),
        st.one_of(leaf_right, leaf_other),
        st.one_of(leaf_right, leaf_other),
        st.integers(0, 8),
    ),
    st.builds(
        lambda a, b, m: (lambda opt: TorchSequentialLR(opt, [a[0](opt), b[0](opt)], [m]), False, "torch_sequential"),
        leaf_right,
        leaf_right,
        st.integers(1, 8),
    ),
    st.builds(
        lambda a, b: (lambda opt: _chained(opt, a[0], b[0]), False, "chained"),
        st.sampled_from([P(ConstantLR, factor=0.5, total_iters=3), P(LinearLR, start_factor=0.3, total_iters=4)]).map(
            lambda f: (f, True, "")
        ),
        st.sampled_from([P(ExponentialLR, gamma=0.9), P(MultiplicativeLR, lr_lambda=lambda s: 0.95)]).map(
            lambda f: (f, True, "")
        ),
    ),
)
phase = st.one_of(leaf_right, leaf_right, leaf_other, composite)


@st.composite
def compositions(draw):
    phases = draw(st.lists(phase, min_size=1, max_size=4))
    milestones = sorted(draw(st.lists(st.integers(0, 16), min_size=len(phases) - 1, max_size=len(phases) - 1)))
    n_groups = draw(st.integers(1, 2))
    return phases, milestones, n_groups


def _torch_is_right(phases) -> bool:
    for i, (_, right, name) in enumerate(phases):
        if not right or (name == "multiplicative" and i > 0):
            return False
    return True


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(compositions())
def test_equals_definition(case):
    phases, milestones, n_groups = case
    factories = [f for f, _, _ in phases]
    opt = make_optimizer(n_groups)
    s = SequentialLR(opt, factories, milestones)
    got = run(s, opt, HORIZON, metrics=needs_metrics(s))
    assert_close(
        got, reference(factories, milestones, HORIZON, n_groups), what=f"{[n for *_, n in phases]} {milestones}"
    )


@SETTINGS
@given(compositions().filter(lambda c: _torch_is_right(c[0])))
def test_equals_torch_where_torch_is_right(case):
    phases, milestones, n_groups = case

    def build(cls):
        opt = make_optimizer(n_groups)
        return opt, cls(opt, [f(opt) for f, _, _ in phases], milestones)

    (o1, ours), (o2, theirs) = build(SequentialLR), build(TorchSequentialLR)
    assert_close(run(ours, o1, HORIZON), run(theirs, o2, HORIZON), what=f"{[n for *_, n in phases]} {milestones}")


@SETTINGS
@given(compositions(), st.integers(0, HORIZON))
def test_save_and_resume_is_bit_identical(case, stop):
    phases, milestones, n_groups = case
    factories = [f for f, _, _ in phases]
    opt = make_optimizer(n_groups)
    s = SequentialLR(opt, factories, milestones)
    metrics = needs_metrics(s)
    full = run(s, opt, HORIZON, metrics)

    opt1 = make_optimizer(n_groups)
    s1 = SequentialLR(opt1, factories, milestones)
    head = []
    for t in range(stop):  # the same loop as run(), to keep the metric index global
        head.append([float(x) for x in s1.get_last_lr()])
        opt1.step()
        s1.step(_metric(t + 1)) if metrics else s1.step()
    sched_state, opt_state = _roundtrip(s1.state_dict()), _roundtrip(opt1.state_dict())

    opt2 = make_optimizer(n_groups)
    s2 = SequentialLR(opt2, factories, milestones)
    opt2.load_state_dict(opt_state)
    s2.load_state_dict(sched_state)
    tail = []
    for t in range(stop, HORIZON):
        tail.append([float(x) for x in s2.get_last_lr()])
        opt2.step()
        s2.step(_metric(t + 1)) if metrics else s2.step()
    assert head + tail == full


def _metric(step):
    from tests.sched_cases import metric_at

    return metric_at(step)
