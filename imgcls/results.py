"""The end of a training run: the test split read once (``final_test``) and results.json
(``write_results``), beside the evaluation code they use (imgcls/evaluate.py). ``run`` is
train.py's Run (cfg, run_dir, data, model, state, device, dist, extras). Light at import;
torch inside the functions. ``wall_seconds`` counts from this process's start (``process_start``).
"""

from __future__ import annotations

import json
import os
import time


def process_start() -> float:
    """When this process started (epoch seconds), as the kernel recorded it: /proc/self/stat's
    start time after boot plus /proc/stat's boot time; where there is no /proc, when this module
    was imported (train.py imports it at start-up). A job that a launcher (submitit) started in a
    fresh process counts from that process's start, not the sweep's."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration, AttributeError):
        return IMPORTED


IMPORTED = time.time()
PROCESS_START = min(process_start(), IMPORTED)  # /proc/stat's boot time is whole seconds


def final_test(run) -> dict:
    """The test split, read once, at the end: the final weights (SWA, else EMA, else raw: what
    `python -m imgcls.evaluate` takes from the checkpoint), and best.pt's when it is another
    epoch. Without a validation split the last evaluation already read the test split."""
    import copy

    from imgcls.averaging import averaged_weights
    from imgcls.checkpoint import best_path, load_checkpoint
    from imgcls.distributed import unwrap_model
    from imgcls.evaluate import evaluate_split

    state, data, precision = run.state, run.data, run.extras.precision
    plain = unwrap_model(run.model)
    weights, which = averaged_weights(
        {"model": plain.state_dict(), "averaging": run.extras.averaging.state_dict(), "state": {"finished": True}}
    )
    if data.val is None:
        pfx = "" if which == "raw" else f"{which}_"
        return {
            "final_test_acc": state.last_eval[f"{pfx}test_acc"],
            "final_test_loss": state.last_eval[f"{pfx}test_loss"],
            "best_test_acc": state.best_acc,
            "weights": which,
        }
    net = copy.deepcopy(plain)
    net.load_state_dict(weights)
    final = evaluate_split(net, data.test, run.cfg.trainer, run.device, precision)
    out = {"final_test_acc": final["test_acc"], "final_test_loss": final["test_loss"], "weights": which}
    best = best_path(run.run_dir)
    if state.best_epoch == state.epoch or not best.exists():
        out["best_ckpt_test_acc"] = final["test_acc"]
    else:
        net.load_state_dict(averaged_weights(load_checkpoint(best))[0])
        out["best_ckpt_test_acc"] = evaluate_split(net, data.test, run.cfg.trainer, run.device, precision)["test_acc"]
    return out


def _pfx(record: dict) -> str:
    """The key prefix of the weights a final evaluation reports: swa_, ema_ or none (raw)."""
    return next((p for p in ("swa_", "ema_") if any(k.startswith(p) for k in record)), "")


def write_results(run) -> None:
    import torch

    from imgcls.io import write_text_atomic

    if not run.dist.is_main:
        return
    state, run_dir = run.state, run.run_dir
    last = state.last_eval or {}
    val = {}
    if run.data.val is not None:  # "best" and "final" of the weights below (EMA/SWA when on)
        val = {
            "best_val_acc": state.best_acc,
            "best_epoch": state.best_epoch,
            "final_val_acc": last.get(f"{_pfx(last)}val_acc"),
            "final_val_loss": last.get(f"{_pfx(last)}val_loss"),
        }
    results = {
        **val,
        **final_test(run),
        "stopped_early": state.stopped_early,  # the epoch early stopping ended the run after; null: ran all
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_seconds": round(state.train_seconds, 3),  # the training loop only, evaluation excluded
        "images_per_second": round(state.images / state.train_seconds, 1) if state.train_seconds else None,
        "wall_seconds": round(time.time() - PROCESS_START, 3),
        "device": torch.cuda.get_device_name() if run.device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    write_text_atomic(
        run_dir / "results.json",
        json.dumps(results, indent=2) + "\n",
        "the results",
        "the last checkpoint is intact (the same command writes them again)",
    )
    acc = results["final_test_acc"]
    print(
        f"done: test accuracy {acc if acc is None else f'{acc:.4f}'} ({results['weights']} weights), "
        f"results in {run_dir / 'results.json'}",
        flush=True,
    )
