"""The sweep summary: a Hydra callback that tabulates every job of `python train.py -m ...`.

Each job writes ``status.json`` into its own directory when it ends (in whatever process the
launcher ran it), and at the end of the multirun the callback reads every job directory of
the sweep and writes ``summary.csv`` and ``summary.md`` there, and prints the table. A failed
job is listed as failed, with its error; it does not stop the others. A job stopped by a
signal and not requeued (SLURM) is listed as stopped, with the step its checkpoint holds
(``imgcls.exits.record_stop``); a job directory with no status at all (killed) as unfinished.
A job train.py refused (bad input, exit code 2 alone; a NaN loss, 3; a write fault, 4) prints the same one ``error:``
line as a single run and returns a ``JobFailed``; once every job ran, train.py exits 1
(``FAILED_JOBS``). Any other error reaches Hydra, which ends the multirun with it (exit code 1)
and never calls ``on_multirun_end``: the table is printed at exit instead, after Hydra's
message, so a sweep always ends with its table.

Columns say which split a number comes from: ``*_val_acc`` on the validation split (``data.val_size``),
``*_test_acc`` on the test split (read once, at the end of each job; ``best_test_acc`` exists only
for runs without a validation split, where "best" was selected on the test split).
"""

from __future__ import annotations

import atexit
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from imgcls.exits import EXIT_BAD_INPUT, EXIT_WRITE_FAULT, JobFailed
from imgcls.io import WriteFault, write_text_atomic
from imgcls.plot import curves_png, read_metrics

FAILED_JOBS = 0  # jobs of the multirun that did not complete (failed, stopped, unfinished), once its table is printed (train.py exits 1)


COLUMNS = (
    "job",
    "overrides",
    "status",
    "best_val_acc",
    "final_val_acc",
    "final_test_acc",
    "best_ckpt_test_acc",
    "best_test_acc",
    "train_seconds",
    "error",
)


def _exit_on_write_fault(method):
    """A full or read-only disk under the sweep directory ends the multirun like train.py's write
    faults: one `error: ...` line naming the file, exit 4 (Hydra would only warn about a callback's
    exception, in several lines, and go on). Every file is replaced atomically, so what was
    written before is intact."""

    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except WriteFault as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_WRITE_FAULT)

    wrapper.__name__, wrapper.__doc__ = method.__name__, method.__doc__
    return wrapper


class SweepSummary(Callback):
    def __init__(self) -> None:
        self._printed = False
        self._atexit_for = None

    @_exit_on_write_fault
    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if str(config.hydra.mode) != "RunMode.MULTIRUN":
            return  # a single run has results.json; the table is for sweeps
        run_dir = Path(config.hydra.runtime.output_dir)
        failed = job_return.status.name == "FAILED" or isinstance(job_return._return_value, JobFailed)
        status = {
            "overrides": list(config.hydra.overrides.task),
            "status": "failed" if failed else "completed",
            "error": f"{job_return._return_value}" if failed else "",
        }
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "status.json", json.dumps(status) + "\n", "the job status")
        # Refreshed after every job: Hydra's basic sweeper re-raises a failed job's error once
        # all jobs ran, and then on_multirun_end is never called.
        sweep_dir = Path(config.hydra.sweep.dir)
        write_summary(sweep_dir, summarize(sweep_dir))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        refusal = slurm_fit_error(config.hydra.launcher)  # before any job is submitted
        if refusal:
            print(f"error: {refusal}", file=sys.stderr, flush=True)
            sys.exit(EXIT_BAD_INPUT)
        # registered in the launching process (with joblib, jobs end in worker processes)
        self._atexit_for = Path(config.hydra.sweep.dir)
        atexit.register(self._print_at_exit)

    @_exit_on_write_fault
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        self._print(Path(config.hydra.sweep.dir))

    def _print_at_exit(self) -> None:
        # Hydra raised a failed job's error, so on_multirun_end never ran
        if not self._printed and self._atexit_for is not None and self._atexit_for.is_dir():
            self._print(self._atexit_for)

    def _print(self, sweep_dir: Path) -> None:
        rows = summarize(sweep_dir)
        write_summary(sweep_dir, rows)
        print(markdown_table(rows), flush=True)
        failed = sum(r["status"] == "failed" for r in rows)
        other = sum(r["status"] not in ("failed", "completed") for r in rows)  # stopped, unfinished
        global FAILED_JOBS
        FAILED_JOBS = failed + other
        notes = [f"{failed} of {len(rows)} jobs failed"] if failed else []
        notes += [f"{other} of {len(rows)} stopped or unfinished"] if other else []
        print(
            f"sweep summary: {sweep_dir / 'summary.csv'} and {sweep_dir / 'summary.md'}"
            + (f" ({'; '.join(notes)})" if notes else ""),
            flush=True,
        )
        self._printed = True


UNFINISHED = {
    "overrides": [],
    "status": "unfinished",
    "error": "no status.json: running, or ended without one (killed?)",
}


def summarize(sweep_dir: Path) -> list[dict]:
    """One row per job directory of the sweep (a directory a job of it wrote: status.json, or
    Hydra's .hydra/ or train.py's config.yaml): completed, failed, stopped (by a signal: with
    the step it saved), or unfinished (still running, or killed without a word)."""
    rows = []
    jobs = (p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith(".") and _is_job(p))
    for job in sorted(jobs, key=_job_order):
        status = json.loads((job / "status.json").read_text()) if (job / "status.json").exists() else UNFINISHED
        results_file = job / "results.json"
        results = json.loads(results_file.read_text()) if results_file.exists() else {}
        rows.append(
            {
                "job": job.name,
                "overrides": " ".join(status["overrides"]),
                "status": status["status"],
                **{c: results.get(c) for c in COLUMNS if c.endswith("_acc")},
                "train_seconds": results.get("train_seconds"),
                "error": status["error"].splitlines()[0] if status["error"] else "",
            }
        )
    return rows


def _is_job(p: Path) -> bool:
    return any((p / name).exists() for name in ("status.json", ".hydra", "config.yaml", "metrics.jsonl"))


def _job_order(p: Path):
    return (0, int(p.name)) if p.name.isdigit() else (1, p.name)


def write_summary(sweep_dir: Path, rows: list[dict]) -> None:
    """summary.csv and summary.md, each replaced atomically (jobs may end concurrently)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    for name, text in (("summary.csv", buf.getvalue()), ("summary.md", markdown_table(rows) + "\n")):
        write_text_atomic(sweep_dir / name, text, "the sweep summary")
    runs = {r["overrides"] or r["job"]: sweep_dir / r["job"] / "metrics.jsonl" for r in rows}
    runs = {label: read_metrics(path.parent) for label, path in runs.items() if path.is_file()}
    try:
        png = curves_png(runs) if runs else None  # every job's curves, labelled by its overrides
    except ImportError:  # matplotlib is optional: the table is the summary
        png = None
    if png is not None:
        write_text_atomic(sweep_dir / "summary.png", png, "the sweep summary")


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


def slurm_fit_error(launcher: DictConfig) -> str | None:
    """hydra/launcher=slurm: a request no node of the partition can ever hold (more CPUs,
    memory or GPUs than the largest node has, or more nodes than the partition has) would wait
    in the queue forever, or be refused by sbatch in a traceback: say which key in one line
    before submitting (checked with `sinfo`). None when it fits, for any other launcher, or
    where `sinfo` does not answer (not on a SLURM login node: sbatch will say)."""
    import shutil
    import subprocess

    if "SlurmLauncher" not in str(launcher.get("_target_", "")) or shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N|%c|%m|%G|%P"], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    nodes = {}  # partition -> {node: (cpus, memory MB, gpus)}; the default partition is marked *
    default = None
    for line in out.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 5:
            continue
        name, cpus, mem, gres, part = parts
        if part.endswith("*"):
            part = default = part[:-1]
        gpus = sum(_gres_gpus(g) for g in gres.split(","))
        nodes.setdefault(part, {})[name] = (_int(cpus), _int(mem.rstrip("+")), gpus)
    if not nodes:
        return None
    partition = launcher.get("partition") or default
    if partition not in nodes:
        return (
            f"hydra.launcher.partition: {partition!r} is not a partition of this cluster; "
            f"accepted: {', '.join(sorted(nodes))} (sinfo)"
        )
    have = list(nodes[partition].values())
    tasks = int(launcher.get("tasks_per_node") or 1)
    asked = {
        "cpus_per_task": (int(launcher.get("cpus_per_task") or 1) * tasks, 0, "CPUs"),
        "mem_gb": (int(float(launcher.get("mem_gb") or 0) * 1024), 1, "MB of memory"),
        "gpus_per_node": (int(launcher.get("gpus_per_node") or 0), 2, "GPUs"),
    }
    largest = ", ".join(f"{max(n[i] for n in have)} {what}" for _, i, what in asked.values())
    for key, (need, i, what) in asked.items():
        if need > max(n[i] for n in have):
            value = launcher.get(key)
            per = f" (x {tasks} tasks per node)" if key == "cpus_per_task" and tasks > 1 else ""
            return (
                f"hydra.launcher.{key}: {value}{per} asks for {need} {what} per node, more than any node of "
                f"partition {partition} has (the largest: {largest}); set hydra.launcher.gpus_per_node, "
                f"cpus_per_task, mem_gb to fit"
            )
    fits = [n for n in have if all(need <= n[i] for need, i, _ in asked.values())]
    wanted = int(launcher.get("nodes") or 1)
    if len(fits) < wanted:
        return (
            f"hydra.launcher.nodes: {wanted} nodes asked, partition {partition} has {len(fits)} that can hold "
            f"the request (the largest: {largest}); set hydra.launcher.nodes, cpus_per_task, mem_gb, gpus_per_node to fit"
        )
    return None


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        return 0


def _gres_gpus(gres: str) -> int:
    """GPUs in one sinfo %G entry: gpu:4, gpu:a100:4(S:0-1); 0 for (null) or other resources."""
    fields = gres.split("(")[0].split(":")
    if fields[0] != "gpu":
        return 0
    return _int(fields[-1]) if len(fields) > 1 else 1
