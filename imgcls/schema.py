"""The config schema: the TYPES of the fixed-shape parts of the config; their VALUES live in conf/.

One rule, so each default is written once: a key's value (and the comment saying what it
means) is in its YAML file under conf/ (``conf/trainer/default.yaml``, the ``data:`` and
``schedule:`` blocks of ``conf/config.yaml``, a data option's own keys); its type is here, with
no second value (``MISSING``). Adding a trainer key is two edits: a field here and a line in
``conf/trainer/default.yaml`` (tests/test_schema.py checks that the two agree key for key); a
range check, if the key has one, goes in ``imgcls.config.validate_config``.

Registered in Hydra's ConfigStore by ``register_configs()`` and named in the defaults list of
``conf/config.yaml``, so OmegaConf itself refuses, while the config is composed (before torch
is imported), a key the schema does not have (``trainer.epoch=3``, with or without ``+``) and a
value of the wrong type (``trainer.epochs=2.5``). The open-ended parts (model, optimizer,
scheduler, logger, data.dataset: any ``_target_``) stay free-form: a builder's own signature
refuses a key it does not take. This module imports neither torch nor the project's components.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Optional

from omegaconf import MISSING


class Choice(str, Enum):
    """A key with a few allowed string values: composition refuses any other, naming them. A
    ``str`` too (``Device.cuda == "cuda"``, printed as ``cuda``), so the code reads it as the
    string it was. (The auto/true/false switches stay ``Any``, checked by validate_config:
    OmegaConf 2.3 cannot type "a bool or auto", and ``true`` must stay a YAML bool.)"""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


Device = Choice("Device", {v: v for v in ("auto", "cpu", "cuda")})  # auto: cuda if present, else cpu
Precision = Choice("Precision", {v: v for v in ("auto", "fp32", "bf16", "fp16")})
Interval = Choice("Interval", {v: v for v in ("step", "epoch")})  # when the scheduler steps
DEVICES, PRECISIONS, INTERVALS = (tuple(c.__members__) for c in (Device, Precision, Interval))


@dataclass
class TrainerConfig:
    epochs: int = MISSING
    batch_size: int = MISSING
    accumulate_grad_batches: int = MISSING
    eval_batch_size: int = MISSING
    device: Device = MISSING
    precision: Precision = MISSING
    grad_clip_norm: Optional[float] = MISSING
    ema_decay: Optional[float] = MISSING
    swa_start: Optional[float] = MISSING
    early_stop_patience: Optional[int] = MISSING
    early_stop_min_delta: float = MISSING
    compile: bool = MISSING
    channels_last: Any = MISSING
    fused: Any = MISSING
    deterministic: bool = MISSING
    label_smoothing: float = MISSING
    skip_nonfinite: bool = MISSING
    tta_flip: bool = MISSING
    eval_every: int = MISSING
    log_every: int = MISSING
    checkpoint_every: int = MISSING
    keep_checkpoints: int = MISSING
    limit_train_batches: Optional[int] = MISSING
    limit_eval_batches: Optional[int] = MISSING
    seed: int = MISSING
    progress: Any = MISSING
    plot_curves: bool = MISSING


@dataclass
class ScheduleConfig:
    interval: Interval = MISSING
    steps_per_epoch: int = MISSING
    warmup: Optional[float] = MISSING
    allow_truncated: bool = MISSING


@dataclass
class DataConfig:
    """``data``: the dataset (a free-form ``_target_`` with its own keys, as a model is), and how
    train.py splits it (the same keys for every dataset)."""

    dataset: Any = MISSING
    val_size: Any = MISSING
    num_classes: Optional[int] = MISSING


@dataclass
class AugmentConfig:
    """``augment``: imgcls.augment.Augment's keys; ``batch`` is free-form (a ``_target_`` built
    with the data's ``num_classes``, e.g. imgcls.augment.mix)."""

    _target_: str = MISSING
    crop_padding: int = MISSING
    flip: bool = MISSING
    alternating_flip: bool = MISSING
    cutout: int = MISSING
    batch: Any = MISSING


@dataclass
class Config:
    """The top level."""

    data: DataConfig = field(default_factory=DataConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    logger: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    resume: str = MISSING
    resume_force: bool = MISSING


SCHEMAS = {"base_config": Config}  # ConfigStore name -> node; conf/config.yaml names it in its defaults list


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    for name, node in SCHEMAS.items():
        group, _, leaf = name.rpartition("/")
        cs.store(name=leaf, group=group or None, node=node)
