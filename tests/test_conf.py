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
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from imgcls.config import register_resolvers, validate_config
from sched import needs_metrics

CONF = Path(__file__).resolve().parent.parent / "conf"
OPTIONS = sorted(
    (str(p.parent.relative_to(CONF)), p.stem) for p in CONF.rglob("*.yaml") if p.parent != CONF
)
# What an option needs from outside to compose (image_folder has no default path).
NEEDS = {("data", "image_folder"): ["data.path=/some/folder"]}
# Options that need an optional extra: the _target_ they name -> the package (and extra).
OPTIONAL = {"timm_model": "timm", "WandbLogger": "wandb", "MLflowLogger": "mlflow"}
register_resolvers()


def compose_with(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides))
    with open_dict(cfg):
        cfg.schedule.steps_per_epoch = 10  # what train.py fills in from the data
    return cfg


def test_the_walk_found_every_group():
    groups = {g for g, _ in OPTIONS}
    assert {"data", "model", "optimizer", "scheduler", "trainer", "experiment"} <= groups
    assert len([o for g, o in OPTIONS if g == "scheduler"]) >= 7


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_option_composes_validates_and_instantiates(group, option, tmp_path):
    cfg = compose_with(f"{group}={option}", *NEEDS.get((group, option), []))
    OmegaConf.resolve(cfg)  # every interpolation resolves
    if cfg.trainer.device == "cuda" and not torch.cuda.is_available():
        with open_dict(cfg):
            cfg.trainer.device = "cpu"  # a GPU preset still composes and builds here
    validate_config(cfg, tmp_path)
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
        logger = open_logger(instantiate(cfg.logger), tmp_path, len(optimizer.param_groups),
                             config=OmegaConf.to_container(cfg, resolve=True), runs={})
        logger.log({"step": 1, "epoch": 0.1, "lr": scheduler.get_last_lr(), "train_loss": 1.0})
        logger.close()


@pytest.mark.parametrize("option", [o for g, o in OPTIONS if g == "scheduler"])
def test_scheduler_option_steps_100_times(option):
    cfg = compose_with(f"scheduler={option}", "trainer.epochs=10")  # 100 steps at 10 per epoch
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = instantiate(cfg.optimizer, _convert_="all")(params)
    scheduler = instantiate(cfg.scheduler)(optimizer)  # the partial call train.py makes
    metrics = needs_metrics(scheduler)
    lrs = []
    for step in range(100):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step(1.0) if metrics else scheduler.step()
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
    assert lrs[75] == pytest.approx(lrs[74]) and lrs[74] == pytest.approx(peak * (1 + math.cos(math.pi * 0.74)) / 2)
    assert max(abs(a - b) for a, b in zip(lrs, lrs[1:])) < 0.05 * peak  # smooth everywhere
    assert lrs[80:] == pytest.approx([0.05 * peak] * 20)
