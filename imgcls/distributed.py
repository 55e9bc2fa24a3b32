"""Data parallel through torchrun (`torchrun --nproc_per_node=N train.py ...`) or SLURM's srun
(`srun --ntasks-per-node=N train.py ...`, and hydra/launcher=slurm with tasks_per_node=N).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; srun sets SLURM_PROCID, SLURM_STEP_NUM_TASKS
and SLURM_LOCALID, which ``slurm_ranks`` turns into torchrun's variables (the rendezvous on the
step's first node, a port from the job id). With WORLD_SIZE > 1 train.py joins a process
group (NCCL on CUDA, gloo on the CPU), wraps the model in DistributedDataParallel, keeps the
whole training set on each rank's device (rank r trains on images r::N of each global batch),
and lets only rank 0 write logs, results and checkpoints. Without torchrun everything here is a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def slurm_ranks(env=None) -> dict[str, str]:
    """Under srun (a job step of several tasks) and not torchrun: torchrun's variables from
    SLURM's, {} otherwise. RANK = SLURM_PROCID, WORLD_SIZE = SLURM_STEP_NUM_TASKS (set by srun
    only: a batch script's own process, where SLURM_NTASKS is the job's, stays alone),
    LOCAL_RANK = SLURM_LOCALID, MASTER_ADDR = the step's first node, MASTER_PORT = 15000 +
    the job id mod 20000 (two jobs on one node do not share it); MASTER_ADDR/MASTER_PORT
    already set win."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or int(env.get("SLURM_STEP_NUM_TASKS", "1") or 1) <= 1 or "SLURM_PROCID" not in env:
        return {}
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
    return {
        "RANK": env["SLURM_PROCID"],
        "WORLD_SIZE": env["SLURM_STEP_NUM_TASKS"],
        "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
        "MASTER_ADDR": env.get("MASTER_ADDR") or first_host(nodelist),
        "MASTER_PORT": env.get("MASTER_PORT") or str(15000 + int(env.get("SLURM_JOB_ID", "0") or 0) % 20000),
    }


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,07],cpu1" -> "gpu03" (what `scontrol show
    hostnames` prints first), without asking scontrol."""
    depth, head = 0, ""
    for ch in nodelist:  # the first entry: up to a comma outside brackets
        if ch == "," and depth == 0:
            break
        depth += (ch == "[") - (ch == "]")
        head += ch
    if "[" not in head:
        return head
    prefix, rest = head.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",", 1)[0].split("-", 1)[0] + suffix


def init(use_cuda: bool) -> Dist:
    """Join the process group torchrun (or srun: slurm_ranks) describes in the environment (if any)."""
    os.environ.update(slurm_ranks())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    import torch
    import torch.distributed as td

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not td.is_initialized():
        td.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=td.get_rank(), world=td.get_world_size(), local_rank=local_rank)


def broadcast(obj, dist: Dist):
    """Rank 0's ``obj`` on every rank (a small picklable value: a path, a metrics dict)."""
    if not dist.enabled:
        return obj
    import torch.distributed as td

    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, dist: Dist, device) -> bool:
    """True on every rank if ``flag`` is true on any (a signal seen by one rank stops all)."""
    if not dist.enabled:
        return flag
    import torch
    import torch.distributed as td

    t = torch.tensor([1.0 if flag else 0.0], device=device)
    td.all_reduce(t, op=td.ReduceOp.MAX)
    return bool(t.item())


def mean_over_ranks(value, dist: Dist):
    """The mean of a tensor over ranks (in place on a copy); the value itself when alone."""
    if not dist.enabled:
        return value
    import torch.distributed as td

    value = value.clone()
    td.all_reduce(value)
    return value / dist.world


def barrier(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        td.barrier()


def shutdown(dist: Dist) -> None:
    if dist.enabled:
        import torch.distributed as td

        if td.is_initialized():
            td.destroy_process_group()


def join_ranks(device, run_dir: Path) -> tuple[Dist, object, Path]:
    """Under torchrun: join the process group, take this rank's device, and use rank 0's run
    directory (each rank's Hydra may have stamped a different time into its own).
    (dist, device, run_dir); alone: (Dist(), device, run_dir)."""
    dist = init(use_cuda=device.type == "cuda")
    if dist.enabled and device.type == "cuda":
        import torch

        device = torch.device("cuda", dist.local_rank)
    return dist, device, Path(broadcast(str(run_dir), dist))


def wrap(model, dist: Dist, device):
    """The model in DistributedDataParallel under torchrun (gradients averaged over ranks during
    backward); the model itself when alone."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap_model(model):
    """The plain module behind torch.compile (`_orig_mod`) and (Distributed)DataParallel
    (`.module`), unwrapped repeatedly, so saved state_dict keys have no `_orig_mod.` /
    `module.` prefixes and load into an unwrapped model of the same architecture."""
    from torch import nn

    while True:
        inner = getattr(model, "_orig_mod", None)  # torch._dynamo OptimizedModule
        if isinstance(inner, nn.Module):
            model = inner
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model
