"""The GPU recipe on the CPU: every code path a CUDA run switches on, exercised without a GPU.

`experiment=cifar10_fast` scaled down (width 8, 512 synthetic images, batch 64) with what a
GPU run turns on: bf16 autocast (`trainer.precision=bf16`), channels_last model and batches
(`trainer.channels_last=true`), the fused optimizer (`trainer.fused=true`) and, in the slow
tier, `torch.compile` (`trainer.compile=true`). It trains, stops on SIGTERM and resumes to the
same learning rates, and its checkpoint holds the plain model, which loads into an uncompiled
one. The per-step work (a batch from the device loader, train_step, scheduler.step) is also
run with every host-sync method of torch.Tensor made to fail (tests/test_gpu.py checks the
same on CUDA with torch's sync debug mode).
"""

from __future__ import annotations

import json

import pytest
import torch
from hydra.utils import instantiate

from imgcls import build, distributed
from imgcls.config import compose_config
from imgcls.device import device_switch, fused_argument
from imgcls.evaluate import evaluate_split
from imgcls.step import StepSettings, train_step
from tests.conftest import build_recipe, metrics, run_train, run_until_sigterm

# cifar10_fast as a GPU runs it, on a CPU in seconds per step: tiny width, synthetic data
TINY = [
    "experiment=cifar10_fast",
    "data=synthetic",
    "model.width=8",
    "trainer.device=cpu",
    "trainer.epochs=3",
    "trainer.batch_size=64",
    "trainer.eval_batch_size=256",
    "trainer.log_every=2",
    "trainer.eval_every=1",
    "trainer.checkpoint_every=1",
]
GPU_SWITCHES = ["trainer.precision=bf16", "trainer.channels_last=true", "trainer.fused=true"]
COMPILED = [*TINY, *GPU_SWITCHES, "trainer.compile=true"]


def compose_fast(*overrides: str):
    return compose_config([*TINY, *overrides])[0]


def conv_weights(model):
    return [p for p in model.parameters() if p.dim() == 4]


# --------------------------------------------------------------------------------------
# the switches
# --------------------------------------------------------------------------------------
def test_auto_means_cuda_only_and_true_false_force_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")  # a device object needs no GPU
    assert [device_switch(v, cpu) for v in ("auto", True, False)] == [False, True, False]
    assert [device_switch(v, cuda) for v in ("auto", True, False)] == [True, True, False]
    assert fused_argument("auto", cuda, torch.optim.SGD) == {"fused": True}
    assert fused_argument("auto", cpu, torch.optim.SGD) == {}  # the CPU default path is unchanged
    assert fused_argument(True, cpu, torch.optim.AdamW) == {"fused": True}
    assert fused_argument(False, cuda, torch.optim.SGD) == {"fused": False}
    assert fused_argument("auto", cuda, torch.optim.RMSprop) == {}  # no fused kernel: the plain one
    with pytest.raises(ValueError, match=r"^trainer.fused: true is not accepted for torch.optim.rmsprop.RMSprop"):
        fused_argument(True, cpu, torch.optim.RMSprop)


def test_gpu_switches_forced_on_a_cpu_reach_model_batches_optimizer_and_autocast():
    cfg, device, data, model, optimizer, scheduler = build_recipe(*TINY, *GPU_SWITCHES)
    assert device.type == "cpu"
    assert all(
        w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in conv_weights(model)
    )
    x, y = next(data.train.epoch_batches(0))
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    assert all(g["fused"] is True for g in optimizer.param_groups)
    seen = []
    model.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
    before = [p.detach().clone() for p in model.parameters()]
    loss = train_step(model, optimizer, loss_fn, x, y, StepSettings(cfg.trainer.precision))
    assert seen == [torch.bfloat16], "the forward pass did not run under bf16 autocast"
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    assert all(not torch.equal(a, b) for a, b in zip(before, model.parameters())), "the fused step changed nothing"


def test_auto_on_a_cpu_keeps_the_plain_path():
    cfg, device, data, model, optimizer, scheduler = build_recipe(*TINY)  # channels_last/fused: auto
    assert cfg.trainer.channels_last == "auto" and cfg.trainer.fused == "auto"
    assert all(w.is_contiguous() for w in conv_weights(model))
    assert next(data.train.epoch_batches(0))[0].is_contiguous()
    assert all(not g.get("fused") for g in optimizer.param_groups)


# --------------------------------------------------------------------------------------
# no host sync per step
# --------------------------------------------------------------------------------------
SYNCING = ("item", "tolist", "numpy", "cpu", "nonzero", "__bool__", "__int__", "__float__")


def test_per_step_work_reads_nothing_back_to_the_host(monkeypatch):
    """What train.py's loop runs every step, with each Tensor method that would wait for a GPU
    (on CUDA: a device-to-host copy) made to raise. The loop itself reads the loss once per
    trainer.log_every steps; under torchrun its stop-signal check is issue 10's."""
    cfg, device, data, model, optimizer, scheduler = build_recipe(*TINY, *GPU_SWITCHES)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.trainer.label_smoothing)
    loss_sum = torch.zeros((), device=device)
    batches = data.train.epoch_batches(0)
    x, y = next(batches)  # the epoch's first batch: the epoch plan is moved to the device once
    loss_sum += train_step(model, optimizer, loss_fn, x, y, StepSettings("bf16")).float()
    scheduler.step()

    def host_sync(name):
        def refuse(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called inside the per-step work: a host sync on CUDA")

        return refuse

    for name in SYNCING:
        monkeypatch.setattr(torch.Tensor, name, host_sync(name))
    steps = 0
    for x, y in batches:
        loss_sum += train_step(model, optimizer, loss_fn, x, y, StepSettings("bf16")).float()
        scheduler.step()
        steps += 1
    monkeypatch.undo()
    assert steps == data.steps_per_epoch - 1 and torch.isfinite(loss_sum)


# --------------------------------------------------------------------------------------
# the whole recipe with torch.compile (slow: inductor compiles C++ on a 2-core CPU)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def compiled_env(tmp_path_factory):
    """Inductor's cache in a fresh folder: it fills only if torch.compile really compiled
    (the later runs of this module reuse it, which saves minutes)."""
    cache = tmp_path_factory.mktemp("inductor_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(cache))
        yield cache


@pytest.fixture(scope="module")
def compiled_run(compiled_env, tmp_path_factory):
    run = tmp_path_factory.mktemp("compiled") / "run"
    run_train(*COMPILED, f"hydra.run.dir={run}", timeout=1200)
    return run


@pytest.mark.slow
def test_compiled_gpu_recipe_trains_on_a_cpu(compiled_run, compiled_env):
    assert any(compiled_env.rglob("*.py")), f"inductor wrote no kernels to {compiled_env}: nothing compiled"
    config = (compiled_run / "config.yaml").read_text()
    for line in (
        "precision: bf16",
        "compile: true",
        "channels_last: true",
        "fused: true",
        "tta_flip: true",
        "alternating_flip: true",
        "label_smoothing: 0.2",
    ):
        assert line in config, f"{line!r} is not in the run's config"
    losses = [m["train_loss"] for m in metrics(compiled_run) if "train_loss" in m]
    assert len(losses) == 12  # 3 epochs x 8 steps, one line per 2 steps
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.3, f"the loss did not fall: {first:.3f} -> {last:.3f}"
    results = json.loads((compiled_run / "results.json").read_text())
    assert results["steps"] == 24 and results["final_test_acc"] > 0.3, results  # chance: 0.1


@pytest.mark.slow
def test_compiled_checkpoint_is_the_plain_model_and_loads_uncompiled(compiled_run):
    ckpt = torch.load(compiled_run / "checkpoints" / "last.pt", weights_only=True)
    state = ckpt["model"]
    assert not any("_orig_mod" in k or k.startswith("module.") for k in state), list(state)[:5]
    assert all(g["fused"] is True for g in ckpt["optimizer"]["param_groups"])
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in state.values() if v.dim() == 4)
    cfg = compose_fast(*GPU_SWITCHES)
    plain = instantiate(cfg.model)(num_classes=10)  # uncompiled, NCHW, fp32
    plain.load_state_dict(state)  # strict: every key matches
    # the loaded model scores what the run reported (eager vs compiled bf16 may flip an image or two)
    data = build.load_data(cfg, torch.device("cpu"), distributed.Dist())
    got = evaluate_split(plain, data.test, cfg.trainer, torch.device("cpu"), "bf16")
    reported = json.loads((compiled_run / "results.json").read_text())["final_test_acc"]
    assert abs(got["test_acc"] - reported) <= 3 / data.test.n, (got, reported)


@pytest.mark.slow
def test_compiled_gpu_recipe_stops_on_sigterm_and_resumes_to_the_same_lrs(compiled_run, tmp_path):
    part = tmp_path / "part"
    stopped = run_until_sigterm(part, COMPILED, after_lines=2, timeout=1200)  # step 4 logged
    assert stopped.returncode == 143, stopped.stdout[-3000:]
    saved = torch.load(part / "checkpoints" / "last.pt", weights_only=True)["state"]
    assert saved["step"] == stopped.signalled_at + 1 and not saved["finished"], saved  # the next step boundary
    resumed = run_train(*COMPILED, f"hydra.run.dir={part}", timeout=1200)
    assert f"at step {saved['step']}" in resumed.stdout
    lrs = lambda run: [(m["step"], m["lr"]) for m in metrics(run) if "lr" in m]  # noqa: E731
    assert lrs(part) == lrs(compiled_run)  # every logged step: the same lr as the uninterrupted run
    assert json.loads((part / "results.json").read_text())["steps"] == 24
    assert not any("_orig_mod" in k for k in torch.load(part / "checkpoints" / "last.pt", weights_only=True)["model"])
