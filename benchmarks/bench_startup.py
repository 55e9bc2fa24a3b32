"""Benchmark: start-up, the seconds before a command does its work, beside a trivial Hydra app.

    make bench        (or: .venv/bin/python benchmarks/bench_startup.py [--rounds 5] [--no-smoke])

Each round runs, one after the other in fresh processes (so the page cache and the machine's
load are shared by all):

* a trivial Hydra app's ``--help`` (one config file, no groups, no project imports): the floor
  that Python + Hydra alone cost on this machine;
* ``python train.py --help`` and ``python train.py --cfg job``;
* ``python -m imgcls.evaluate --help`` and ``python -m imgcls.predict --help``;
* ``python train.py experiment=smoke`` (two tiny epochs on synthetic data, in a temporary folder).

Printed: mean ± std over the rounds, and each figure as a ratio to the trivial app's ``--help``
(a ratio is comparable between machines; seconds are not). Nothing is asserted: the goals
(``--help`` and ``--cfg job`` under 1 s, the smoke run under 5 s, on a 2-core CPU) are read off
this table, never timed in a test.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

TRIVIAL_APP = """
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> None:
    print(cfg.x)


if __name__ == "__main__":
    main()
"""


def commands(tmp: Path, smoke: bool) -> dict[str, list[str]]:
    py = sys.executable
    train = str(ROOT / "train.py")
    cmds = {
        "trivial Hydra app --help": [py, str(tmp / "app.py"), "--help"],
        "train.py --help": [py, train, "--help"],
        "train.py --cfg job": [py, train, "--cfg", "job"],
        "imgcls.evaluate --help": [py, "-m", "imgcls.evaluate", "--help"],
        "imgcls.predict --help": [py, "-m", "imgcls.predict", "--help"],
    }
    if smoke:
        cmds["train.py experiment=smoke"] = [py, train, "experiment=smoke", f"hydra.run.dir={tmp / 'smoke'}"]
    return cmds


def timed(cmd: list[str], cwd: Path) -> float:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HYDRA_FULL_ERROR="0")
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="runs of each command (default 5)")
    ap.add_argument("--no-smoke", action="store_true", help="skip the experiment=smoke run")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-startup-") as d:
        tmp = Path(d)
        (tmp / "conf").mkdir()
        (tmp / "conf" / "config.yaml").write_text("x: 1\n")
        (tmp / "app.py").write_text(TRIVIAL_APP)
        cmds = commands(tmp, smoke=not args.no_smoke)
        times: dict[str, list[float]] = {name: [] for name in cmds}
        for _ in range(max(1, args.rounds)):
            for name, cmd in cmds.items():  # interleaved: every command sees the same load
                times[name].append(timed(cmd, cwd=tmp))

    floor = statistics.mean(times["trivial Hydra app --help"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"start-up, {args.rounds} rounds, {os.cpu_count()} CPUs, load average {load:.2f} at the end")
    print(f"{'command':<30} {'seconds (mean ± std)':>22} {'x trivial --help':>17}")
    for name, ts in times.items():
        mean = statistics.mean(ts)
        std = statistics.stdev(ts) if len(ts) > 1 else 0.0
        print(f"{name:<30} {mean:>13.2f} ± {std:<6.2f} {mean / floor:>17.2f}")


if __name__ == "__main__":
    main()
