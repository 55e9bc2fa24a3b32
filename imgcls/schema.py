"""The config schema: dataclasses for the fixed-shape parts of the config.

Registered in Hydra's ConfigStore by ``register_configs()`` and named in the defaults lists of
``conf/config.yaml`` (the top level, ``trainer``, ``schedule``) and of each ``conf/data/*.yaml``
option, so OmegaConf itself refuses, while the config is composed (before torch is imported),
a key the schema does not have (``trainer.epoch=3``, with or without ``+``) and a value of the
wrong type (``trainer.epochs=2.5``). Range checks a type cannot express (lr > 0,
label_smoothing in [0, 1), one of a few strings) are in ``imgcls.config.validate_config``.

The open-ended groups (model, optimizer, scheduler, logger: any ``_target_``) stay free-form.
This module imports neither torch nor the project's components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, List, Optional

from omegaconf import MISSING


@dataclass
class TrainerConfig:
    epochs: int = 16
    batch_size: int = 512  # images per optimizer step (all ranks together)
    eval_batch_size: int = 1024
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16
    compile: bool = False
    deterministic: bool = False
    label_smoothing: float = 0.2
    skip_nonfinite: bool = False
    tta_flip: bool = False
    eval_every: int = 1  # epochs
    log_every: int = 50  # optimizer steps
    checkpoint_every: int = 1  # epochs
    keep_checkpoints: int = 2
    limit_train_batches: Optional[int] = None
    limit_eval_batches: Optional[int] = None
    seed: int = 0
    progress: Any = "auto"  # auto | true | false


@dataclass
class ScheduleConfig:
    interval: str = "step"  # step | epoch: when the scheduler steps
    steps_per_epoch: int = MISSING  # filled in from the data by train.py (and the preview)
    warmup: Optional[float] = None  # a warmup fraction, for the options that read ${schedule.warmup}
    allow_truncated: bool = False  # true: run a schedule whose phases do not fit (a warning)


# ---- data options: each takes only its own keys ---------------------------------------
@dataclass
class Augmentation:
    crop_padding: int = 4  # random-crop translation, in pixels (reflect padding)
    flip: bool = True  # random horizontal flip
    alternating_flip: bool = False  # airbench: each image flipped in one of every two epochs


@dataclass
class CifarData(Augmentation):
    NAMES: ClassVar[tuple] = ("cifar10", "cifar100")
    name: str = "cifar10"  # cifar10 | cifar100
    root: str = "data"
    download: bool = True
    num_classes: int = 10


@dataclass
class ImageFolderData(Augmentation):
    NAMES: ClassVar[tuple] = ("image_folder",)
    name: str = "image_folder"
    root: str = "data"
    path: str = MISSING  # the folder (or archive) with train/<class>/*, test/<class>/*
    num_classes: Optional[int] = None  # taken from the class folders


@dataclass
class SyntheticData(Augmentation):
    NAMES: ClassVar[tuple] = ("synthetic",)
    name: str = "synthetic"
    num_classes: int = 10
    synthetic_size: List[int] = field(default_factory=lambda: [512, 256])  # [train, test] images


@dataclass
class Config:
    """The top level. ``data`` gets its option's schema from the option's defaults list."""

    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    logger: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resume: str = "auto"  # auto | never | the path of a checkpoint
    resume_force: bool = False


SCHEMAS = {  # ConfigStore name -> node; conf/ names them in its defaults lists
    "base_config": Config,
    "schema/data/cifar": CifarData,
    "schema/data/image_folder": ImageFolderData,
    "schema/data/synthetic": SyntheticData,
}


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        group, _, leaf = name.rpartition("/")
        cs.store(name=leaf, group=group or None, node=node)
