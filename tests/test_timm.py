"""model=timm: any timm architecture by name, trained, checkpointed, resumed and compiled by
train.py like the built-in models (CPU, timm's tiny `test_*` architectures)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

timm = pytest.importorskip("timm", reason="timm is not installed (pip install -e '.[timm]')")

from imgcls.models import _hub_reachable, check_input_size, count_flops, resnet18, timm_model  # noqa: E402
from tests.conftest import (  # noqa: E402
    ROOT,
    assert_same_weights,
    metrics,
    run_module,
    run_recipe,
    run_recipe_until_sigterm,
    run_train,
    train_cmd,
    weights,
)

# experiment=smoke sets model sizes per model (conf/experiment_model/): none for timm.
TIMM_SMOKE = ["experiment=smoke", "model=timm", "model.name=test_resnet"]


def test_builds_any_architecture_by_name_with_kwargs_passed_through():
    model = timm_model(num_classes=7, name="test_vit", img_size=32, patch_size=4)
    assert model.patch_embed.patch_size == (4, 4) and model.patch_embed.grid_size == (8, 8)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    out.logsumexp(1).mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_cifar_stem_gives_the_built_in_resnet18():
    model = timm_model(num_classes=10, name="resnet18", cifar_stem=True)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    ours = resnet18(num_classes=10)
    assert count_flops(model) == count_flops(ours) == 1_110_845_440
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in ours.parameters())


def test_timm_resnet18_preset_starts_from_the_built_in_resnet18_weights():
    """conf/model/timm_resnet18.yaml (zero_init_last: false) and model=resnet18 draw the same
    initial weights from the same seed: the preset is the built-in net, built by timm (with timm's
    zero_init_last it trailed by 12 points at a short budget: docs/benchmarks/timm_presets_cpu.md)."""
    from hydra.utils import instantiate

    from imgcls.config import compose_config

    built = []
    for model in ("timm_resnet18", "resnet18"):
        torch.manual_seed(0)
        built.append(instantiate(compose_config([f"model={model}"])[0].model)(num_classes=10).state_dict())
    timm_sd, ours = built
    assert [tuple(t.shape) for t in timm_sd.values()] == [tuple(t.shape) for t in ours.values()]
    for (name, a), b in zip(timm_sd.items(), ours.values()):
        assert torch.equal(a, b), name


def test_shipped_presets_build_for_32x32():
    vit = timm_model(num_classes=10, name="vit_tiny_patch16_224", img_size=32, patch_size=4)
    assert vit.patch_embed.grid_size == (8, 8)  # 64 tokens, not the 2x2 that 16x16 patches give
    assert vit(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(name="resnet18x"), "name='resnet18x' is not a timm architecture; did you mean resnet18"),
        (dict(name="test_vit", cifar_stem=True), "cifar_stem=true: 'test_vit' has no single conv1"),
        (dict(name=""), "name='' is invalid"),
        (dict(name="test_resnet", num_classes=0), "num_classes=0 is invalid"),
    ],
)
def test_bad_arguments_are_one_line_errors(kwargs, match):
    with pytest.raises(ValueError, match=match) as e:
        timm_model(**{"num_classes": 10, **kwargs})
    assert "\n" not in str(e.value)


def test_input_size_check_changes_nothing_and_names_what_a_vit_accepts():
    model = timm_model(num_classes=10, name="test_resnet")  # BatchNorm: running stats would move in train mode
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    check_input_size(model, (3, 32, 32), {"name": "test_resnet"})
    assert model.training and torch.equal(torch.get_rng_state(), rng)
    assert_same_weights(model.state_dict(), before)

    vit = timm_model(num_classes=10, name="test_vit3")  # timm's strict test ViT, built for 160x160
    with pytest.raises(ValueError) as e:
        check_input_size(vit, (3, 32, 32), {"name": "test_vit3"})
    assert str(e.value).startswith(
        "model.name='test_vit3' is built for 160x160 inputs and does not run on the data's 32x32 images"
    )
    assert str(e.value).endswith(
        "set +model.img_size=32 +model.patch_size=4 (an 8x8 grid of patches; docs/models.md 'timm models')"
    )
    assert "\n" not in str(e.value) and vit.training
    with pytest.raises(ValueError, match=r"^model.img_size=64 is built for 64x64 inputs .*; set model.img_size=32 "):
        check_input_size(timm_model(num_classes=10, name="test_vit3", img_size=64), (3, 32, 32), {"img_size": 64})
    check_input_size(timm_model(num_classes=10, name="test_vit3", img_size=32, patch_size=4), (3, 32, 32))


@pytest.mark.slow
def test_vit_left_at_its_input_size_exits_2_before_training(tmp_path):
    run = tmp_path / "run"
    proc = run_train(*TIMM_SMOKE, "model.name=vit_tiny_patch16_224", f"hydra.run.dir={run}", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "error: model: model.name='vit_tiny_patch16_224' is built for 224x224 inputs and does not run on the "
        "data's 32x32 images"
    )
    assert "+model.img_size=32 +model.patch_size=4" in lines[0]
    assert "step=" not in proc.stdout and not run.exists()  # no step ran; no empty run directory is left


def test_pretrained_without_network_is_one_quick_line(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # what a machine without network amounts to
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # restored afterwards
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # an empty cache
    start = time.perf_counter()
    with pytest.raises(ValueError, match="pretrained=true: the weights of 'resnet18' could not be loaded") as e:
        timm_model(num_classes=10, name="resnet18", pretrained=True)
    assert time.perf_counter() - start < 10  # huggingface_hub alone retries for ~45 s
    assert "\n" not in str(e.value) and "model.pretrained=false" in str(e.value)


def test_hub_probe_says_unreachable_for_a_closed_port(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # the discard port: nothing listens here
    assert _hub_reachable(timeout=1.0) is False


def test_pretrained_weights_load_where_they_are_on_disk(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    torch.manual_seed(0)
    source = timm_model(num_classes=10, name="test_resnet")
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    torch.manual_seed(1)  # a different init, so equality below means the file was loaded
    loaded = timm_model(
        num_classes=10,
        name="test_resnet",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / "weights.pth")},
    )
    got, want = loaded.state_dict(), source.state_dict()
    body = [k for k in want if not k.startswith("fc.")]
    assert_same_weights({k: got[k] for k in body}, {k: want[k] for k in body})
    # timm's weights are for its pretrained class count (1000): the classifier is made anew for 10
    assert not torch.equal(got["fc.weight"], want["fc.weight"])


@pytest.mark.slow
def test_pretrained_offline_through_train_py_exits_2_with_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    env.pop("HYDRA_FULL_ERROR", None)
    proc = subprocess.run(
        train_cmd(*TIMM_SMOKE, "model.name=resnet18", "model.pretrained=true", f"hydra.run.dir={tmp_path / 'run'}"),
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model: pretrained=true: the weights of 'resnet18'")


@pytest.mark.slow
def test_unknown_name_through_train_py_exits_2_naming_it(tmp_path):
    proc = run_train(*TIMM_SMOKE, "model.name=restnet18", f"hydra.run.dir={tmp_path}", check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: model: name='restnet18' is not a timm architecture")
    assert "did you mean" in lines[0] and "resnet18" in lines[0]


@pytest.mark.slow
def test_evaluate_and_predict_on_a_timm_checkpoint_agree_with_the_run(tmp_path):
    import csv

    from omegaconf import OmegaConf
    from PIL import Image

    from imgcls.evaluate import load_split

    # a ViT: evaluate/predict must rebuild it with the kwargs in the checkpoint's config
    run = tmp_path / "run"
    vit = ["model.name=test_vit3", "+model.img_size=32", "+model.patch_size=4"]
    run_recipe(run, *TIMM_SMOKE, *vit, "trainer.epochs=1")
    results = json.loads((run / "results.json").read_text())
    last = run / "checkpoints" / "last.pt"

    run_module("imgcls.evaluate", f"checkpoint={last}", f"out={tmp_path / 'eval'}")
    evaluated = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert evaluated["split"] == "test" and evaluated["images"] == 256  # experiment=smoke: 256 test images
    assert evaluated["acc"] == results["final_test_acc"]  # no validation split: the run's last evaluation
    assert evaluated["loss"] == pytest.approx(results["final_test_loss"], rel=1e-5)

    # the same test images as PNG files (lossless): predict's classes give the same accuracy
    cfg = OmegaConf.create(torch.load(last, weights_only=True)["config"])
    images, labels, classes = load_split(cfg, {}, "test")
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.png")
    run_module("imgcls.predict", f"checkpoint={last}", f"images={folder}", f"out={tmp_path / 'p.csv'}", "topk=2")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(rows) == len(labels) == 256
    hits = sum(r["class"] == classes[labels[int(r["file"][-7:-4])]] for r in rows)
    assert hits / len(rows) == evaluated["acc"]


@pytest.mark.slow
def test_train_checkpoint_and_sigterm_resume_are_bit_identical(tmp_path):
    common = [*TIMM_SMOKE, "trainer.epochs=2", "trainer.log_every=1"]
    full = tmp_path / "full"
    run_recipe(full, *common)
    results = json.loads((full / "results.json").read_text())
    assert results["final_test_acc"] > 0.2, "synthetic classes are easy: above chance (0.1)"
    ckpt = torch.load(full / "checkpoints" / "last.pt", weights_only=True)
    plain = timm.create_model("test_resnet", num_classes=10)
    assert ckpt["model"].keys() == plain.state_dict().keys()  # loads into a plain timm model
    plain.load_state_dict(ckpt["model"])

    part = tmp_path / "part"
    stopped = run_recipe_until_sigterm(part, common, after_lines=11)  # 8 steps + 1 evaluation + 2: mid epoch 2
    assert stopped.returncode == 143, stopped.stdout
    resumed = run_recipe(part, *common)
    assert "resumed from" in resumed.stdout
    assert metrics(part) == metrics(full)
    assert_same_weights(weights(part), weights(full))


def test_resume_of_a_model_with_dropout_and_drop_path_is_bit_identical(tmp_path):
    """The checkpoint's RNG state is restored on resume: a model that draws from the global RNG
    (timm's dropout and drop-path) continues as an uninterrupted run, bit for bit."""
    common = [
        *TIMM_SMOKE,
        "+model.drop_rate=0.3",
        "+model.drop_path_rate=0.2",
        "data.dataset.train_size=256",  # 4 steps per epoch
        "data.dataset.test_size=64",
        "trainer.log_every=1",
        "trainer.keep_checkpoints=2",
    ]
    full = tmp_path / "full"
    run_recipe(full, *common)
    epoch1 = full / "checkpoints" / "last.1.pt"  # the run as it stood when epoch 1 ended
    assert torch.load(epoch1, weights_only=True)["state"]["epoch"] == 1
    resumed = tmp_path / "resumed"
    run_recipe(resumed, *common, f"resume={epoch1}")
    assert metrics(resumed) == [m for m in metrics(full) if m["step"] > 4]
    assert_same_weights(weights(resumed), weights(full))


@pytest.mark.slow
def test_compiled_timm_model_trains_and_saves_plain_weights(tmp_path, monkeypatch):
    run = tmp_path / "run"
    # inductor's cache in a fresh folder: it compiles here as on a fresh CI machine, whatever ran before
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor_cache"))
    # compiling dominates (train and eval graphs): 2 steps and 1 evaluation batch are enough
    run_train(
        *TIMM_SMOKE,
        "trainer.epochs=1",
        "trainer.compile=true",
        "trainer.limit_train_batches=2",
        "trainer.limit_eval_batches=1",
        f"hydra.run.dir={run}",
        timeout=600,
    )
    assert any((tmp_path / "inductor_cache").rglob("*.py")), "inductor wrote no kernels: nothing compiled"
    ckpt = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    plain = timm.create_model("test_resnet", num_classes=10)
    assert ckpt["model"].keys() == plain.state_dict().keys()  # never the compiled wrapper's _orig_mod.*
    assert json.loads((run / "results.json").read_text())["final_test_acc"] is not None
