"""The config schema (imgcls/schema.py): unknown keys and wrong types are refused while the
config is composed, in one line naming the key, the value and what is accepted (unit tier:
in-process composition, no training)."""

from __future__ import annotations

import pytest

from imgcls.config import ConfigError, compose_config, validate_config


@pytest.mark.parametrize(
    "overrides,says",
    [
        (
            ["trainer.epoch=3"],
            "trainer.epoch: 3 is not accepted: trainer has no key 'epoch' (did you mean trainer.epochs?)",
        ),
        (
            ["+trainer.epoch=3"],
            "trainer.epoch: 3 is not accepted: trainer has no key 'epoch' (did you mean trainer.epochs?)",
        ),
        (["+schedule.warmpu=0.3"], "(did you mean schedule.warmup?)"),
        (["trainer.epochs=2.5"], "trainer.epochs: 2.5 is not accepted; expected an int"),
        (["trainer.compile=maybe"], "trainer.compile: maybe is not accepted; expected true or false"),
        (["trainer.device=tpu"], "trainer.device: tpu is not accepted; expected one of auto, cpu, cuda"),
        (["trainer.precision=fp8"], "trainer.precision: fp8 is not accepted; expected one of auto, fp32, bf16, fp16"),
        (["schedule.interval=hourly"], "schedule.interval: hourly is not accepted; expected one of step, epoch"),
        (
            ["data=synthetic", "data.dataset.download=true"],
            "data.dataset.download: true is not accepted: data.dataset has no key 'download'",
        ),
        (
            ["data=cifar10", "data.dataset.path=/x"],
            "data.dataset.path: /x is not accepted: data.dataset has no key 'path'",
        ),
        (["+epochs=3"], "epochs: 3 is not accepted: the top level has no key 'epochs'"),
        (["model.widht=3"], "model.widht: 3 is not accepted: model has no key 'widht' (did you mean model.width?)"),
        (["scheduler=nope"], "scheduler: 'nope' is not an option of conf/scheduler/; accepted: constant,"),
    ],
)
def test_composition_refuses_with_one_line(overrides, says):
    with pytest.raises(ConfigError) as e:
        compose_config(overrides)
    assert says in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "overrides,says",
    [
        (
            ["+schedule.warmup=0.3", "scheduler=constant"],
            "schedule.warmup: 0.3 is not accepted: this scheduler option does not read it",
        ),
        (
            ["data=image_folder"],
            "data.dataset.path: ??? (no value) is not accepted; this option needs one: pass data.dataset.path=",
        ),
    ],
)
def test_validation_refuses_what_a_type_cannot_say(overrides, says):
    cfg, _ = compose_config(overrides)
    with pytest.raises(ValueError, match=None) as e:
        validate_config(cfg)
    assert says in str(e.value)


def test_the_schema_holds_every_shipped_value():
    """Every key a shipped file sets is in the schema (composition would refuse it otherwise)."""
    cfg, _ = compose_config(["schedule.warmup=0.3"])  # warmup_linear reads it
    validate_config(cfg)
    assert cfg.trainer.epochs == 16 and cfg.schedule.allow_truncated is False


def test_a_default_is_written_once_values_in_conf_types_in_the_schema():
    """imgcls/schema.py holds types only (every fixed key MISSING); each value is in conf/, and
    conf/trainer/default.yaml and TrainerConfig agree key for key: adding a trainer key is two
    edits, and forgetting either fails here."""
    import dataclasses

    from omegaconf import MISSING, OmegaConf

    from imgcls import schema
    from imgcls.config import CONF_DIR

    nodes = (schema.TrainerConfig, schema.ScheduleConfig, schema.DataConfig, schema.Config)
    second_values = [
        f"{node.__name__}.{f.name} = {f.default!r}"
        for node in nodes
        for f in dataclasses.fields(node)
        if f.default is not MISSING and f.default_factory is dataclasses.MISSING
    ]
    assert not second_values, f"a value in the schema (it belongs in conf/): {second_values}"
    yaml_keys = set(OmegaConf.load(CONF_DIR / "trainer" / "default.yaml"))
    schema_keys = {f.name for f in dataclasses.fields(schema.TrainerConfig)}
    assert yaml_keys == schema_keys, (
        f"only in the schema: {sorted(schema_keys - yaml_keys)}; only in the YAML: {sorted(yaml_keys - schema_keys)}"
    )
    for data in ("cifar10", "cifar100", "image_folder", "synthetic"):
        cfg, _ = compose_config([f"data={data}"])
        filled_by_train_py = {"schedule.steps_per_epoch", "data.dataset.path"}
        for node, prefix in ((cfg.trainer, "trainer"), (cfg.schedule, "schedule"), (cfg, "")):
            for key in node:
                name = f"{prefix}.{key}" if prefix else key
                if name not in filled_by_train_py:
                    assert not OmegaConf.is_missing(node, key), f"{name} has no value in conf/ (data={data})"
        for key in ("val_size", "num_classes"):
            assert not OmegaConf.is_missing(cfg.data, key), f"data.{key} has no value in conf/ (data={data})"
        for key in ("_target_", "crop_padding", "flip", "alternating_flip", "cutout", "batch"):
            assert not OmegaConf.is_missing(cfg.augment, key), f"augment.{key} has no value in conf/"
