"""SequentialLR: torch's own cases ported, parity with torch, the fixes, validation, state."""

from __future__ import annotations

import io
import warnings

import pytest
import torch
from omegaconf import OmegaConf
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

from sched import SequentialLR
from tests.sched_cases import P, assert_close, make_optimizer, reference, run

# A test that must pass for ours and fail for torch's class: torch's defect, pinned.
BOTH = [
    pytest.param(SequentialLR, id="ours"),
    pytest.param(TorchSequentialLR, id="torch", marks=pytest.mark.xfail(strict=True, reason="torch's defect")),
]


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --------------------------------------------------------------------------------------
# torch's own SequentialLR cases (test/optim/test_lrscheduler.py), values hand-computed.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [SequentialLR, TorchSequentialLR])
def test_exponential_then_step(cls):
    opt = make_optimizer()
    s = cls(opt, [ExponentialLR(opt, gamma=0.8), StepLR(opt, gamma=0.1, step_size=4)], [3])
    want = [0.05, 0.04, 0.032] + [0.05] * 4 + [0.005] * 4 + [0.0005] * 4 + [0.00005] * 4
    assert_close(run(s, opt, 19), [[w] for w in want])


@pytest.mark.parametrize("cls", [SequentialLR, TorchSequentialLR])
def test_constant_then_exponential(cls):
    opt = make_optimizer()
    s = cls(opt, [ConstantLR(opt, factor=0.1, total_iters=2), ExponentialLR(opt, gamma=0.9)], [3])
    want = [0.005, 0.005, 0.05] + [0.05 * 0.9**x for x in range(7)]
    assert_close(run(s, opt, 10), [[w] for w in want])


@pytest.mark.parametrize("cls", [SequentialLR, TorchSequentialLR])
@pytest.mark.parametrize("tensor_lr", [False, True])
def test_three_phases_two_groups(cls, tensor_lr):
    """Constant -> Exponential -> Step with milestones [3, 6], two groups, through get_last_lr."""
    opt = make_optimizer(2, tensor_lr)
    s = cls(
        opt,
        [
            ConstantLR(opt, factor=0.1, total_iters=3),
            ExponentialLR(opt, gamma=0.9),
            StepLR(opt, gamma=0.1, step_size=2),
        ],
        [3, 6],
    )
    one = [0.1, 0.1, 0.1, 1, 0.9, 0.81, 1, 1, 0.1, 0.1, 0.01, 0.01]
    want = [[0.05 * f, 0.5 * f] for f in one]
    assert_close(run(s, opt, 12), want)


@pytest.mark.parametrize("cls", [SequentialLR, TorchSequentialLR])
def test_construction_keeps_phase0_lr(cls):
    """Building later children moves the lr; SequentialLR puts phase 0's step-0 lr back."""
    opt = make_optimizer()
    s = cls(opt, [LinearLR(opt, start_factor=0.5, total_iters=4), ConstantLR(opt, factor=0.2)], [4])
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025, rel=1e-15)
    assert s.get_last_lr() == [pytest.approx(0.025, rel=1e-15)]


def test_docstring_example_of_torch():
    """The example in torch's SequentialLR docstring: 0.005 x20, then 0.05, 0.045, 0.0405."""
    opt = make_optimizer()
    s = SequentialLR(opt, [ConstantLR(opt, factor=0.1, total_iters=20), ExponentialLR(opt, gamma=0.9)], [20])
    lrs = [x[0] for x in run(s, opt, 23)]
    assert_close([[x] for x in lrs], [[0.005]] * 20 + [[0.05], [0.045], [0.0405]])


@pytest.mark.parametrize("cls", [SequentialLR, TorchSequentialLR])
def test_no_warnings_over_ten_steps(cls):
    opt = make_optimizer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = cls(opt, [ConstantLR(opt, factor=0.1, total_iters=2), ExponentialLR(opt, gamma=0.9)], [3])
        run(s, opt, 10)


@pytest.mark.parametrize("cls", [SequentialLR, TorchSequentialLR])
def test_tensor_lr_not_aliased_with_initial_lr(cls):
    opt = make_optimizer(tensor_lr=True)
    lr_tensor = opt.param_groups[0]["lr"]
    s = cls(opt, [ConstantLR(opt, factor=0.1, total_iters=2), ExponentialLR(opt, gamma=0.9)], [3])
    run(s, opt, 5)
    group = opt.param_groups[0]
    assert group["lr"] is lr_tensor, "the lr tensor must stay the same object"
    assert group["lr"] is not group["initial_lr"]
    assert float(group["initial_lr"]) == 0.05


@pytest.mark.parametrize("cls", [SequentialLR, TorchSequentialLR])
def test_milestones_with_zeros(cls):
    """[0, 0, 1]: phases 0 and 1 never run; phase 2 at step 0, phase 3 from step 1."""
    opt = make_optimizer()
    s = cls(
        opt,
        [
            ConstantLR(opt, factor=0.1, total_iters=10),
            ConstantLR(opt, factor=0.2, total_iters=10),
            ConstantLR(opt, factor=0.3, total_iters=10),
            ExponentialLR(opt, gamma=0.9),
        ],
        [0, 0, 1],
    )
    want = [0.05 * 0.3] + [0.05 * 0.9**x for x in range(5)]
    assert_close(run(s, opt, 6), [[w] for w in want])


@pytest.mark.parametrize("cls", [SequentialLR, TorchSequentialLR])
def test_state_dict_weights_only_round_trip(cls):
    opt = make_optimizer()
    s = cls(opt, [ConstantLR(opt, factor=0.1, total_iters=2), ExponentialLR(opt, gamma=0.9)], [3])
    run(s, opt, 4)
    state = roundtrip(s.state_dict())
    opt2 = make_optimizer()
    s2 = cls(opt2, [ConstantLR(opt2, factor=0.1, total_iters=2), ExponentialLR(opt2, gamma=0.9)], [3])
    s2.load_state_dict(state)
    opt2.load_state_dict(roundtrip(opt.state_dict()))
    assert_close(run(s2, opt2, 6), run(s, opt, 6))


# --------------------------------------------------------------------------------------
# Parity with torch wherever torch is right.
# --------------------------------------------------------------------------------------
RIGHT = {
    "step": P(StepLR, step_size=3, gamma=0.5),
    "multistep": P(MultiStepLR, milestones=[2, 5], gamma=0.3),
    "constant": P(ConstantLR, factor=0.25, total_iters=3),
    "linear": P(LinearLR, start_factor=0.2, end_factor=0.9, total_iters=4),
    "exponential": P(ExponentialLR, gamma=0.8),
    "polynomial": P(PolynomialLR, total_iters=5, power=2.0),
    "cosine": P(CosineAnnealingLR, T_max=6, eta_min=0.001),
    "lambda": P(LambdaLR, lr_lambda=lambda s: 1 / (1 + s)),
    "cyclic": P(CyclicLR, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "warm_restarts": P(CosineAnnealingWarmRestarts, T_0=3, T_mult=2, eta_min=0.002),
}


@pytest.mark.parametrize("first", sorted(RIGHT))
@pytest.mark.parametrize("second", ["exponential", "cosine", "lambda", "cyclic", "warm_restarts", "linear"])
@pytest.mark.parametrize("n_groups,tensor_lr", [(1, False), (2, True)])
def test_parity_with_torch(first, second, n_groups, tensor_lr):
    def build(cls):
        opt = make_optimizer(n_groups, tensor_lr)
        kids = [RIGHT[first](opt), RIGHT[second](opt), RIGHT["step"](opt)]
        return opt, cls(opt, kids, [4, 9])

    ours, torchs = build(SequentialLR), build(TorchSequentialLR)
    got, want = run(ours[1], ours[0], 16), run(torchs[1], torchs[0], 16)
    assert_close(got, want, what=f"{first} -> {second} -> step")
    # Built from callables, each phase is built on untouched param groups: the definition
    # holds even where an object child's constructor moved initial_lr (CyclicLR first).
    factories = [RIGHT[first], RIGHT[second], RIGHT["step"]]
    opt = make_optimizer(n_groups, tensor_lr)
    from_callables = run(SequentialLR(opt, factories, [4, 9]), opt, 16)
    assert_close(from_callables, reference(factories, [4, 9], 16, n_groups, tensor_lr), what="definition")
    if first != "cyclic":
        assert_close(from_callables, got, rel=0, what="callables == objects")


@pytest.mark.parametrize("milestones", [[0, 3], [0, 0], [2, 2], [5, 5]])
def test_parity_with_torch_degenerate_milestones(milestones):
    def build(cls):
        opt = make_optimizer()
        kids = [RIGHT["linear"](opt), RIGHT["exponential"](opt), RIGHT["cosine"](opt)]
        return opt, cls(opt, kids, milestones)

    (o1, s1), (o2, s2) = build(SequentialLR), build(TorchSequentialLR)
    assert_close(run(s1, o1, 10), run(s2, o2, 10))


# --------------------------------------------------------------------------------------
# Children as callables (functools.partial, lambdas), nested composites.
# --------------------------------------------------------------------------------------
def test_callable_children_equal_object_children():
    opt1 = make_optimizer(2)
    s1 = SequentialLR(opt1, [LinearLR(opt1, start_factor=0.1, total_iters=3), ExponentialLR(opt1, gamma=0.9)], [3])
    opt2 = make_optimizer(2)
    s2 = SequentialLR(
        opt2,
        [P(LinearLR, start_factor=0.1, total_iters=3), lambda o: ExponentialLR(o, gamma=0.9)],
        [3],
    )
    assert_close(run(s2, opt2, 10), run(s1, opt1, 10), rel=0)


def test_nested_three_deep_matches_definition():
    inner = P(
        SequentialLR,
        schedulers=[P(CosineAnnealingLR, T_max=4), P(ConstantLR, factor=0.1, total_iters=99)],
        milestones=[4],
    )
    middle = P(SequentialLR, schedulers=[P(ExponentialLR, gamma=0.7), inner], milestones=[2])
    factories = [P(LinearLR, start_factor=0.1, total_iters=3), middle, P(StepLR, step_size=2, gamma=0.5)]
    opt = make_optimizer(2)
    s = SequentialLR(opt, factories, [3, 10])
    got = run(s, opt, 16)
    assert_close(got, reference(factories, [3, 10], 16, 2))
    # the inner cosine runs 4 steps starting at step 5, then the constant tail until step 10
    assert got[5][0] == pytest.approx(0.05)
    assert got[9][0] == pytest.approx(0.005)


# --------------------------------------------------------------------------------------
# The fixes: each test fails on torch's class.
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", BOTH)
def test_fix_multiplicative_as_later_phase(cls):
    opt = make_optimizer()
    s = cls(opt, [ConstantLR(opt, factor=0.1, total_iters=10), MultiplicativeLR(opt, lambda e: 0.5)], [2])
    assert_close(run(s, opt, 5), [[0.005], [0.005], [0.05], [0.025], [0.0125]])


# torch's class crashes on its own composites at their milestone; it restarts ours correctly
# because ours implements _update_lr (test_torch_composite_holding_ours), so that pair is absent.
@pytest.mark.parametrize(
    "cls,composite",
    [pytest.param(SequentialLR, c, id=f"ours-{c}") for c in ("ours", "torch_sequential", "chained")]
    + [
        pytest.param(TorchSequentialLR, c, marks=BOTH[1].marks, id=f"torch-{c}")
        for c in ("torch_sequential", "chained")
    ],
)
def test_fix_composite_as_later_phase(cls, composite):
    opt = make_optimizer()
    if composite == "chained":
        inner = ChainedScheduler(
            [ConstantLR(opt, factor=0.5, total_iters=2), ExponentialLR(opt, gamma=0.9)], optimizer=opt
        )
        want = [0.005, 0.005, 0.05 * 0.5, 0.05 * 0.5 * 0.9, 0.05 * 0.9**2, 0.05 * 0.9**3]
    else:
        inner_cls = SequentialLR if composite == "ours" else TorchSequentialLR
        inner = inner_cls(opt, [ConstantLR(opt, factor=0.5, total_iters=9), ExponentialLR(opt, gamma=0.9)], [2])
        want = [0.005, 0.005, 0.025, 0.025, 0.05, 0.045]
    s = cls(opt, [ConstantLR(opt, factor=0.1, total_iters=9), inner], [2])
    assert_close(run(s, opt, 6), [[w] for w in want])


@pytest.mark.parametrize("cls", BOTH)
def test_fix_sequential_as_first_phase_milestone_on_time(cls):
    opt = make_optimizer()
    inner = TorchSequentialLR(opt, [ConstantLR(opt, factor=0.1, total_iters=9), ExponentialLR(opt, gamma=0.9)], [3])
    s = cls(opt, [inner, ConstantLR(opt, factor=0.5, total_iters=99)], [6])
    want = [0.005] * 3 + [0.05, 0.045, 0.0405] + [0.025] * 2
    assert_close(run(s, opt, 8), [[w] for w in want])


@pytest.mark.parametrize("cls", BOTH)
def test_fix_chained_as_first_phase_decays_once(cls):
    opt = make_optimizer()
    inner = ChainedScheduler([ConstantLR(opt, factor=0.1, total_iters=2), ExponentialLR(opt, gamma=0.9)], optimizer=opt)
    s = cls(opt, [inner, ConstantLR(opt, factor=0.5, total_iters=99)], [4])
    want = [0.005, 0.0045, 0.05 * 0.81, 0.05 * 0.729, 0.025]
    assert_close(run(s, opt, 5), [[w] for w in want])


@pytest.mark.parametrize("cls", BOTH)
def test_fix_composite_first_phase_no_warning(cls):
    opt = make_optimizer()
    inner = TorchSequentialLR(opt, [ConstantLR(opt, factor=0.1, total_iters=9), ExponentialLR(opt, gamma=0.9)], [3])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = cls(opt, [inner, ExponentialLR(opt, gamma=0.5)], [5])
        run(s, opt, 8)


def _onecycle_factories():
    return [
        P(LinearLR, start_factor=0.5, total_iters=2),
        P(OneCycleLR, max_lr=1.0, total_steps=10),
        P(ExponentialLR, gamma=0.9),
    ]


@pytest.mark.parametrize("cls", BOTH)
def test_fix_onecycle_as_phase(cls):
    """OneCycleLR's constructor writes initial_lr = max_lr/div_factor; other phases keep 0.05."""
    opt = make_optimizer()
    if cls is TorchSequentialLR:  # torch takes objects only
        factories = _onecycle_factories()
        kids = [f(opt) for f in factories]
    else:
        factories = kids = _onecycle_factories()
    s = cls(opt, kids, [2, 6])
    got = run(s, opt, 9)
    assert got[0] == [pytest.approx(0.025)]
    assert got[6] == [pytest.approx(0.05)], "the phase after OneCycleLR starts from the base lr"
    assert_close(got, reference(factories, [2, 6], 9))


def test_onecycle_keys_belong_to_their_phase():
    opt = make_optimizer()
    s = SequentialLR(opt, _onecycle_factories(), [2, 6])
    group = opt.param_groups[0]
    assert group["initial_lr"] == 0.05 and "max_lr" not in group
    run(s, opt, 3)
    assert group["initial_lr"] == pytest.approx(1.0 / 25) and group["max_lr"] == 1.0
    run(s, opt, 4)
    assert group["initial_lr"] == 0.05 and "max_lr" not in group


@pytest.mark.parametrize("cls", BOTH)
def test_fix_reduce_on_plateau_phase(cls):
    opt = make_optimizer()
    plateau = ReduceLROnPlateau(opt, factor=0.5, patience=0)
    s = cls(opt, [LinearLR(opt, start_factor=0.1, total_iters=2), plateau], [2])
    lrs = []
    for metric in [None, None, 1.0, 1.0, 1.0, 0.5]:
        lrs.append(s.get_last_lr()[0])
        opt.step()
        s.step(metric) if metric is not None else s.step()
    lrs.append(s.get_last_lr()[0])
    # warmup 0.005, 0.0275 -> plateau starts at base 0.05; 1.0 is best, then two bad -> halve twice
    assert lrs == pytest.approx([0.005, 0.0275, 0.05, 0.05, 0.025, 0.0125, 0.0125])


def test_step_without_metrics_in_plateau_phase_raises_and_changes_nothing():
    opt = make_optimizer()
    s = SequentialLR(opt, [P(ConstantLR, factor=0.1, total_iters=1), P(ReduceLROnPlateau)], [1])
    s.step()  # milestone: the plateau phase starts, no metrics needed
    before = (s.last_epoch, s.get_last_lr())
    with pytest.raises(ValueError, match=r"phase 1 \(ReduceLROnPlateau\).*step\(metrics\)"):
        s.step()
    assert (s.last_epoch, s.get_last_lr()) == before
    s.step(1.0)
    assert s.last_epoch == 2


def test_metrics_ignored_by_other_phases_and_forwarded_through_nesting():
    opt = make_optimizer()
    nested = P(
        SequentialLR,
        schedulers=[P(ExponentialLR, gamma=0.5), P(ReduceLROnPlateau, factor=0.1, patience=0)],
        milestones=[1],
    )
    s = SequentialLR(opt, [P(ConstantLR, factor=0.1, total_iters=9), nested], [1])
    s.step(3.0)  # ConstantLR ignores the metric; milestone -> nested starts
    s.step(3.0)  # nested: its milestone -> plateau starts
    s.step(1.0)  # best
    s.step(1.0)  # bad -> x0.1
    assert s.get_last_lr()[0] == pytest.approx(0.005)
    with pytest.raises(ValueError, match="ReduceLROnPlateau"):
        s.step()


@pytest.mark.parametrize("cls", BOTH)
@pytest.mark.parametrize("resume_at", [1, 3, 4, 7])
def test_fix_last_epoch_resumes_at_step(cls, resume_at):
    def kids(opt):
        return [LinearLR(opt, start_factor=0.1, total_iters=4), MultiplicativeLR(opt, lambda e: 0.9)]

    opt = make_optimizer()
    full = run(SequentialLR(opt, kids(opt), [4]), opt, 10)
    opt2 = make_optimizer()
    s2 = cls(opt2, kids(opt2), [4], last_epoch=resume_at)
    assert_close(run(s2, opt2, 10 - resume_at), full[resume_at:])


# --------------------------------------------------------------------------------------
# Validation.
# --------------------------------------------------------------------------------------
def _two(opt):
    return [ConstantLR(opt, factor=0.5), ExponentialLR(opt, gamma=0.9)]


@pytest.mark.parametrize(
    "milestones,match",
    [
        ([2.0], r"milestones\[0\] must be an int.*float 2.0"),
        ([True], r"milestones\[0\] must be an int \(bool refused\)"),
        (["3"], r"milestones\[0\] must be an int.*str '3'"),
        ([-1], r"milestones\[0\] must be >= 0, got -1"),
        ([], r"exactly one fewer.*got 0 milestones \[\] for 2 schedulers"),
        ([1, 2], r"exactly one fewer.*got 2 milestones"),
        (3, r"milestones must be a list of ints, got int 3"),
    ],
)
def test_bad_milestones(milestones, match):
    opt = make_optimizer()
    with pytest.raises(ValueError, match=match):
        SequentialLR(opt, _two(opt), milestones)


def test_unsorted_milestones():
    opt = make_optimizer()
    kids = [ConstantLR(opt, factor=0.5), ExponentialLR(opt, gamma=0.9), StepLR(opt, 2)]
    with pytest.raises(ValueError, match=r"milestones\[1\] = 2 is smaller than milestones\[0\] = 5"):
        SequentialLR(opt, kids, [5, 2])


def test_empty_list():
    with pytest.raises(ValueError, match="at least one scheduler, got an empty list"):
        SequentialLR(make_optimizer(), [], [])


def test_child_bound_to_another_optimizer():
    opt, other = make_optimizer(), make_optimizer()
    with pytest.raises(ValueError, match=r"schedulers\[1\] \(ExponentialLR\) is bound to another optimizer"):
        SequentialLR(opt, [ConstantLR(opt), ExponentialLR(other, gamma=0.9)], [2])


def test_callable_building_for_another_optimizer():
    opt, other = make_optimizer(), make_optimizer()
    with pytest.raises(ValueError, match=r"schedulers\[1\] built a ExponentialLR bound to another"):
        SequentialLR(opt, [P(ConstantLR), lambda o: ExponentialLR(other, gamma=0.9)], [2])
    assert opt.param_groups[0]["lr"] == 0.05


def test_child_neither_scheduler_nor_callable():
    opt = make_optimizer()
    with pytest.raises(TypeError, match=r"schedulers\[0\] must be a scheduler or a callable"):
        SequentialLR(opt, [3, P(ConstantLR)], [1])
    with pytest.raises(TypeError, match=r"schedulers\[0\] is a callable that returned int"):
        SequentialLR(opt, [lambda o: 3], [])


def test_duplicate_milestones_allowed_and_skip_phases():
    opt = make_optimizer()
    s = SequentialLR(opt, [P(ConstantLR, factor=0.1), P(ConstantLR, factor=0.2), P(ExponentialLR, gamma=0.5)], [2, 2])
    assert [x[0] for x in run(s, opt, 4)] == pytest.approx([0.005, 0.005, 0.05, 0.025])


# --------------------------------------------------------------------------------------
# State.
# --------------------------------------------------------------------------------------
def test_state_dict_with_listconfig_milestones_loads_weights_only():
    opt = make_optimizer()
    milestones = OmegaConf.create({"m": [2]}).m
    s = SequentialLR(opt, [P(ConstantLR, factor=0.1), P(MultiStepLR, milestones=OmegaConf.create([1, 3]))], milestones)
    state = roundtrip(s.state_dict())
    assert state["_milestones"] == [2] and type(state["_milestones"]) is list


def test_state_layout_matches_torch():
    o1, o2 = make_optimizer(), make_optimizer()
    ours = SequentialLR(o1, _two(o1), [2])
    theirs = TorchSequentialLR(o2, _two(o2), [2])
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [list(c) for c in ours.state_dict()["_schedulers"]] == [list(c) for c in theirs.state_dict()["_schedulers"]]


@pytest.mark.parametrize("save_cls,load_cls", [(SequentialLR, TorchSequentialLR), (TorchSequentialLR, SequentialLR)])
@pytest.mark.parametrize("at", [0, 2, 3, 5])
def test_state_loads_across_classes(save_cls, load_cls, at):
    def build(cls):
        opt = make_optimizer(2)
        return opt, cls(
            opt, [ConstantLR(opt, factor=0.1, total_iters=2), ExponentialLR(opt, gamma=0.9), StepLR(opt, 2)], [3, 5]
        )

    o1, s1 = build(save_cls)
    run(s1, o1, at)
    o2, s2 = build(load_cls)
    s2.load_state_dict(roundtrip(s1.state_dict()))
    o2.load_state_dict(roundtrip(o1.state_dict()))
    assert_close(run(s2, o2, 8), run(s1, o1, 8), rel=0)


def test_load_refuses_other_phase_count_and_class():
    opt = make_optimizer()
    state = SequentialLR(opt, _two(opt), [2]).state_dict()
    opt2 = make_optimizer()
    three = SequentialLR(opt2, [P(ConstantLR), P(ExponentialLR, gamma=0.9), P(StepLR, step_size=2)], [2, 4])
    with pytest.raises(ValueError, match="saved SequentialLR state has 2 phases, this one has 3"):
        three.load_state_dict(state)
    other = SequentialLR(opt2, [P(ConstantLR), P(StepLR, step_size=2)], [2])
    with pytest.raises(
        ValueError,
        match=r"saved phase 1 does not match phase 1 of this SequentialLR \(StepLR\).*missing.*step_size.*unexpected.*\[\]",
    ):
        other.load_state_dict(state)


def test_load_does_not_modify_callers_dict():
    opt = make_optimizer()
    s = SequentialLR(opt, _two(opt), [2])
    state = s.state_dict()
    keys = list(state)
    s.load_state_dict(state)
    assert list(state) == keys


def test_get_last_lr_returns_new_list():
    opt = make_optimizer()
    s = SequentialLR(opt, _two(opt), [2])
    a, b = s.get_last_lr(), s.get_last_lr()
    assert a == b and a is not b
    a.append(1)
    assert len(s.get_last_lr()) == 1
    assert s.get_lr() == s.get_last_lr()


def test_resume_at_every_step_is_bit_identical():
    factories = [
        P(LinearLR, start_factor=0.1, total_iters=3),
        P(
            SequentialLR,
            schedulers=[P(CosineAnnealingLR, T_max=4), P(MultiplicativeLR, lr_lambda=lambda e: 0.9)],
            milestones=[4],
        ),
        P(OneCycleLR, max_lr=0.3, total_steps=20),
    ]
    opt = make_optimizer(2)
    full = run(SequentialLR(opt, factories, [3, 9]), opt, 14)
    for stop in range(14):
        opt1 = make_optimizer(2)
        s1 = SequentialLR(opt1, factories, [3, 9])
        head = run(s1, opt1, stop)
        sched_state, opt_state = roundtrip(s1.state_dict()), roundtrip(opt1.state_dict())
        opt2 = make_optimizer(2)
        s2 = SequentialLR(opt2, factories, [3, 9])  # built before optimizer.load_state_dict
        opt2.load_state_dict(opt_state)
        s2.load_state_dict(sched_state)
        assert head + run(s2, opt2, 14 - stop) == full, f"stopped at {stop}"


def test_torch_composite_holding_ours():
    """torch's SequentialLR calls our _initial_step/_update_lr: ours still restarts cleanly."""
    opt = make_optimizer()
    ours = SequentialLR(opt, [ConstantLR(opt, factor=0.5, total_iters=9), ExponentialLR(opt, gamma=0.9)], [2])
    outer = TorchSequentialLR(opt, [ConstantLR(opt, factor=0.1, total_iters=9), ours], [2])
    want = [0.005, 0.005, 0.025, 0.025, 0.05, 0.045]
    assert_close(run(outer, opt, 6), [[w] for w in want])
