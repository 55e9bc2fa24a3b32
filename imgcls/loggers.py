"""Optional metric loggers, a config group (`logger=csv`, `logger=tensorboard`, `logger=wandb`,
`logger=mlflow`).

metrics.jsonl is always written by train.py; these receive the same records plus the
training images per second of each log interval. Each is imported only when chosen, and
TensorBoard's, W&B's and MLflow's packages only when their logger is built.

The experiment trackers (W&B, MLflow) also get the resolved config, and a `runs` dict that
train.py keeps in the checkpoint ({"wandb": run id, "mlflow": run id}): a tracker continues
the run named there (a resumed training run continues the same tracked run) and records the
id of its run there. `open_logger` passes `config` and `runs` only to loggers that take them.
"""

from __future__ import annotations

import csv
import inspect
import os
import time
from dataclasses import dataclass
from pathlib import Path

from imgcls.config import flatten_config
from imgcls.io import is_write_fault

# Record key -> the name a logger shows (TensorBoard tag, W&B key, MLflow metric); lr/group_N too.
TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "val_acc": "accuracy/val",
    "test_loss": "loss/test",
    "test_acc": "accuracy/test",
    "images_per_second": "throughput/images_per_second",
}


def open_logger(factory, run_dir, num_groups: int, config: dict | None = None, runs: dict | None = None):
    """Call a logger's factory (the `_partial_` of cfg.logger) with the run directory and the
    number of param groups, plus `config` (the resolved config) and `runs` (the checkpoint's
    tracker run ids, filled in) for the loggers whose constructor takes them. A tracker (W&B,
    MLflow) takes its config node (logger.project, ...) as one ``settings`` mapping."""
    cls, keywords = (factory.func, dict(factory.keywords)) if hasattr(factory, "func") else (factory, {})
    params = inspect.signature(cls).parameters
    extra = {k: v for k, v in (("config", config), ("runs", runs)) if k in params}
    if "settings" in params:
        extra["settings"], keywords = keywords, {}
    return cls(run_dir=run_dir, num_groups=num_groups, **keywords, **extra)


def scalars(record: dict) -> dict:
    """A metrics.jsonl record as named scalars: lr/group_N, loss/train, loss/test, accuracy/test,
    throughput/images_per_second, epoch (absent values left out)."""
    out = {f"lr/group_{i}": float(lr) for i, lr in enumerate(record.get("lr", []))}
    out.update({tag: float(record[key]) for key, tag in TAGS.items() if record.get(key) is not None})
    out["epoch"] = float(record["epoch"])
    return out


def sweep_job() -> tuple[str | None, str | None]:
    """(sweep directory, this job's overrides) in a Hydra multirun, else (None, None): the
    trackers group a sweep's jobs by the first and name each job by the second."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode
    except ImportError:
        return None, None
    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None, None
    hc = HydraConfig.get()
    return str(hc.sweep.dir), hc.job.override_dirname or f"job{hc.job.num}"


class CSVLogger:
    """``metrics.csv`` in the run directory: one row per record, empty cells where a record
    has no such value (training rows have no accuracy, evaluation rows no lr)."""

    def __init__(self, run_dir: str | Path, num_groups: int, filename: str = "metrics.csv"):
        self.columns = [
            "step",
            "epoch",
            *[f"lr_{i}" for i in range(num_groups)],
            "train_loss",
            "images_per_second",
            "val_loss",
            "val_acc",
            "test_loss",
            "test_acc",
        ]
        path = self.path = Path(run_dir) / filename  # .path: named by a write fault (imgcls.reporting.MetricsLog)
        new = not path.exists()
        self.file = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.file, fieldnames=self.columns, extrasaction="ignore")
        if new:
            self.writer.writeheader()

    def log(self, record: dict) -> None:
        row = {k: v for k, v in record.items() if k != "lr"}
        row.update({f"lr_{i}": lr for i, lr in enumerate(record.get("lr", []))})
        self.writer.writerow(row)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoardLogger:
    """TensorBoard event files under ``<run dir>/tensorboard``: ``lr/group_N``,
    ``loss/train``, ``loss/test``, ``accuracy/test``, ``throughput/images_per_second``,
    against the optimizer step. Needs the ``tensorboard`` package (the ``tensorboard`` extra)."""

    TAGS = TAGS

    def __init__(self, run_dir: str | Path, num_groups: int, subdir: str = "tensorboard"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError(
                "logger=tensorboard needs the tensorboard package: pip install tensorboard "
                "(or the project's `tensorboard` extra)"
            ) from e
        self.path = Path(run_dir) / subdir  # named by a write fault (imgcls.reporting.MetricsLog)
        self.writer = SummaryWriter(log_dir=str(self.path))
        _quiet_writer_thread_faults()

    def log(self, record: dict) -> None:
        step = record["step"]
        for i, lr in enumerate(record.get("lr", [])):
            self.writer.add_scalar(f"lr/group_{i}", lr, step)
        for key, tag in self.TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)

    def close(self) -> None:
        self.writer.close()


def _quiet_writer_thread_faults() -> None:
    """TensorBoard writes from a background thread; a full or read-only disk kills that thread,
    which prints its traceback, and the same OSError comes back at the next add_scalar / close in
    the training thread, where train.py reports it in one line (exit 4). Keep only that line."""
    import threading

    if getattr(threading.excepthook, "_imgcls_quiet", False):
        return
    previous = threading.excepthook

    def hook(args):
        module = type(args.thread).__module__ if args.thread is not None else ""
        if module.startswith("tensorboard.") and is_write_fault(args.exc_value):
            return
        previous(args)

    hook._imgcls_quiet = True
    threading.excepthook = hook


# --------------------------------------------------------------------------------------
# Experiment trackers
# --------------------------------------------------------------------------------------
WANDB_MODES = ("online", "offline", "disabled")


def wandb_mode(mode: str | None) -> str:
    """The W&B mode: `mode` if set; else WANDB_MODE if set; else online when an API key is
    there (WANDB_API_KEY, or the netrc entry `wandb login` writes) and offline when not."""
    if mode is None:
        return os.environ.get("WANDB_MODE") or ("online" if _wandb_api_key() else "offline")
    if mode not in WANDB_MODES:
        raise ValueError(f"logger.mode: {mode!r} is not accepted; expected one of {list(WANDB_MODES)} or null")
    return mode


def _wandb_api_key() -> bool:
    import netrc
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False


class WandbLogger:
    """A Weights & Biases run: the resolved config, lr/group_N, loss/train, loss/test,
    accuracy/test, throughput/images_per_second and epoch against the optimizer step (the
    ``step`` key is the x-axis), best and final accuracy of the evaluated split (val, else test)
    in the summary. Files go to
    ``<dir or run dir>/wandb/``; offline runs upload later with ``wandb sync``. Needs the
    ``wandb`` package (the ``wandb`` extra)."""

    @dataclass
    class Settings:
        """conf/logger/wandb.yaml's keys."""

        project: str = "imgcls"
        entity: str | None = None
        mode: str | None = None
        group: str | None = None
        name: str | None = None
        tags: list | None = None
        dir: str | None = None

    def __init__(
        self, run_dir: str | Path, num_groups: int, settings=None, config: dict | None = None, runs: dict | None = None
    ):
        s = self.Settings(**(settings or {}))  # an unknown key: a TypeError naming it (exit 2)
        project, entity, mode, group, name, tags, dir = s.project, s.entity, s.mode, s.group, s.name, s.tags, s.dir
        try:
            import wandb
        except ImportError:  # from None: config_errors would report the ImportError instead
            raise ValueError(
                "logger=wandb needs the wandb package: pip install wandb (or the project's `wandb` extra)"
            ) from None
        runs = {} if runs is None else runs
        sweep, job = sweep_job()
        resume_id = runs.get("wandb")
        self.run = wandb.init(
            project=project,
            entity=entity,
            mode=wandb_mode(mode),
            dir=str(dir or run_dir),
            group=group or sweep,
            name=name or job or Path(run_dir).name,
            tags=list(tags or []),
            id=resume_id,
            resume="allow" if resume_id else None,
        )
        if config is not None:  # a resumed run may change safe keys (trainer.epochs...)
            self.run.config.update(config, allow_val_change=True)
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")  # the optimizer step, not W&B's own counter
        runs["wandb"] = self.run.id
        self.best = None

    def log(self, record: dict) -> None:
        self.run.log({"step": record["step"], **scalars(record)})
        split = "val" if record.get("val_acc") is not None else "test"  # evaluations read val when there is one
        if record.get(f"{split}_acc") is not None:
            acc = record[f"{split}_acc"]
            self.best = acc if self.best is None else max(self.best, acc)
            self.run.summary[f"final_{split}_acc"] = acc
            self.run.summary[f"best_{split}_acc"] = self.best

    def close(self) -> None:
        self.run.finish()


def mlflow_store(tracking_uri: str | None) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment). A path (or null: `mlruns`, or
    MLFLOW_TRACKING_URI when set) is a local store: the SQLite file ``<path>/mlflow.db`` and
    artifacts under ``<path>/artifacts``. A URI with a scheme (sqlite://, http://, file://...)
    is used as it is, its server or store deciding where artifacts go."""
    if tracking_uri is None:
        tracking_uri = os.environ.get("MLFLOW_TRACKING_URI") or "mlruns"
    if "://" in str(tracking_uri) or str(tracking_uri).startswith("databricks"):
        return str(tracking_uri), None
    root = Path(tracking_uri).expanduser().resolve()
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


class MLflowLogger:
    """An MLflow run: the resolved config as params (dotted keys), the same scalars as W&B as
    metrics by optimizer step, the sweep as the tags ``sweep``/``sweep_job``; at the end
    (`log_results`) ``results.json``, ``config.yaml`` and the checkpoint as artifacts. Needs
    ``mlflow`` or ``mlflow-skinny`` (the ``mlflow`` extra)."""

    PARAM_CHARS = 6000  # MLflow's limit on a param value
    BATCH = 100  # MLflow's limit on params per log_batch call

    @dataclass
    class Settings:
        """conf/logger/mlflow.yaml's keys."""

        tracking_uri: str | None = None
        experiment: str = "imgcls"
        run_name: str | None = None
        tags: dict | None = None

    def __init__(
        self, run_dir: str | Path, num_groups: int, settings=None, config: dict | None = None, runs: dict | None = None
    ):
        s = self.Settings(**(settings or {}))  # an unknown key: a TypeError naming it (exit 2)
        tracking_uri, experiment, run_name, tags = s.tracking_uri, s.experiment, s.run_name, s.tags
        try:
            from mlflow.entities import Param
            from mlflow.exceptions import MlflowException
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise ValueError(
                "logger=mlflow needs the mlflow package: pip install mlflow-skinny sqlalchemy alembic "
                "(or the project's `mlflow` extra)"
            ) from None
        runs = {} if runs is None else runs
        uri, artifacts = mlflow_store(tracking_uri)
        self.client = MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(experiment, artifact_location=artifacts)
        params = {}
        if config is not None:
            params = {k: str(v)[: self.PARAM_CHARS] for k, v in flatten_config(config).items()}
        run = None
        if runs.get("mlflow"):
            try:
                run = self.client.get_run(runs["mlflow"])
            except MlflowException:
                print(
                    f"logger=mlflow: run {runs['mlflow']} of the checkpoint is not in {uri}; starting a new run",
                    flush=True,
                )
        if run is not None:  # continue it: params are immutable, so a changed value becomes a tag
            self.run_id = run.info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            old = run.data.params
            for k, v in params.items():
                if k in old and old[k] != v:
                    self.client.set_tag(self.run_id, f"changed_on_resume.{k}", f"{old[k]} -> {v}")
            params = {k: v for k, v in params.items() if k not in old}
        else:
            sweep, job = sweep_job()
            run_tags = {"run_dir": str(Path(run_dir).resolve()), **(tags or {})}
            if sweep:
                run_tags.update(sweep=sweep, sweep_job=job)
            run = self.client.create_run(
                exp_id, run_name=run_name or job or Path(run_dir).name, tags={k: str(v) for k, v in run_tags.items()}
            )
            self.run_id = run.info.run_id
        items = [Param(k, v) for k, v in params.items()]
        for i in range(0, len(items), self.BATCH):
            self.client.log_batch(self.run_id, params=items[i : i + self.BATCH])
        runs["mlflow"] = self.run_id

    def log(self, record: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(k, v, now, int(record["step"])) for k, v in scalars(record).items()]
        )

    def close(self) -> None:
        # "KILLED" until log_results marks it finished: a run stopped by a signal (or a crash)
        # stays KILLED, and a resume sets it RUNNING again.
        self.client.set_terminated(self.run_id, status="KILLED")

    @staticmethod
    def log_results(run_id: str, run_dir: str | Path, tracking_uri: str | None = None) -> None:
        """results.json, config.yaml and the checkpoint (best.pt if there is one, else
        last.pt) as artifacts; the run marked FINISHED."""
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=mlflow_store(tracking_uri)[0])
        run_dir = Path(run_dir)
        for name in ("results.json", "config.yaml"):
            if (run_dir / name).is_file():
                client.log_artifact(run_id, str(run_dir / name))
        for name in ("best.pt", "last.pt"):
            if (run_dir / "checkpoints" / name).is_file():
                client.log_artifact(run_id, str(run_dir / "checkpoints" / name), artifact_path="checkpoints")
                break
        client.set_terminated(run_id, status="FINISHED")


def log_results(logger_cfg, runs: dict, run_dir: str | Path) -> None:
    """After train.py wrote results.json: a tracker that keeps files (MLflow) gets it and the
    checkpoint. Nothing for the other loggers."""
    target = (logger_cfg.get("_target_") if logger_cfg is not None else None) or ""
    if target.endswith("MLflowLogger") and runs.get("mlflow"):
        MLflowLogger.log_results(runs["mlflow"], run_dir, logger_cfg.get("tracking_uri"))
