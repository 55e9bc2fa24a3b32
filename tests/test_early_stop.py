"""Early stopping (trainer.early_stop_patience / early_stop_min_delta): a run ends normally when
validation stops improving, says so in results.json, reads the test split once at the end, and
a stopped-and-resumed run keeps the counter (system tier: the refusal through train.py in a
subprocess; the runs in process, the SIGTERM sent to this process)."""

from __future__ import annotations

import json

import pytest

from tests.conftest import metrics, run_recipe, run_recipe_until_sigterm, run_train

# min_delta 0.99: no evaluation after the first can count as a gain, so the run stops after
# exactly 1 + patience evaluations (a deterministic plateau on the synthetic data).
EARLY = [
    "experiment=smoke",
    "data.val_size=0.25",  # 384 training images: 6 steps per epoch
    "trainer.epochs=6",
    "scheduler=constant",
    "trainer.early_stop_min_delta=0.99",
]


def evals(run_dir) -> list[dict]:
    return [r for r in metrics(run_dir) if "val_acc" in r]


@pytest.mark.slow
def test_a_run_stops_after_patience_evaluations_without_a_gain(tmp_path):
    run_recipe(tmp_path, *EARLY, "trainer.early_stop_patience=2")
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["stopped_early"] == 3 and results["steps"] == 3 * 6
    assert [r["epoch"] for r in evals(tmp_path)] == [1, 2, 3]
    assert not any("test_acc" in r for r in metrics(tmp_path))  # the test split: once, in results.json
    assert results["final_test_acc"] is not None
    # run again: it finished (early), nothing to train
    again = run_recipe(tmp_path, *EARLY, "trainer.early_stop_patience=2")
    assert "already finished" in again.stdout


@pytest.mark.slow
def test_a_resumed_run_keeps_the_counter(tmp_path):
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    overrides = [*EARLY, "trainer.early_stop_patience=2"]
    run_recipe(whole, *overrides)  # in process: bit-identical to a subprocess, without its start-up
    # 4 lines an epoch (3 train lines, 1 evaluation): the 9th is in epoch 3, after 1 evaluation
    # without a gain; a counter reset by the resume would stop one epoch later
    stopped = run_recipe_until_sigterm(parts, overrides, after_lines=9)
    assert stopped.returncode == 143, stopped.stdout[-2000:]
    run_recipe(parts, *overrides)
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, parts))
    assert a["stopped_early"] == b["stopped_early"] == 3
    assert metrics(parts) == metrics(whole)


def test_refused_without_a_validation_split_or_with_swa(tmp_path):
    out = run_train("experiment=smoke", "trainer.early_stop_patience=2", f"hydra.run.dir={tmp_path}", check=False)
    assert out.returncode == 2 and "trainer.early_stop_patience: 2 is not accepted without a validation split" in (
        out.stderr
    )
