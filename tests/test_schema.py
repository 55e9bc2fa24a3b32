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
