"""The config schema: dataclasses for the fixed-shape parts of the config.

Registered in Hydra's ConfigStore by ``register_configs()`` and named in the defaults list of
``conf/config.yaml`` (the top level, ``trainer``, ``schedule``, ``data``), so OmegaConf itself
refuses, while the config is composed (before torch is imported), a key the schema does not have (``trainer.epoch=3``, with or without ``+``) and a value of the
wrong type (``trainer.epochs=2.5``). Range checks a type cannot express (lr > 0,
label_smoothing in [0, 1), one of a few strings) are in ``imgcls.config.validate_config``.

The open-ended parts (model, optimizer, scheduler, logger, data.dataset: any ``_target_``) stay
free-form: a builder's own signature refuses a key it does not take.
This module imports neither torch nor the project's components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class TrainerConfig:
    epochs: int = 16
    batch_size: int = 512  # images per optimizer step (all ranks together)
    eval_batch_size: int = 1024
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    grad_clip_norm: Optional[float] = None  # max total gradient L2 norm; None: off
    ema_decay: Optional[float] = None  # EMA of the weights per step, in (0, 1); None: off
    swa_start: Optional[float] = None  # SWA from this fraction of the run, in [0, 1); None: off
    compile: bool = False
    channels_last: Any = "auto"  # auto (on for CUDA) | true | false
    fused: Any = "auto"  # auto (on for CUDA) | true | false
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


@dataclass
class DataConfig:
    """``data``: the dataset (a free-form ``_target_`` with its own keys, as a model is), and how
    train.py splits and augments it (the same keys for every dataset)."""

    dataset: Any = MISSING  # a builder returning imgcls.data.DataSource (conf/data/<option>.yaml)
    val_size: Any = 0  # validation images held out of train: an int, or a fraction in (0, 1); 0: off
    num_classes: Optional[int] = None  # filled in from the dataset by train.py (evaluate reads it)
    crop_padding: int = 4  # random-crop translation, in pixels (reflect padding)
    flip: bool = True  # random horizontal flip
    alternating_flip: bool = False  # airbench: each image flipped in one of every two epochs


@dataclass
class Config:
    """The top level."""

    data: DataConfig = field(default_factory=DataConfig)
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    logger: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resume: str = "auto"  # auto | never | the path of a checkpoint
    resume_force: bool = False


SCHEMAS = {"base_config": Config}  # ConfigStore name -> node; conf/config.yaml names it in its defaults list


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        group, _, leaf = name.rpartition("/")
        cs.store(name=leaf, group=group or None, node=node)
