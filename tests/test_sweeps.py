"""Parallel and searched sweeps through Hydra plugins (the `sweeps` extra), on the smoke preset."""

from __future__ import annotations

import importlib.util
import json

import pytest
import yaml

from tests.conftest import run_train

SMOKE = ["experiment=smoke", "trainer.epochs=1"]


@pytest.mark.slow
def test_joblib_two_parallel_jobs(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="hydra-joblib-launcher is not installed")
    sweep = tmp_path / "sweep"
    run_train(
        "-m",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        *SMOKE,
        "optimizer.lr=0.1,0.05",
        f"hydra.sweep.dir={sweep}",
    )
    for job in ("0", "1"):
        assert json.loads((sweep / job / "results.json").read_text())["steps"] == 8
    rows = (sweep / "summary.csv").read_text().splitlines()[1:]
    assert len(rows) == 2 and all(",completed," in r for r in rows)
    if importlib.util.find_spec("matplotlib"):  # every job's curves, labelled by its overrides
        assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_optuna_two_trials(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="hydra-optuna-sweeper is not installed")
    sweep = tmp_path / "sweep"
    # a validation split to tune on (without one the sweep is refused: docs/bad-input.md)
    val = "data.val_size=64"
    run_train("-m", "hparams_search=optuna", *SMOKE, val, "hydra.sweeper.n_trials=2", f"hydra.sweep.dir={sweep}")
    result = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert set(result["best_params"]) == {"optimizer.lr", "schedule.warmup", "optimizer.weight_decay"}
    best = max(json.loads((sweep / j / "results.json").read_text())["best_val_acc"] for j in ("0", "1"))
    assert result["best_value"] == best  # the objective is train.py's best validation accuracy
