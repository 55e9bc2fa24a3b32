"""logger=csv, tensorboard, wandb and mlflow get the records of metrics.jsonl; none is imported
unless chosen. W&B and MLflow are read back from what they wrote (the W&B offline run file, the
MLflow store through MlflowClient), offline (tests/conftest.py keeps them off the network)."""

from __future__ import annotations

import csv
import json
import os
import struct
import subprocess
import zlib
from pathlib import Path

import pytest

from tests.conftest import ROOT, run_train, train_cmd

SMOKE = ["experiment=smoke", "trainer.epochs=1"]


@pytest.mark.slow
def test_default_run_imports_no_logger(tmp_path):
    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    proc = subprocess.run(
        train_cmd(*SMOKE, f"hydra.run.dir={tmp_path}"), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "|" in line}
    assert "imgcls.data" in imported
    assert not {"imgcls.loggers", "tensorboard", "torch.utils.tensorboard", "wandb", "mlflow", "timm"} & imported


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


@pytest.mark.slow
def test_tensorboard_logger_writes_scalars(tmp_path):
    pytest.importorskip("tensorboard", reason="the tensorboard package is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_train(*SMOKE, "logger=tensorboard", "trainer.log_every=2", f"hydra.run.dir={tmp_path}")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"lr/group_0", "loss/train", "loss/test", "accuracy/test", "throughput/images_per_second"} <= tags
    assert [e.step for e in acc.Scalars("lr/group_0")] == [2, 4, 6, 8]


def jsonl(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def ckpt_runs(run_dir):
    import torch

    return torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)["state"]["logger_runs"]


# --------------------------------------------------------------------------------------
# W&B: the offline run file is a LevelDB-style log (wandb's own format) of protobuf Records.
# --------------------------------------------------------------------------------------
def read_wandb_run(path: Path) -> dict:
    """{"run": RunRecord, "config": {key: value}, "history": [{key: value}]} of one
    offline-run-*/run-*.wandb file: a 7-byte header (":W&B", magic 0xBEE1, version 0), then
    32 KiB blocks of chunks, each a 7-byte header (crc32, length, type: 1 full, 2 first,
    3 middle, 4 last) and its bytes; a block's tail under 7 bytes is padding."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), (ident, magic, version)
    block, pos, records, parts = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # padding at the end of a block
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # zero fill
            pos += block - pos % block
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF == crc, f"{path}: bad checksum at byte {pos}"
        pos += 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            records.append(rec)
    out = {"run": None, "config": {}, "history": []}
    for rec in records:
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    return out


def wandb_runs(run_dir: Path) -> list[dict]:
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    return [read_wandb_run(f) for f in files]


def assert_same_scalars(history: list[dict], lines: list[dict]) -> None:
    """Each metrics.jsonl line has a tracker row at its step with the same values."""
    assert [h["step"] for h in history] == [m["step"] for m in lines]
    for h, m in zip(history, lines):
        if "train_loss" in m:
            assert h["lr/group_0"] == m["lr"][0] and h["loss/train"] == m["train_loss"]
            assert h["throughput/images_per_second"] > 0
        else:
            assert h["accuracy/test"] == m["test_acc"] and h["loss/test"] == m["test_loss"]
        assert h["epoch"] == m["epoch"]


def test_wandb_mode_is_offline_without_an_api_key(monkeypatch, tmp_path):
    from imgcls.loggers import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # no netrc file: no `wandb login`
    assert wandb_mode(None) == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_mode(None) == "online"  # `wandb login` wrote a key
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "disabled"  # the environment decides when the config does not
    assert wandb_mode("offline") == "offline"  # logger.mode decides over everything
    with pytest.raises(ValueError, match="logger.mode: 'cloud' is not accepted; expected one of"):
        wandb_mode("cloud")


@pytest.mark.slow
def test_wandb_offline_run_has_config_and_every_record_and_a_resume_continues_it(tmp_path):
    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[wandb]')")
    from tests.conftest import run_until_sigterm

    common = ["experiment=smoke", "trainer.epochs=2", "logger=wandb", "trainer.log_every=1"]
    stopped = run_until_sigterm(tmp_path, common, after_lines=11)  # 8 steps + 1 evaluation + 2
    assert stopped.returncode == 143, stopped.stdout  # the tracker leaves train.py's SIGTERM handling alone
    [run] = wandb_runs(tmp_path)
    run_id = run["run"].run_id
    assert run["run"].project == "imgcls" and run["run"].display_name == tmp_path.name
    assert run["config"]["model"]["_target_"] == "imgcls.models.resnet9"
    assert run["config"]["schedule"]["steps_per_epoch"] == 8  # resolved, as train.py filled it
    assert_same_scalars(run["history"], jsonl(tmp_path))
    assert ckpt_runs(tmp_path) == {"wandb": run_id}
    stopped_at = jsonl(tmp_path)[-1]["step"]

    run_train(*common, f"hydra.run.dir={tmp_path}")  # the same command resumes
    first, second = wandb_runs(tmp_path)  # each process writes an offline-run dir...
    assert first["run"].run_id == second["run"].run_id == run_id  # ...of the same run: `wandb sync` makes one
    assert ckpt_runs(tmp_path) == {"wandb": run_id}
    assert_same_scalars(first["history"] + second["history"], jsonl(tmp_path))
    assert second["history"][0]["step"] == stopped_at + 1  # the resumed process logs from the checkpoint on
    assert jsonl(tmp_path)[-1]["step"] == 16  # finished


def mlflow_client(store: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")


def mlflow_history(client, run_id: str, lines: list[dict]) -> list[dict]:
    """The tracker's rows in metrics.jsonl's shape: one dict per (step, kind of line)."""
    hist = {
        k: {m.step: m.value for m in client.get_metric_history(run_id, k)}
        for k in ("lr/group_0", "loss/train", "throughput/images_per_second", "accuracy/test", "loss/test")
    }
    epochs = {}
    for m in client.get_metric_history(run_id, "epoch"):
        epochs.setdefault(m.step, []).append(m.value)
    rows = []
    for m in lines:
        keys = (
            ("lr/group_0", "loss/train", "throughput/images_per_second")
            if "train_loss" in m
            else ("accuracy/test", "loss/test")
        )
        rows.append({"step": m["step"], **{k: hist[k][m["step"]] for k in keys}, "epoch": m["epoch"]})
        assert m["epoch"] in epochs[m["step"]]
    return rows


@pytest.mark.slow
def test_mlflow_store_has_params_metrics_artifacts_and_a_resume_continues_the_run(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[mlflow]')")
    store, run_dir = tmp_path / "mlruns", tmp_path / "run"
    common = ["logger=mlflow", f"logger.tracking_uri={store}", "trainer.log_every=1", f"hydra.run.dir={run_dir}"]
    run_train(*SMOKE, *common)
    client = mlflow_client(store)
    experiment = client.get_experiment_by_name("imgcls").experiment_id
    [run] = client.search_runs([experiment])
    run_id = run.info.run_id
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    assert run.data.params["model._target_"] == "imgcls.models.resnet9"
    assert run.data.params["trainer.epochs"] == "1" and run.data.params["schedule.steps_per_epoch"] == "8"
    lines = jsonl(run_dir)
    assert_same_scalars(mlflow_history(client, run_id, lines), lines)
    arts = {a.path for a in client.list_artifacts(run_id)} | {
        a.path for a in client.list_artifacts(run_id, "checkpoints")
    }
    assert {"results.json", "config.yaml", "checkpoints/last.pt"} <= arts
    local = Path(client.download_artifacts(run_id, "results.json", str(tmp_path)))
    assert json.loads(local.read_text()) == json.loads((run_dir / "results.json").read_text())
    assert ckpt_runs(run_dir) == {"mlflow": run_id}

    # resume (one more epoch: a change a resume accepts; the finished run's lr is 0, so forced)
    run_train("experiment=smoke", "trainer.epochs=2", "resume_force=true", *common)
    [run] = client.search_runs([experiment])  # one run, not two
    assert run.info.run_id == run_id and ckpt_runs(run_dir) == {"mlflow": run_id}
    assert run.info.status == "FINISHED"
    lines = jsonl(run_dir)
    assert [m["step"] for m in lines if "train_loss" in m] == list(range(1, 17))
    assert_same_scalars(mlflow_history(client, run_id, lines), lines)
    assert run.data.params["trainer.epochs"] == "1"  # params are immutable in MLflow...
    assert run.data.tags["changed_on_resume.trainer.epochs"] == "1 -> 2"  # ...so the change is a tag
    assert json.loads(local.read_text()) != json.loads((run_dir / "results.json").read_text())
    (tmp_path / "again").mkdir()
    local = Path(client.download_artifacts(run_id, "results.json", str(tmp_path / "again")))
    assert json.loads(local.read_text()) == json.loads((run_dir / "results.json").read_text())  # replaced


@pytest.mark.slow
@pytest.mark.parametrize("logger", ["wandb", "mlflow"])
def test_each_sweep_job_is_its_own_run_grouped_by_the_sweep(tmp_path, logger):
    pytest.importorskip(logger, reason=f"{logger} is not installed (pip install -e '.[{logger}]')")
    store, sweep = tmp_path / "mlruns", tmp_path / "sweep"
    run_train(
        "-m",
        *SMOKE,
        f"logger={logger}",
        f"logger.tracking_uri={store}" if logger == "mlflow" else "logger.tags=[t]",
        "optimizer.lr=0.1,0.05",
        f"hydra.sweep.dir={sweep}",
    )
    if logger == "wandb":
        runs = [r["run"] for job in ("0", "1") for r in wandb_runs(sweep / job)]
        assert len({r.run_id for r in runs}) == 2
        assert {r.run_group for r in runs} == {str(sweep)}
        # named by the job's overrides (Hydra's override_dirname)
        assert sorted("optimizer.lr=0.05" in r.display_name for r in runs) == [False, True]
    else:
        client = mlflow_client(store)
        runs = client.search_runs([client.get_experiment_by_name("imgcls").experiment_id])
        assert len(runs) == 2 and {r.data.tags["sweep"] for r in runs} == {str(sweep)}
        assert sorted("optimizer.lr=0.05" in r.data.tags["sweep_job"] for r in runs) == [False, True]
        assert sorted(r.data.params["optimizer.lr"] for r in runs) == ["0.05", "0.1"]
