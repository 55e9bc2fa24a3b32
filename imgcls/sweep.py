"""The sweep summary: a Hydra callback that tabulates every job of `python train.py -m ...`.

Each job writes ``status.json`` into its own directory when it ends (in whatever process the
launcher ran it), and at the end of the multirun the callback reads every job directory of
the sweep and writes ``summary.csv`` and ``summary.md`` there, and prints the table. A failed
job is listed as failed, with its error; it does not stop the others.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

COLUMNS = ("job", "overrides", "status", "final_test_acc", "best_test_acc", "train_seconds", "error")


class SweepSummary(Callback):
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if str(config.hydra.mode) != "RunMode.MULTIRUN":
            return  # a single run has results.json; the table is for sweeps
        run_dir = Path(config.hydra.runtime.output_dir)
        failed = job_return.status.name == "FAILED"
        status = {
            "overrides": list(config.hydra.overrides.task),
            "status": "failed" if failed else "completed",
            "error": f"{job_return._return_value}" if failed else "",
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "status.json").write_text(json.dumps(status) + "\n")
        # Refreshed after every job: Hydra's basic sweeper re-raises a failed job's error once
        # all jobs ran, and then on_multirun_end is never called.
        write_summary(Path(config.hydra.sweep.dir), summarize(Path(config.hydra.sweep.dir)))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        rows = summarize(sweep_dir)
        write_summary(sweep_dir, rows)
        print(markdown_table(rows))
        print(f"sweep summary: {sweep_dir / 'summary.csv'} and {sweep_dir / 'summary.md'}")


def summarize(sweep_dir: Path) -> list[dict]:
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if (p / "status.json").exists()), key=_job_order):
        status = json.loads((job / "status.json").read_text())
        results_file = job / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        rows.append(
            {
                "job": job.name,
                "overrides": " ".join(status["overrides"]),
                "status": status["status"],
                "final_test_acc": results.get("final_test_acc"),
                "best_test_acc": results.get("best_test_acc"),
                "train_seconds": results.get("train_seconds"),
                "error": status["error"].splitlines()[0] if status["error"] else "",
            }
        )
    return rows


def _job_order(p: Path):
    return (0, int(p.name)) if p.name.isdigit() else (1, p.name)


def write_summary(sweep_dir: Path, rows: list[dict]) -> None:
    """summary.csv and summary.md, each replaced atomically (jobs may end concurrently)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for name, text in (("summary.csv", buf.getvalue()), ("summary.md", markdown_table(rows) + "\n")):
        tmp = sweep_dir / f".{name}.{os.getpid()}.tmp"
        tmp.write_text(text)
        os.replace(tmp, sweep_dir / name)


def markdown_table(rows: list[dict]) -> str:
    def cell(v):
        if v is None:
            return ""
        if isinstance(v, float):
            return f"{v:.4f}"
        return str(v).replace("|", "\\|")

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)
