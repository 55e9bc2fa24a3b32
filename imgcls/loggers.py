"""Optional metric loggers, a config group (`logger=csv`, `logger=tensorboard`).

metrics.jsonl is always written by train.py; these receive the same records plus the
training images per second of each log interval. Each is imported only when chosen, and
TensorBoard's package only when its logger is built.
"""

from __future__ import annotations

import csv
from pathlib import Path


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
            "test_loss",
            "test_acc",
        ]
        path = Path(run_dir) / filename
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

    TAGS = {
        "train_loss": "loss/train",
        "test_loss": "loss/test",
        "test_acc": "accuracy/test",
        "images_per_second": "throughput/images_per_second",
    }

    def __init__(self, run_dir: str | Path, num_groups: int, subdir: str = "tensorboard"):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise ValueError(
                "logger=tensorboard needs the tensorboard package: pip install tensorboard "
                "(or the project's `tensorboard` extra)"
            ) from e
        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / subdir))

    def log(self, record: dict) -> None:
        step = record["step"]
        for i, lr in enumerate(record.get("lr", [])):
            self.writer.add_scalar(f"lr/group_{i}", lr, step)
        for key, tag in self.TAGS.items():
            if record.get(key) is not None:
                self.writer.add_scalar(tag, record[key], step)

    def close(self) -> None:
        self.writer.close()
