"""Start-up: what train.py does before Hydra runs the job (imgcls.config.preflight), and the
composition it saves Hydra (the speed itself is measured by make bench, never asserted)."""

from __future__ import annotations

import pytest
from hydra._internal.hydra import Hydra
from hydra.core.global_hydra import GlobalHydra

from imgcls import config
from imgcls.config import preflight, setup


@pytest.fixture
def composed(monkeypatch) -> list:
    """Every composition of conf/ through Hydra (preflight's, get_mode's, a run's)."""
    setup()
    calls = []
    original = Hydra.compose_config

    def counting(self, *args, **kwargs):
        calls.append(kwargs.get("overrides"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Hydra, "compose_config", counting)
    monkeypatch.setattr(config, "_PREFLIGHT_MODE", [])
    return calls


def test_hydra_reads_a_runs_mode_from_preflights_composition_not_a_new_one(composed):
    preflight(["experiment=smoke", "trainer.epochs=3"])
    assert config._PREFLIGHT_MODE == [("experiment=smoke", "trainer.epochs=3"), None]
    hydra = Hydra.__new__(Hydra)  # get_mode needs no state when it answers from preflight
    before = len(composed)
    assert hydra.get_mode(config_name="config", overrides=["experiment=smoke", "trainer.epochs=3"]) is None
    assert len(composed) == before  # answered without composing conf/ a third time


def test_other_overrides_and_a_multirun_are_composed_by_hydra_as_before(composed):
    preflight(["-m", "experiment=smoke", "optimizer.lr=0.1,0.2"])
    assert config._PREFLIGHT_MODE == []  # a multirun's preflight composes its first job only
    config._PREFLIGHT_MODE[:] = [("experiment=smoke",), None]
    hydra = Hydra.create_main_hydra_file_or_module(None, str(config.CONF_DIR), "config", "train")
    try:
        before = len(composed)
        assert hydra.get_mode(config_name="config", overrides=["experiment=smoke", "trainer.epochs=3"]) is None
        assert len(composed) == before + 1  # Hydra's own get_mode
    finally:
        GlobalHydra.instance().clear()  # created above: the next composition initialises its own
