"""logger=csv and logger=tensorboard get the records of metrics.jsonl; none is imported unless chosen."""

from __future__ import annotations

import csv
import json
import os
import subprocess

import pytest

from tests.conftest import ROOT, run_train, train_cmd

SMOKE = ["experiment=smoke", "trainer.epochs=1"]


def test_default_run_imports_no_logger(tmp_path):
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run(
        train_cmd(*SMOKE, f"hydra.run.dir={tmp_path}"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "imgcls.data" in imported
    assert not {"imgcls.loggers", "tensorboard", "torch.utils.tensorboard"} & imported


def test_csv_logger_rows_match_metrics_jsonl(tmp_path):
    run_train(*SMOKE, "logger=csv", "trainer.log_every=1", f"hydra.run.dir={tmp_path}")
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == len(lines) == 9  # 8 steps + 1 evaluation
    for row, line in zip(rows, lines):
        assert int(row["step"]) == line["step"]
        if "lr" in line:
            assert float(row["lr_0"]) == line["lr"][0] and float(row["train_loss"]) == line["train_loss"]
            assert float(row["images_per_second"]) > 0
        else:
            assert float(row["test_acc"]) == line["test_acc"] and row["lr_0"] == ""


def test_tensorboard_logger_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(*SMOKE, "logger=tensorboard", "trainer.log_every=2", f"hydra.run.dir={tmp_path}")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lr/group_0", "loss/train", "loss/test", "accuracy/test", "throughput/images_per_second"} <= tags
    assert [e.step for e in acc.Scalars("lr/group_0")] == [2, 4, 6, 8]
