"""Benchmark: SequentialLR.step() cost, ours against torch's, on the same three phases.

    make bench        (or: .venv/bin/python benchmarks/bench_sched.py [--steps 10000] [--rounds 7])

Both classes get the same composition (LinearLR warmup -> ExponentialLR -> CosineAnnealingLR
with milestones at 10% and 50% of the steps) on their own SGD optimizer, built from objects.
Rounds alternate between the two; each round times ``steps`` calls of ``step()``. The best
round of each is compared (the least disturbed by the rest of the machine), and the ratio
ours/torch is printed: <= 1.0 means ours is no slower.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, ExponentialLR, LinearLR
from torch.optim.lr_scheduler import SequentialLR as TorchSequentialLR

from sched import SequentialLR


def build(cls, steps: int):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(4))], lr=0.1, momentum=0.9)
    kids = [
        LinearLR(opt, start_factor=0.1, total_iters=steps // 10),
        ExponentialLR(opt, gamma=0.9999),
        CosineAnnealingLR(opt, T_max=steps),
    ]
    sched = cls(opt, kids, [steps // 10, steps // 2])
    opt.step()  # the documented order: optimizer.step() before the first scheduler.step()
    return sched


def time_steps(cls, steps: int) -> float:
    sched = build(cls, steps)
    step = sched.step
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    ours, theirs = [], []
    for _ in range(args.rounds):
        theirs.append(time_steps(TorchSequentialLR, args.steps))
        ours.append(time_steps(SequentialLR, args.steps))
    o, t = min(ours), min(theirs)
    print(f"torch {torch.__version__}, {args.steps} steps, best of {args.rounds} rounds")
    print(f"  torch SequentialLR.step: {t / args.steps * 1e6:7.2f} us/step")
    print(f"  ours  SequentialLR.step: {o / args.steps * 1e6:7.2f} us/step")
    print(f"  ratio ours/torch: {o / t:.3f}")


if __name__ == "__main__":
    main()
