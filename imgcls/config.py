"""Config helpers: the OmegaConf resolvers that turn schedule lengths into steps at run time.

Schedule lengths are written in epochs or as fractions of the run, never as step counts:

* ``${epochs:N}``          N epochs, in the schedule's units
* ``${run_fraction:F}``    the first fraction F of the run, in the schedule's units
* ``${run_remainder:F}``   what is left of the run after ``${run_fraction:F}``
* ``${mul:A,B}``           A x B (e.g. a minimum lr as a fraction of the peak)

The schedule's unit is one optimizer step when ``schedule.interval`` is ``step`` and one
epoch when it is ``epoch``. ``train.py`` fills ``schedule.steps_per_epoch`` from the real
data before it builds the scheduler, so ``trainer.epochs=30`` stretches every schedule.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

INTERVALS = ("step", "epoch")


def schedule_units_per_epoch(root: DictConfig) -> int:
    interval = root.schedule.interval
    if interval not in INTERVALS:
        raise ValueError(f"schedule.interval: {interval!r} is not one of {list(INTERVALS)}")
    return int(root.schedule.steps_per_epoch) if interval == "step" else 1


def schedule_total_units(root: DictConfig) -> int:
    return int(root.trainer.epochs) * schedule_units_per_epoch(root)


def _epochs(n, *, _root_: DictConfig) -> int:
    return round(float(n) * schedule_units_per_epoch(_root_))


def _run_fraction(f, *, _root_: DictConfig) -> int:
    f = float(f)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"${{run_fraction:{f}}}: the fraction must be in [0, 1]")
    return round(f * schedule_total_units(_root_))


def _run_remainder(f, *, _root_: DictConfig) -> int:
    return schedule_total_units(_root_) - _run_fraction(f, _root_=_root_)


def _mul(a, b) -> float:
    return float(a) * float(b)


def register_resolvers() -> None:
    """Register the resolvers above (idempotent)."""
    for name, fn in {
        "epochs": _epochs,
        "run_fraction": _run_fraction,
        "run_remainder": _run_remainder,
        "mul": _mul,
    }.items():
        OmegaConf.register_new_resolver(name, fn, replace=True)


# --------------------------------------------------------------------------------------
# Start-up validation: every bad value fails here, before any data is read or step taken.
# --------------------------------------------------------------------------------------
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
SWITCHES = ("trainer.channels_last", "trainer.fused")  # auto | true | false


def device_switch(value, device) -> bool:
    """A CUDA-by-default switch (trainer.channels_last, trainer.fused): ``auto`` is on for a
    CUDA device only (the GPU recipe); ``true``/``false`` force it on any device, so the
    CUDA code paths can be run, and tested, on a CPU."""
    return device.type == "cuda" if value == "auto" else bool(value)


def fused_argument(value, device, optimizer_class) -> dict:
    """The ``fused`` keyword for the optimizer, from trainer.fused: ``{"fused": True}`` (one
    kernel for the whole update instead of one per tensor) when on and the class takes it,
    ``{"fused": False}`` when forced off, else nothing; forced on for a class without it is refused."""
    import inspect

    takes_fused = "fused" in inspect.signature(optimizer_class).parameters
    if device_switch(value, device):
        if takes_fused:
            return {"fused": True}
        if value is True:
            name = f"{optimizer_class.__module__}.{optimizer_class.__qualname__}"
            raise ValueError(f"trainer.fused: true is not accepted for {name}, which takes no fused argument; "
                             f"expected auto or false")
        return {}  # auto on CUDA: the optimizer's own default
    return {"fused": False} if takes_fused and value is False else {}


def _switch(cfg: DictConfig, key: str) -> None:
    value = OmegaConf.select(cfg, key)
    if value != "auto" and not isinstance(value, bool):  # 1/0 are not bools: refused too
        raise ValueError(f"{key}: {value!r} is not accepted; expected auto, true or false")


def _int_at_least(cfg: DictConfig, key: str, low: int, optional: bool = False) -> None:
    value = OmegaConf.select(cfg, key)
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        accepted = f"an int >= {low}" + (" or null" if optional else "")
        raise ValueError(f"{key}: {value!r} is not accepted; expected {accepted}")


def _one_of(cfg: DictConfig, key: str, accepted) -> None:
    value = OmegaConf.select(cfg, key)
    if value not in accepted:
        raise ValueError(f"{key}: {value!r} is not accepted; expected one of {list(accepted)}")


def _targets(node) -> list[str]:
    """Every ``_target_`` in a (plain, unresolved) config subtree."""
    if isinstance(node, dict):
        found = [node["_target_"]] if "_target_" in node else []
        return found + [t for k, v in node.items() if k != "_target_" for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def validate_config(cfg: DictConfig, run_dir):
    """Check the composed config; return the torch device to train on."""
    import torch

    from imgcls.data import DATASET_NAMES

    for key in ("trainer.epochs", "trainer.batch_size", "trainer.eval_batch_size", "trainer.eval_every",
                "trainer.log_every", "trainer.checkpoint_every", "trainer.keep_checkpoints"):
        _int_at_least(cfg, key, 1)
    _int_at_least(cfg, "trainer.seed", 0)
    _int_at_least(cfg, "trainer.limit_train_batches", 1, optional=True)
    _int_at_least(cfg, "trainer.limit_eval_batches", 1, optional=True)
    _int_at_least(cfg, "data.crop_padding", 0)
    _one_of(cfg, "trainer.device", DEVICES)
    _one_of(cfg, "trainer.precision", PRECISIONS)
    for key in SWITCHES:
        _switch(cfg, key)
    _one_of(cfg, "schedule.interval", INTERVALS)
    _one_of(cfg, "data.name", DATASET_NAMES)
    lr = OmegaConf.select(cfg, "optimizer.lr")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0 or lr != lr or lr == float("inf"):
        raise ValueError(f"optimizer.lr: {lr!r} is not accepted; expected a finite number > 0")
    smoothing = cfg.trainer.label_smoothing
    if not isinstance(smoothing, (int, float)) or not 0.0 <= smoothing < 1.0:
        raise ValueError(f"trainer.label_smoothing: {smoothing!r} is not accepted; expected a number in [0, 1)")
    if any(t.endswith("ReduceLROnPlateau") for t in _targets(OmegaConf.to_container(cfg.scheduler))):
        if cfg.schedule.interval != "epoch" or cfg.trainer.eval_every != 1:
            raise ValueError(
                "scheduler: a ReduceLROnPlateau phase needs the test loss every epoch: set "
                f"schedule.interval=epoch (is {cfg.schedule.interval!r}) and trainer.eval_every=1 "
                f"(is {cfg.trainer.eval_every!r})"
            )
    resume = cfg.resume
    if resume not in ("auto", "never"):
        from pathlib import Path

        if not isinstance(resume, str) or not Path(resume).expanduser().is_file():
            raise ValueError(f"resume: {resume!r} is not accepted; expected auto, never or the path of a checkpoint file")
    _check_writable(run_dir)

    want = cfg.trainer.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ValueError("trainer.device: 'cuda' but no CUDA device is available; use trainer.device=cpu or auto")
    if want == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", _job_gpu())


def _job_gpu() -> int:
    """The GPU of this job: in a multirun on a machine with several GPUs, job N takes GPU
    N mod count (parallel joblib jobs then use one GPU each); otherwise the current one."""
    import torch
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    count = torch.cuda.device_count()
    if count > 1 and HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        index = int(HydraConfig.get().job.num) % count
        torch.cuda.set_device(index)
        return index
    return torch.cuda.current_device()


def _check_writable(run_dir) -> None:
    from pathlib import Path

    ckpt_dir = Path(run_dir) / "checkpoints"
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise ValueError(f"hydra.run.dir: cannot write checkpoints into {ckpt_dir}: {e.strerror or e}") from e


class config_errors:
    """Re-raise a constructor's error as a ValueError that names the config group:
    ``with config_errors("optimizer"): ...`` turns torch's "Invalid momentum value: -1" into
    "optimizer: Invalid momentum value: -1" (Hydra wraps it in InstantiationException)."""

    def __init__(self, group: str):
        self.group = group

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from hydra.errors import InstantiationException

        if kind is not None and issubclass(kind, (ValueError, TypeError, InstantiationException)):
            cause = exc.__cause__ or exc
            raise ValueError(f"{self.group}: {cause}") from exc
        return False


# --------------------------------------------------------------------------------------
# Resume: which config changes a checkpoint tolerates.
# --------------------------------------------------------------------------------------
STRUCTURAL = ("model", "optimizer", "scheduler", "schedule.interval", "data")
SAFE_DATA_KEYS = ("data.root", "data.download")


def _flatten(d, prefix: str = "") -> dict:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out or {prefix[:-1]: {}}
    if isinstance(d, list):
        out = {}
        for i, v in enumerate(d):
            out.update(_flatten(v, f"{prefix}{i}."))
        return out or {prefix[:-1]: []}
    return {prefix[:-1]: d}


def config_changes(saved: dict, current: dict) -> tuple[list[str], list[str]]:
    """(structural, safe) keys whose value differs between two unresolved configs."""
    a, b = _flatten(saved), _flatten(current)
    changed = sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))
    changed = [k for k in changed if not k.startswith(("hydra.", "resume", "schedule.steps_per_epoch"))]
    structural = [k for k in changed if k.startswith(STRUCTURAL) and not k.startswith(SAFE_DATA_KEYS)]
    return structural, [k for k in changed if k not in structural]


def check_resume_config(ckpt: dict, cfg: DictConfig, path) -> None:
    """Refuse to resume across a structural config change unless resume_force=true."""
    saved = ckpt.get("config_unresolved")
    if saved is None:
        raise ValueError(f"resume: {path} has no config_unresolved entry; it was not written by train.py")
    structural, safe = config_changes(saved, OmegaConf.to_container(cfg, resolve=False))
    if structural and not cfg.resume_force:
        raise ValueError(
            f"resume: {path} was written with a different model/optimizer/scheduler/data config; "
            f"differing keys: {', '.join(structural)}. Start a new run directory, or pass "
            f"resume_force=true to load it anyway."
        )
    if structural or safe:
        print(f"resume: config changed since {path}: {', '.join(structural + safe)}", flush=True)
    if any(k.startswith("trainer.epochs") for k in safe):
        print("resume: the schedule continues as saved (its lengths are in the checkpoint); "
              "its last phase runs on for the extra epochs", flush=True)
