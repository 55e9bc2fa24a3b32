"""Pictures of runs: train loss, evaluation loss and accuracy, and the lr against the optimizer
step, read from each run's metrics.jsonl.

    python -m imgcls.plot RUN_DIR [RUN_DIR ...] [--out curves.png]

``trainer.plot_curves=true`` makes train.py rewrite ``curves.png`` in the run directory after each
evaluation (atomically: a reader never sees half a PNG). matplotlib is imported only here.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from imgcls.exits import EXIT_BAD_INPUT
from imgcls.io import write_text_atomic

EXIT_NO_MATPLOTLIB = 1


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of ``run_dir``'s metrics.jsonl (a torn last line is skipped)."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def curves_png(runs: dict[str, list[dict]]) -> bytes:
    """The PNG of ``runs`` (label -> records): loss, accuracy and lr panels against the step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 3.4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    loss_ax, acc_ax, lr_ax = fig.subplots(1, 3)
    for i, (label, records) in enumerate(runs.items()):
        color = f"C{i % 10}"
        train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
        split = "val" if any("val_acc" in r for r in records) else "test"
        evals = [r for r in records if f"{split}_acc" in r]
        if train:
            loss_ax.plot(*zip(*train), color=color, lw=1.0, alpha=0.6, label=f"{label} train")
        if evals:
            steps = [r["step"] for r in evals]
            loss_ax.plot(steps, [r[f"{split}_loss"] for r in evals], "o-", color=color, ms=3, label=f"{label} {split}")
            acc_ax.plot(steps, [r[f"{split}_acc"] for r in evals], "o-", color=color, ms=3, label=f"{label} {split}")
        lrs = [(r["step"], r["lr"][0]) for r in records if r.get("lr")]
        if lrs:
            lr_ax.plot(*zip(*lrs), color=color, lw=1.2, drawstyle="steps-post", label=label)
    for ax, name in ((loss_ax, "loss"), (acc_ax, "accuracy"), (lr_ax, "learning rate")):
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.25)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_curves(run_dir: Path) -> None:
    """``run_dir``/curves.png from its metrics.jsonl, atomically (train.py, after each evaluation)."""
    run_dir = Path(run_dir)
    png = curves_png({run_dir.name: read_metrics(run_dir)})
    write_text_atomic(run_dir / "curves.png", png, "the curves")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m imgcls.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each with metrics.jsonl)")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write (curves.png)")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.jsonl").is_file()]
    if missing:
        print(f"error: runs: {missing[0]} has no metrics.jsonl; expected a run directory", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        png = curves_png({str(r): read_metrics(r) for r in args.runs})
    except ImportError:
        print("error: --out: matplotlib is not installed (pip install -e '.[plots]')", file=sys.stderr)
        return EXIT_NO_MATPLOTLIB
    write_text_atomic(args.out, png, "the curves")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
