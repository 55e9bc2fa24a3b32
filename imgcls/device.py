"""The device: which one a run uses (``trainer.device``; evaluate's and predict's ``device=``)
and the CUDA-by-default switches (``trainer.channels_last``, ``trainer.fused``)."""

from __future__ import annotations

from imgcls.schema import DEVICES

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
            raise ValueError(
                f"trainer.fused: true is not accepted for {name}, which takes no fused argument; expected auto or false"
            )
        return {}  # auto on CUDA: the optimizer's own default
    return {"fused": False} if takes_fused and value is False else {}


def pick_device(value, key: str = "trainer.device"):
    """The torch device of ``value`` (auto/None: this job's GPU if there is one, else the CPU),
    the one device choice of train.py, evaluate and predict (``key``: how the user named it)."""
    import torch

    if value not in (None, *DEVICES):
        raise ValueError(f"{key}: {value!r} is not accepted; expected auto, cpu or cuda")
    if value == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{key}: 'cuda' but no CUDA device is available; use {key}=cpu or auto")
    if value == "cpu" or not torch.cuda.is_available():
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
