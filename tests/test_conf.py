"""Every option of every config group composes, validates and instantiates.

The groups are found by walking conf/ recursively, so a fork's new file is covered with no
edit here. Scheduler options are built on a real optimizer and stepped 100 times.
"""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from imgcls.checkpoint import config_changes
from imgcls.config import compose_config, validate_config
from imgcls.schedule import SchedulerStepper

CONF = Path(__file__).resolve().parent.parent / "conf"
OPTIONS = sorted((str(p.parent.relative_to(CONF)), p.stem) for p in CONF.rglob("*.yaml") if p.parent != CONF)
# What an option needs from outside to compose (image_folder has no default path).
NEEDS = {("data", "image_folder"): ["data.dataset.path=/some/folder"]}
# A preset's per-scheduler keys (conf/experiment_scheduler/<experiment>_<scheduler>.yaml) are
# composed as Hydra picks them: with that experiment and that scheduler.
for _e in (p.stem for p in (CONF / "experiment").glob("*.yaml")):
    for _p in (CONF / "experiment_scheduler").glob(f"{_e}_*.yaml"):
        NEEDS[("experiment_scheduler", _p.stem)] = [f"experiment={_e}", f"scheduler={_p.stem[len(_e) + 1 :]}"]
# Options that need an optional extra: the _target_ they name -> the package (and extra).
OPTIONAL = {"timm_model": "timm", "WandbLogger": "wandb", "MLflowLogger": "mlflow"}


def compose_with(*overrides: str):
    cfg, _ = compose_config(overrides)
    with open_dict(cfg):
        cfg.schedule.steps_per_epoch = 10  # what train.py fills in from the data
    return cfg


def test_the_walk_found_every_group():
    groups = {g for g, _ in OPTIONS}
    assert {"data", "model", "optimizer", "scheduler", "trainer", "experiment"} <= groups
    assert len([o for g, o in OPTIONS if g == "scheduler"]) >= 7


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_validates_and_instantiates(group, option, tmp_path):
    cfg = compose_with(*NEEDS.get((group, option), []), f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
    validate_config(cfg)  # (the device is picked later: a GPU preset validates here too)
    for target, package in OPTIONAL.items():  # an optional extra that is not installed: skipped, saying so
        if target in str(cfg.model.get("_target_")) + str(cfg.logger.get("_target_")):
            pytest.importorskip(package, reason=f"{package} is not installed (pip install -e '.[{package}]')")
    model = instantiate(cfg.model)(num_classes=cfg.data.num_classes or 10)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, cfg.data.num_classes or 10)
    optimizer = instantiate(cfg.optimizer, _convert_="all")(model.parameters())
    bound = instantiate(cfg.scheduler, optimizer=optimizer)  # the root is _partial_: a partial
    assert isinstance(bound, functools.partial)
    scheduler = bound()  # builds the whole tree
    assert isinstance(scheduler, torch.optim.lr_scheduler.LRScheduler)
    if cfg.logger.get("_target_") is not None:
        from imgcls.loggers import open_logger

        if "tensorboard" in cfg.logger._target_.lower():
            pytest.importorskip("tensorboard", reason="tensorboard is not installed")
        # train.py's call: the trackers also get the config and the checkpoint's run ids
        logger = open_logger(
            instantiate(cfg.logger),
            tmp_path,
            len(optimizer.param_groups),
            config=OmegaConf.to_container(cfg, resolve=True),
            runs={},
        )
        logger.log({"step": 1, "epoch": 0.1, "lr": scheduler.get_last_lr(), "train_loss": 1.0})
        logger.close()


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "scheduler"])
def test_scheduler_option_steps_100_times(option):
    cfg = compose_with(f"scheduler={option}", "trainer.epochs=10")  # 100 steps at 10 per epoch
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = instantiate(cfg.optimizer, _convert_="all")(params)
    scheduler = instantiate(cfg.scheduler)(optimizer)  # the partial call train.py makes
    stepper = SchedulerStepper(scheduler, optimizer, cfg.schedule.interval)  # when train.py steps it
    lrs = []
    for step in range(100):
        lrs.append(stepper.lrs()[0])
        optimizer.step()
        stepper.after_step()
        if (step + 1) % 10 == 0:
            stepper.after_epoch(1.0)  # a flat test loss
    peak = cfg.optimizer.lr
    assert all(0.0 <= lr <= peak * (1 + 1e-12) for lr in lrs), (option, lrs)
    assert len(set(lrs)) > 1 or option == "constant"


def test_swa_option_anneals_from_where_the_cosine_left_off():
    """scheduler=cosine_swa: no jump at the milestone (SWALR starts from the cosine's last lr),
    then 5% of the peak from 80% of the run on."""
    cfg = compose_with("scheduler=cosine_swa", "trainer.epochs=10")  # 100 steps
    optimizer = instantiate(cfg.optimizer, _convert_="all")([torch.nn.Parameter(torch.zeros(3))])
    scheduler = instantiate(cfg.scheduler)(optimizer)
    lrs = []
    for _ in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    peak = cfg.optimizer.lr
    floor = 0.15 * peak  # the cosine's eta_min, reached at step 75
    assert lrs[74] == pytest.approx(floor + (peak - floor) * (1 + math.cos(math.pi * 74 / 75)) / 2)
    assert lrs[75] == pytest.approx(lrs[74])  # handed over, not restarted at the peak
    assert max(abs(a - b) for a, b in zip(lrs, lrs[1:])) < 0.05 * peak  # smooth everywhere
    assert lrs[80:] == pytest.approx([0.05 * peak] * 20)


MODELS = [o for g, o in OPTIONS if g == "model"]


@pytest.mark.parametrize("model", MODELS)
def test_smoke_preset_fits_every_model(model):
    """experiment=smoke sets model sizes per model (conf/experiment_model/): another model gets
    none of resnet9's keys, and builds and runs a forward pass."""
    cfg = compose_with("experiment=smoke", f"model={model}")
    validate_config(cfg)
    net = instantiate(cfg.model)(num_classes=cfg.data.dataset.num_classes)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, cfg.data.dataset.num_classes)


def test_resume_tolerates_where_the_data_lives_not_what_it_is():
    """config_changes on resume: data.dataset.root (and data.dataset.download) are safe, any other
    data key is structural (refused without resume_force), as model/optimizer/scheduler keys are."""
    cifar = {"_target_": "imgcls.data.cifar10", "root": "data", "download": True}
    saved = {"data": {"dataset": cifar, "val_size": 0.1}, "trainer": {"epochs": 2}}
    moved = {
        "data": {"dataset": {**cifar, "root": "/mnt/data", "download": False}, "val_size": 0.1},
        "trainer": {"epochs": 3},
    }
    assert config_changes(saved, moved) == ([], ["data.dataset.download", "data.dataset.root", "trainer.epochs"])
    other = {
        "data": {"dataset": {**cifar, "_target_": "imgcls.data.cifar100"}, "val_size": 0.2},
        "trainer": {"epochs": 2},
    }
    assert config_changes(saved, other) == (["data.dataset._target_", "data.val_size"], [])


EXPERIMENTS = [o for g, o in OPTIONS if g == "experiment"]
SCHEDULERS = [o for g, o in OPTIONS if g == "scheduler"]


@pytest.mark.parametrize("experiment", EXPERIMENTS)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_every_scheduler_fits_every_experiment(experiment, scheduler):
    """Each shipped schedule *fits* each shipped preset (train.py's own misfit check on the
    schedule built for the preset's run, steps per epoch counted from its data config), not
    only builds: a smoke sweep over schedules fails no job (conf/experiment_scheduler/)."""
    from imgcls.schedule import fill_steps_per_epoch, schedule_misfits

    cfg, _ = compose_config([f"experiment={experiment}", f"scheduler={scheduler}"])
    validate_config(cfg)
    fill_steps_per_epoch(cfg)  # as train.py fills it from the data (counted, not read)
    optimizer = instantiate(cfg.optimizer, _convert_="all")([torch.nn.Parameter(torch.zeros(3))])
    scheduler_ = instantiate(cfg.scheduler, _convert_="all")(optimizer)
    assert schedule_misfits(scheduler_, cfg) == []


def test_the_default_run_dir_is_one_per_process():
    """Two runs started in the same second get two run directories: the default names the
    process (outputs/DATE/TIME-PID), so this process and another one resolve different ones."""
    import os
    import subprocess
    import sys

    script = (
        "from imgcls.config import compose_config; from omegaconf import OmegaConf; "
        "cfg = compose_config([], return_hydra_config=True)[0]; "
        "print(OmegaConf.select(cfg, 'hydra.run.dir')); print(OmegaConf.select(cfg, 'hydra.sweep.dir'))"
    )
    root = Path(__file__).resolve().parent.parent
    child = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True)
    cfg, _ = compose_config([], return_hydra_config=True)
    mine = [OmegaConf.select(cfg, "hydra.run.dir"), OmegaConf.select(cfg, "hydra.sweep.dir")]
    assert mine[0].startswith("outputs/") and mine[0].endswith(f"-{os.getpid()}")
    assert mine[1].startswith("multirun/") and mine[1].endswith(f"-{os.getpid()}")
    theirs = child.stdout.split()
    assert len(theirs) == 2 and theirs[0] != mine[0] and theirs[1] != mine[1]
