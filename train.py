"""Train an image classifier (CIFAR-10 by default) from the Hydra config in conf/.

    python train.py                                   # ResNet-9 on CIFAR-10
    python train.py experiment=smoke                  # seconds on a CPU, no data, no network
    python train.py scheduler=warmup_exp trainer.epochs=30
    python train.py -m scheduler=warmup_exp,warmup_cosine optimizer.lr=0.1,0.05
    python train.py hydra.run.dir=outputs/run1        # run again to resume where it stopped

The recipe reads top to bottom: config, seed, data, model, optimizer, scheduler, resume,
loop, save. torch is imported inside the recipe's functions, so --help and --cfg answer at once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from imgcls import distributed
from imgcls.config import (
    check_filled_in,
    check_writable,
    config_errors,
    device_switch,
    fused_argument,
    pick_device,
    preflight,
    setup,
    validate_config,
)

if TYPE_CHECKING:
    from imgcls.checkpoint import State

setup()  # the resolvers and the config schema, before Hydra composes conf/

EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as a shell reports it
EXIT_BAD_INPUT = 2  # a config value, a data file or a checkpoint was refused at start-up
EXIT_NONFINITE = 3  # the training loss became NaN or inf (the last good checkpoint is kept)
EXIT_WRITE_FAULT = 4  # a file could not be written: disk full, read-only (what was saved is intact)
EXIT_JOB_FAILED = 1  # a multirun ran every job and some failed (the sweep summary marks them)


def cli() -> None:
    """The command line: a config that cannot be composed is refused here in one line (exit 2)
    before Hydra starts; then Hydra runs main (once, or once per job of a multirun). Ctrl-C
    before training (or after it) ends it in one line, exit 130 (during training: a checkpoint
    first, see StopRequest)."""
    try:
        preflight(sys.argv[1:])
        main()
    except KeyboardInterrupt:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        interrupted()
    from imgcls import sweep

    if sweep.FAILED_JOBS:  # a multirun whose jobs all ran, some refused (each said why in one line)
        sys.exit(EXIT_JOB_FAILED)


@hydra.main(config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the best validation accuracy (the test accuracy without a validation split): the
    objective of hparams_search sweeps."""
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    with exit_cleanly(run_dir) as outcome:
        return recipe(cfg, run_dir)
    return outcome.failed  # a refused job of a multirun (imgcls.sweep.JobFailed): the next one runs


def recipe(cfg: DictConfig, run_dir: Path) -> float | None:
    from imgcls.checkpoint import resume

    composed = OmegaConf.to_yaml(cfg)  # as Hydra composed it: .hydra/config.yaml, once accepted
    check_filled_in(cfg)  # 1. config (fails before any work): schedule.steps_per_epoch is ours
    validate_config(cfg)
    check_writable(run_dir)  #    the run directory
    device = pick_device(cfg)  #    the device
    dist, device, run_dir = join_ranks(device, run_dir)  #    torchrun: one process per device
    lock_run_dir(run_dir, dist)  #    one process per run directory
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, device)  # 2. seed
    data = load_data(cfg, device, dist)  # 3. data (fills schedule.steps_per_epoch)
    model = build_model(cfg, data.num_classes, device, data.info["size"])  # 4. model
    optimizer = build_optimizer(cfg, model, device)  # 5. optimizer
    scheduler = build_scheduler(cfg, optimizer)  # 6. scheduler
    extras = build_extras(cfg, model, device, data)  #    grad scaler, averaged weights, data info
    state = resume(cfg, run_dir, model, optimizer, scheduler, dist, extras)  # 7. resume
    write_config(cfg, run_dir, dist, composed)  #    accepted: config.yaml and .hydra/ (not before)
    if state.epoch >= cfg.trainer.epochs:
        print(f"run in {run_dir} already finished at step {state.step}: nothing to do")
        if not (run_dir / "results.json").exists():  # its writing failed (a full disk): once more
            write_results(cfg, run_dir, data, model, state, device, dist, extras)
        return state.best_acc
    stop = train(cfg, run_dir, data, model, optimizer, scheduler, state, device, dist, extras)  # 8. loop
    if stop:
        sys.exit(EXIT_SIGNAL[stop])
    write_results(cfg, run_dir, data, model, state, device, dist, extras)  # 9. save (and the test split)
    log_results(cfg, run_dir, state, dist)  #    logger=mlflow: results.json, checkpoint
    distributed.shutdown(dist)
    return state.best_acc


def join_ranks(device, run_dir: Path):
    """Under torchrun: join the process group, take this rank's device, and use rank 0's run
    directory (each rank's Hydra may have stamped a different time into its own)."""
    import torch

    dist = distributed.init(use_cuda=device.type == "cuda")
    if dist.enabled and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
    return dist, device, Path(distributed.broadcast(str(run_dir), dist))


def lock_run_dir(run_dir: Path, dist) -> None:
    """An OS-level lock on the run directory for this process's life (imgcls/runlock.py): a
    second process on it (a requeued job while the old one runs) exits 2 naming the holder."""
    from imgcls.runlock import RunLock

    global _RUN_LOCK
    if dist.is_main:
        if _RUN_LOCK is not None:
            _RUN_LOCK.release()  # the previous job of a multirun, in this process
        _RUN_LOCK = RunLock(run_dir).acquire(note_pid=False)  # the PID once the config is accepted


_RUN_LOCK = None


def interrupted() -> None:
    """Ctrl-C outside the training loop: one line, exit 130 (what was saved is intact)."""
    print("interrupted: Ctrl-C; stopped (what was saved is intact)", file=sys.stderr, flush=True)
    sys.exit(EXIT_SIGNAL["SIGINT"])


class exit_cleanly:
    """Known faults end the process with one line on stderr and a documented exit code
    (HYDRA_FULL_ERROR=1 shows the traceback instead). A run that fails at start-up leaves no
    empty run directory behind (imgcls.runlock.remove_if_unused: start-up files only). In a
    multirun the job ends instead, after the same one line: ``failed`` is then what main returns
    (an imgcls.sweep.JobFailed, which the sweep summary marks failed), and the next job runs."""

    def __init__(self, run_dir: Path | None = None):
        self.run_dir = run_dir
        self.failed = None

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            return False
        if issubclass(kind, KeyboardInterrupt):  # Ctrl-C at start-up (or after training)
            if self.run_dir is not None and _RUN_LOCK is not None and _RUN_LOCK.path.parent == self.run_dir:
                from imgcls.runlock import remove_if_unused

                _RUN_LOCK.release()
                remove_if_unused(self.run_dir)  # only a directory with nothing but start-up files
            interrupted()
        from omegaconf.errors import OmegaConfBaseException

        from imgcls.checkpoint import CheckpointError
        from imgcls.io import WriteFault, is_write_fault

        if issubclass(kind, FloatingPointError):
            code = EXIT_NONFINITE
        elif issubclass(kind, WriteFault) or is_write_fault(exc):  # any file: disk full, read-only
            code = EXIT_WRITE_FAULT
        elif issubclass(kind, (ValueError, FileNotFoundError, CheckpointError, OmegaConfBaseException)):
            code = EXIT_BAD_INPUT
        else:
            return False
        print(f"error: {exc}", file=sys.stderr, flush=True)
        from imgcls.runlock import RunDirBusy, remove_if_unused

        if code == EXIT_BAD_INPUT and self.run_dir is not None and not issubclass(kind, RunDirBusy):
            remove_if_unused(self.run_dir)  # never the run directory of the process holding the lock
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
            from imgcls.sweep import JobFailed

            self.failed = JobFailed(code, str(exc))  # no Hydra traceback; the next job runs
            return True
        sys.exit(code)


# --------------------------------------------------------------------------------------
# 2. seed
# --------------------------------------------------------------------------------------
def seed_everything(seed: int, deterministic: bool, device) -> None:
    import random

    import torch

    random.seed(seed)
    torch.manual_seed(seed)  # also seeds every CUDA device
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not deterministic  # autotune conv kernels per shape
        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
            torch.backends.cudnn.deterministic = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


# --------------------------------------------------------------------------------------
# 3. data
# --------------------------------------------------------------------------------------
class Data:
    """The train, validation (None when data.val_size is 0) and test loaders on the training
    device, what the schedule needs, and what a checkpoint keeps to use the model (info)."""

    def __init__(self, train, val, test, num_classes: int, steps_per_epoch: int, description: str, info: dict):
        self.train, self.val, self.test = train, val, test
        self.num_classes, self.steps_per_epoch = num_classes, steps_per_epoch
        self.description = description
        self.info = info

    @property
    def eval_split(self) -> str:
        """The split evaluated during training: val, or test when there is no validation split."""
        return "val" if self.val is not None else "test"


def load_data(cfg: DictConfig, device, dist) -> Data:
    import torch

    from imgcls.data import DeviceLoader, describe, load_configured
    from imgcls.splits import balanced_order, val_indices

    d, t = cfg.data, cfg.trainer
    ds = load_configured(d)
    keep, held = val_indices(ds.train_labels, d.get("val_size", 0))  # stratified, from a fixed seed
    train_images, train_labels = ds.train_images[keep], ds.train_labels[keep]
    if t.batch_size > len(train_labels):
        raise ValueError(
            f"trainer.batch_size: {t.batch_size} is larger than the {len(train_labels)} training "
            f"images; use at most {len(train_labels)}"
        )
    if t.batch_size % dist.world:
        raise ValueError(f"trainer.batch_size: {t.batch_size} is not divisible by the {dist.world} ranks")
    channels_last = device_switch(t.channels_last, device)  # NHWC feeds the tensor cores without transposes
    common = dict(device=device, mean=ds.mean, std=ds.std, channels_last=channels_last, dtype=torch.float32)
    train = DeviceLoader(  # trainer.batch_size is the global batch: rank r takes its images r::N
        train_images,
        train_labels,
        t.batch_size,
        train=True,
        seed=t.seed,
        rank=dist.rank,
        world=dist.world,
        crop_padding=d.crop_padding,
        flip=d.flip,
        alternating_flip=d.alternating_flip,
        **common,
    )

    def eval_loader(images, labels):
        if t.limit_eval_batches:  # a fixed, class-balanced subset (an image folder is sorted by class)
            pick = balanced_order(labels)[: t.limit_eval_batches * t.eval_batch_size]
            images, labels = images[pick], labels[pick]
        return DeviceLoader(images, labels, t.eval_batch_size, train=False, drop_last=False, **common)

    val = eval_loader(ds.train_images[held], ds.train_labels[held]) if len(held) else None
    test = eval_loader(ds.test_images, ds.test_labels)
    steps = min(len(train), t.limit_train_batches or len(train))
    with open_dict(cfg):
        cfg.schedule.steps_per_epoch = steps
        cfg.data.num_classes = len(ds.classes)  # the model's output size (evaluate reads it)
    description = describe(ds, val=len(held))
    if dist.is_main:
        ranks = f" x {dist.world} ranks" if dist.enabled else ""
        print(description, f"| {steps} steps per epoch on {device}{ranks}", flush=True)
    info = {
        "classes": list(ds.classes),
        "mean": list(ds.mean),
        "std": list(ds.std),
        "size": list(ds.train_images.shape[1:]),
    }
    return Data(train, val, test, len(ds.classes), steps, description, info)


# --------------------------------------------------------------------------------------
# 4. model, 5. optimizer, 6. scheduler
# --------------------------------------------------------------------------------------
def build_model(cfg: DictConfig, num_classes: int, device, image_size=None):
    """The model on the device; with the data's `image_size` (C, H, W), one forward of a single
    image checks that it runs at that size (a timm ViT left at 224 on 32x32 data: exit 2)."""
    import torch

    from imgcls.models import check_input_size

    with config_errors("model"):
        model = hydra.utils.instantiate(cfg.model)(num_classes=num_classes).to(device)
        if image_size is not None:
            check_input_size(model, image_size, OmegaConf.to_container(cfg.model))
    if device_switch(cfg.trainer.channels_last, device):  # auto: on CUDA
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: DictConfig, model, device):
    with config_errors("optimizer"):
        factory = hydra.utils.instantiate(cfg.optimizer, _convert_="all")
    extra = fused_argument(cfg.trainer.fused, device, factory.func)  # auto: fused=True on CUDA
    with config_errors("optimizer"):
        return factory(model.parameters(), **extra)


def build_scheduler(cfg: DictConfig, optimizer):
    """The schedule tree of cfg.scheduler, built on the optimizer (the one place it gets it),
    refused if it does not fit the run (a milestone past the end, a warmup that never ends)."""
    from imgcls.config import check_schedule_fits

    with config_errors("scheduler"):
        scheduler = hydra.utils.instantiate(cfg.scheduler, _convert_="all")(optimizer)
    check_schedule_fits(scheduler, cfg)
    return scheduler


class Extras:
    """What a checkpoint holds besides the model, optimizer, scheduler and counters: the fp16
    grad scaler (imgcls/precision.py), the EMA/SWA weights (imgcls/averaging.py), and the data
    info imgcls.evaluate / imgcls.predict need (classes, mean, std, image size)."""

    def __init__(self, precision: str, scaler, averaging, info: dict):
        self.precision, self.scaler, self.averaging, self.info = precision, scaler, averaging, info

    def state_dict(self) -> dict:
        return {"scaler": self.scaler.state_dict(), "averaging": self.averaging.state_dict(), "data_info": self.info}

    def load_state_dict(self, ckpt: dict, path) -> None:
        if self.scaler.is_enabled() and ckpt.get("scaler"):  # an fp32/bf16 checkpoint has no scale
            self.scaler.load_state_dict(ckpt["scaler"])
        self.averaging.load_state_dict(ckpt.get("averaging") or {}, path)


def build_extras(cfg: DictConfig, model, device, data: Data) -> Extras:
    from imgcls.averaging import Averaging
    from imgcls.precision import make_scaler, resolve_precision

    t = cfg.trainer
    precision = resolve_precision(t.precision, device)
    averaging = Averaging(model, t.epochs, t.ema_decay, t.swa_start)
    return Extras(precision, make_scaler(device, precision), averaging, data.info)


def write_config(cfg: DictConfig, run_dir: Path, dist, composed: str | None = None) -> None:
    """The run's config files, written once this process holds the run lock and its config was
    accepted (a refused start leaves an existing run directory as it was): ``config.yaml`` (the
    resolved config), and under Hydra ``.hydra/config.yaml`` (``composed``, as Hydra composed
    it), ``.hydra/hydra.yaml`` and ``.hydra/overrides.yaml``, which Hydra itself would write
    before the run starts (conf/config.yaml: ``hydra.output_subdir: null``). Then the lock
    file names this process."""
    from hydra.core.hydra_config import HydraConfig

    from imgcls.io import write_text_atomic

    if not dist.is_main:
        return
    write_text_atomic(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True), "the resolved config")
    if HydraConfig.initialized():
        hydra_cfg = HydraConfig.get()
        files = {
            "config.yaml": composed if composed is not None else OmegaConf.to_yaml(cfg),
            "hydra.yaml": OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})),
            "overrides.yaml": OmegaConf.to_yaml(hydra_cfg.overrides.task),
        }
        (run_dir / ".hydra").mkdir(exist_ok=True)
        for name, text in files.items():
            write_text_atomic(run_dir / ".hydra" / name, text, f"Hydra's {name}")
    if _RUN_LOCK is not None:
        _RUN_LOCK.note_pid()


# --------------------------------------------------------------------------------------
# 7. resume
# --------------------------------------------------------------------------------------
# What a checkpoint holds, resuming with fallback, trimming metrics and when to save: next
# to the checkpoint writer, in imgcls/checkpoint.py (State, resume, save, checkpoint_due, ...).


# --------------------------------------------------------------------------------------
# 8. loop
# --------------------------------------------------------------------------------------
class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step boundary and exits."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def __enter__(self):
        for name in EXIT_SIGNAL:
            sig = getattr(signal, name)
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.signal = signal.Signals(signum).name

    def requested(self, loop, epoch_end: bool = False) -> bool:
        """Stop now? The same answer on every rank. Alone: the local flag, at every step.
        Under torchrun asking costs an all_reduce and a host sync, so ranks ask only every
        trainer.log_every steps and at epoch ends (all of them at the same step)."""
        if loop.dist.enabled and not epoch_end and loop.state.step % loop.t.log_every:
            return False
        if distributed.any_rank(self.signal is not None, loop.dist, loop.device):
            self.signal = self.signal or "SIGTERM"  # another rank was signalled
            return True
        return False

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


class MetricsLog:
    """metrics.jsonl: one JSON object per line, flushed per line so a kill loses nothing;
    the optional logger of cfg.logger gets the same records (and ``extra`` ones)."""

    KEPT = "every complete line before it is kept; the last checkpoint is intact (the same command resumes)"

    def __init__(self, path: Path | None, progress: bool, logger=None):
        from imgcls.io import JsonLines

        # None: a rank other than 0. One os.write per line: a kill loses nothing, a full disk
        # leaves no torn line (see JsonLines).
        self.file = JsonLines(path, "metrics", self.KEPT) if path is not None else None
        self.progress = progress
        self.logger = logger

    def write(self, record: dict, echo: bool, **extra) -> None:
        if self.file is None:
            return
        self.file.append(record)
        if self.logger is not None:
            with self._logger_writes():
                self.logger.log({**record, **extra})
        line = " ".join(f"{k}={_fmt(v)}" for k, v in record.items())
        if echo and not self.progress:
            print(line, flush=True)
        elif echo == "always":  # an evaluation: a line above the bar (the bar shows loss and lr)
            from tqdm import tqdm

            tqdm.write(line)

    def _logger_writes(self):
        """A logger's OSError (disk full, read-only) as a WriteFault naming its file."""
        from imgcls.io import writing

        where = getattr(self.logger, "path", None) or type(self.logger).__name__
        return writing(where, "the logger's file", "metrics.jsonl and the last checkpoint are intact")

    def close(self):
        """Closes everything; while another error is on its way out (sys.exc_info() inside the
        loop's `finally`), a failing close (a logger flushing to the same full disk) stays quiet
        so that error is the one reported."""
        failing = sys.exc_info()[1] is not None
        try:
            if self.file is not None:
                self.file.close()
            if self.logger is not None:
                with self._logger_writes():
                    self.logger.close()
        except Exception:
            if not failing:
                raise


def build_logger(cfg: DictConfig, run_dir: Path, optimizer, runs: dict | None = None):
    """The logger of cfg.logger (None for logger=none); imported only when chosen. A tracker
    (wandb, mlflow) gets the resolved config and `runs` (State.logger_runs, kept in the
    checkpoint): it continues the run named there and records the id of its own run there."""
    if cfg.logger.get("_target_") is None:
        return None
    from imgcls.loggers import open_logger

    with config_errors("logger"):
        return open_logger(
            hydra.utils.instantiate(cfg.logger),
            run_dir,
            len(optimizer.param_groups),
            config=OmegaConf.to_container(cfg, resolve=True),
            runs=runs,
        )


def log_results(cfg: DictConfig, run_dir: Path, state, dist) -> None:
    """After results.json: a tracker that keeps files (MLflow) gets it and the checkpoint."""
    if dist.is_main and cfg.logger.get("_target_") is not None:
        from imgcls.loggers import log_results as tracker_log_results

        tracker_log_results(cfg.logger, state.logger_runs, run_dir)


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def train(
    cfg, run_dir, data: Data, model, optimizer, scheduler, state: State, device, dist, extras: Extras
) -> str | None:
    """The loop. Returns the name of the signal that stopped it, or None when it finished."""
    from imgcls.checkpoint import checkpoint_due

    loop = Loop(cfg, run_dir, data, model, optimizer, scheduler, state, device, dist, extras)
    with StopRequest() as stop, Reporter(loop) as report:
        for epoch in range(state.epoch, cfg.trainer.epochs):
            stopped = run_epoch(loop, report, epoch, stop)  # True: stopped at a step boundary
            if not stopped:
                end_epoch(loop, report, epoch)
                stopped = stop.requested(loop, epoch_end=True)
            due = stopped or checkpoint_due(cfg.trainer, state)
            if due or loop.improved:  # best.pt: the best validation accuracy so far
                loop.checkpoint(last=due, best=loop.improved)
            if stopped:
                print(f"{stop.signal}: checkpoint saved at step {state.step}; exiting", flush=True)
                return stop.signal
    return None


class Loop:
    """What the loop works with, built once: the wrapped net (DDP, torch.compile), precision,
    the loss, when the scheduler steps, and the training loss summed on the device."""

    def __init__(
        self, cfg, run_dir, data: Data, model, optimizer, scheduler, state: State, device, dist, extras: Extras
    ):
        import torch

        from imgcls.config import SchedulerStepper

        self.cfg, self.t, self.run_dir, self.data = cfg, cfg.trainer, run_dir, data
        self.model, self.optimizer, self.scheduler, self.state = model, optimizer, scheduler, state
        self.device, self.dist, self.extras = device, dist, extras
        self.stepper = SchedulerStepper(scheduler, optimizer, cfg.schedule.interval)
        self.precision, self.averaging = extras.precision, extras.averaging  # fp32 | bf16 | fp16; EMA/SWA
        self.split = data.eval_split  # val, or test when data.val_size is 0
        # "best": the EMA weights' accuracy when EMA is on (they are the weights reported), else the raw ones'
        self.monitor = f"ema_{self.split}_acc" if self.averaging.ema is not None else f"{self.split}_acc"
        self.improved = False  # the epoch's evaluation beat the best so far (best.pt is due)
        self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=self.t.label_smoothing)
        self.net = model
        if dist.enabled:  # gradients averaged over ranks during backward
            from torch.nn.parallel import DistributedDataParallel

            self.net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        self.net = torch.compile(self.net) if self.t.compile else self.net
        # Training loss accumulates on the device; it is read once per log line (one host sync).
        self.loss_sum = torch.tensor(state.loss_sum, device=device, dtype=torch.float32)

    def step(self, x, y) -> None:
        """One optimizer step, its counters, and the scheduler step due after it."""
        import torch

        loss = train_step(
            self.net,
            self.optimizer,
            self.loss_fn,
            x,
            y,
            self.precision,
            self.t.skip_nonfinite,
            self.extras.scaler,
            self.t.grad_clip_norm,
        )
        if loss is None:
            self.state.skipped_steps += 1
            loss = torch.zeros((), device=self.device)
        else:
            self.averaging.after_step(self.model)
        self.loss_sum += loss.float()
        self.state.loss_count += 1
        self.state.step += 1
        self.state.batch += 1
        self.state.images += len(y)
        self.stepper.after_step()

    def read_loss(self) -> float:
        """The host sync: the mean training loss since the last log line (summed over ranks);
        a NaN/inf anywhere in it stops the run."""
        from imgcls.checkpoint import checkpoint_path

        state = self.state
        value = distributed.mean_over_ranks(self.loss_sum, self.dist).item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss is {value} between steps {state.step - state.loss_count} and "
                f"{state.step} (epoch {state.epoch}): stopped without saving; the last good checkpoint (if any) "
                f"{checkpoint_path(self.run_dir)} is intact. Lower optimizer.lr, or set "
                f"trainer.skip_nonfinite=true to skip such steps"
            )
        return value

    def take_loss(self) -> float:
        """The mean training loss since the last log line; starts the next sum."""
        value = self.read_loss() / max(self.state.loss_count, 1)
        self.loss_sum.zero_()
        self.state.loss_count = 0
        self.state.loss_sum = 0.0
        return value

    def evaluate(self, finishing: bool = False) -> dict:
        """The evaluated split (val, else test) with the raw weights, and with the EMA weights
        (and the SWA weights when finishing) when on: keys val_acc, ema_val_acc, swa_val_acc...
        Under torchrun rank 0 evaluates the model without its DDP wrapper (a DDP forward on
        one rank alone would wait for the others); every rank gets the numbers."""
        net = self.model if self.dist.enabled else self.net
        loader = self.data.val if self.data.val is not None else self.data.test
        result = None
        if self.dist.is_main:
            result = evaluate(net, loader, self.t, self.device, self.precision, self.loss_fn, prefix=self.split)
            for name in ("ema", "swa") if finishing else ("ema",):
                averaged = getattr(self.averaging, name)
                if averaged is not None:
                    prefix = f"{name}_{self.split}"
                    result.update(evaluate(averaged, loader, self.t, self.device, self.precision, self.loss_fn, prefix))
        return distributed.broadcast(result, self.dist)

    def checkpoint(self, last: bool = True, best: bool = False) -> None:
        """Save at a step boundary (last.pt, and best.pt when asked); the partial training-loss
        sum goes with it."""
        from imgcls.checkpoint import save

        self.state.loss_sum = self.read_loss()
        save(
            self.cfg,
            self.run_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            self.state,
            self.dist,
            self.extras.state_dict(),
            last=last,
            best=best,
        )
        self.improved = False


def run_epoch(loop: Loop, report, epoch: int, stop) -> bool:
    """Train epoch ``epoch`` from batch ``state.batch``; True if a stop request ended it early."""
    state, steps = loop.state, loop.data.steps_per_epoch
    loop.model.train()
    state.epoch = epoch
    t0 = time.perf_counter()
    try:
        for x, y in loop.data.train.epoch_batches(epoch, state.batch):
            if state.batch >= steps:
                break
            loop.step(x, y)
            report.after_step(loop)
            # the epoch's last step is followed by end_epoch's check instead
            if state.batch < steps and stop.requested(loop):
                return True
        return False
    finally:
        _sync(loop.device)
        state.train_seconds += time.perf_counter() - t0


def end_epoch(loop: Loop, report, epoch: int) -> None:
    """Evaluate when due, step a per-epoch schedule, and write the epoch's last lines."""
    state, t = loop.state, loop.t
    state.batch, state.epoch = 0, epoch + 1
    last = epoch + 1 == t.epochs
    loop.averaging.after_epoch(loop.model, epoch)  # SWA averages at epoch ends
    if last:
        loop.averaging.finish(loop.data.train.epoch_batches(t.epochs))  # SWA's BatchNorm statistics, once
    evaluated = last or (epoch + 1) % t.eval_every == 0
    if evaluated:
        state.last_eval = loop.evaluate(finishing=last)
        acc = state.last_eval[loop.monitor]
        if state.best_acc is None or acc > state.best_acc:
            state.best_acc, state.best_epoch = acc, epoch + 1
            loop.improved = loop.data.val is not None  # best.pt is selected on the validation split only
    loop.stepper.after_epoch(state.last_eval[f"{loop.split}_loss"] if state.last_eval else None)
    report.flush(loop)  # the epoch's last train line: its lr is the one after this epoch's step
    if evaluated:
        report.write({"step": state.step, "epoch": epoch + 1, **state.last_eval}, echo="always")
    state.finished = last


class Reporter:
    """What a run reports: metrics.jsonl lines (and the logger's), the progress bar, images/s.
    ``lr`` at step N is the lr after N steps and the scheduler steps due by then (the lr step
    N+1 uses), so a line at an epoch's last step waits for the epoch-end scheduler step."""

    def __init__(self, loop: Loop):
        cfg, t, dist, state = loop.cfg, loop.t, loop.dist, loop.state
        progress = _progress_enabled(t.progress) and dist.is_main
        self.log = (
            MetricsLog(
                loop.run_dir / "metrics.jsonl",
                progress,
                build_logger(cfg, loop.run_dir, loop.optimizer, loop.state.logger_runs),
            )
            if dist.is_main
            else MetricsLog(None, progress)
        )
        self.bar = _bar(progress, total=t.epochs * loop.data.steps_per_epoch, initial=state.step)
        self.interval_start = (time.perf_counter(), state.images)  # for images/s per log interval
        self.pending = None  # (record, images/s) of a line waiting for its lr

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.log.close()
        self.bar and self.bar.close()

    def after_step(self, loop: Loop) -> None:
        state = loop.state
        if state.step % loop.t.log_every == 0:
            record = {
                "step": state.step,
                "epoch": state.epoch + state.batch / loop.data.steps_per_epoch,
                "lr": None,
                "train_loss": loop.take_loss(),
            }  # the one host sync
            now = time.perf_counter()
            speed = (state.images - self.interval_start[1]) / max(now - self.interval_start[0], 1e-9)
            self.interval_start = (now, state.images)
            self.pending = (record, speed)
            if state.batch < loop.data.steps_per_epoch:
                self.flush(loop)
        self.bar and self.bar.update(1)

    def flush(self, loop: Loop) -> None:
        if self.pending is None:
            return
        record, speed = self.pending
        self.pending = None
        record["lr"] = loop.stepper.lrs()
        self.write(record, images_per_second=speed)
        self.bar and self.bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr'][0]:.3g}")

    def write(self, record: dict, echo: bool | str = True, **extra) -> None:
        """echo="always": shown with the progress bar on too (evaluations)."""
        self.log.write(record, echo=echo, **extra)


def train_step(
    net, optimizer, loss_fn, x, y, precision, skip_nonfinite: bool = False, scaler=None, clip_norm: float | None = None
):
    """One optimizer step on batch (x, y); the detached loss, or None if it was NaN/inf and
    skip_nonfinite is set (that check is a host sync per step, hence opt-in).
    precision: fp32 | bf16 | fp16 (a bool: bf16 or fp32); fp16 takes the GradScaler ``scaler``;
    clip_norm clips the total gradient norm, unscaled first (imgcls/precision.py).
    Also what `make bench` times (benchmarks/bench_train.py)."""
    import torch

    from imgcls.precision import autocast, make_scaler, optimizer_step

    precision = _precision(precision)
    with autocast(x.device, precision):
        loss = loss_fn(net(x), y)
    if skip_nonfinite and not torch.isfinite(loss):
        return None
    optimizer_step(loss, optimizer, scaler if scaler is not None else make_scaler(x.device, "fp32"), clip_norm)
    return loss.detach()


def _precision(p) -> str:
    return ("bf16" if p else "fp32") if isinstance(p, bool) else p


def evaluate(net, loader, t, device, precision, loss_fn, prefix: str = "test") -> dict:
    """Loss and accuracy on ``loader`` (flip TTA if trainer.tta_flip), summed on the device and
    read once, by imgcls.evaluate.run_eval: the code `python -m imgcls.evaluate` runs.
    trainer.limit_eval_batches is applied by load_data (a fixed, class-balanced subset)."""
    from imgcls.evaluate import run_eval

    r = run_eval(net, loader.epoch_batches(0), device, _precision(precision), t.tta_flip)
    return {f"{prefix}_loss": r["loss"], f"{prefix}_acc": r["acc"]}


def _sync(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize()


def _progress_enabled(setting) -> bool:
    if setting == "auto":
        return sys.stderr.isatty()
    return bool(setting)


def _bar(enabled: bool, total: int, initial: int):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)


# --------------------------------------------------------------------------------------
# 9. save
# --------------------------------------------------------------------------------------
def final_test(cfg, run_dir: Path, data: Data, model, state: State, device, extras: Extras) -> dict:
    """The test split, read once, at the end: the final weights (SWA, else EMA, else raw: what
    `python -m imgcls.evaluate` takes from the checkpoint), and best.pt's when it is another
    epoch. Without a validation split the last evaluation already read the test split."""
    import copy

    from imgcls.averaging import averaged_weights
    from imgcls.checkpoint import best_path, load_checkpoint, unwrap_model

    plain = unwrap_model(model)
    weights, which = averaged_weights(
        {"model": plain.state_dict(), "averaging": extras.averaging.state_dict(), "state": {"finished": True}}
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
    final = evaluate(net, data.test, cfg.trainer, device, extras.precision, None)
    out = {"final_test_acc": final["test_acc"], "final_test_loss": final["test_loss"], "weights": which}
    best = best_path(run_dir)
    if state.best_epoch == state.epoch or not best.exists():
        out["best_ckpt_test_acc"] = final["test_acc"]
    else:
        net.load_state_dict(averaged_weights(load_checkpoint(best))[0])
        out["best_ckpt_test_acc"] = evaluate(net, data.test, cfg.trainer, device, extras.precision, None)["test_acc"]
    return out


def _pfx(record: dict) -> str:
    """The key prefix of the weights a final evaluation reports: swa_, ema_ or none (raw)."""
    return next((p for p in ("swa_", "ema_") if any(k.startswith(p) for k in record)), "")


def write_results(cfg, run_dir: Path, data: Data, model, state: State, device, dist, extras: Extras) -> None:
    import torch

    if not dist.is_main:
        return
    last = state.last_eval or {}
    val = {}
    if data.val is not None:  # "best" and "final" of the weights below (EMA/SWA when on)
        val = {
            "best_val_acc": state.best_acc,
            "best_epoch": state.best_epoch,
            "final_val_acc": last.get(f"{_pfx(last)}val_acc"),
            "final_val_loss": last.get(f"{_pfx(last)}val_loss"),
        }
    results = {
        **val,
        **final_test(cfg, run_dir, data, model, state, device, extras),
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_seconds": round(state.train_seconds, 3),  # the training loop only, evaluation excluded
        "images_per_second": round(state.images / state.train_seconds, 1) if state.train_seconds else None,
        "wall_seconds": round(time.time() - _PROCESS_START, 3),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    from imgcls.io import write_text_atomic

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


_PROCESS_START = time.time()

if __name__ == "__main__":
    cli()
