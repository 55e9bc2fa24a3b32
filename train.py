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
from imgcls.config import check_writable, config_errors, pick_device, preflight, setup, validate_config

if TYPE_CHECKING:
    from imgcls.checkpoint import State

setup()  # the resolvers and the config schema, before Hydra composes conf/

EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as a shell reports it
EXIT_BAD_INPUT = 2  # a config value, a data file or a checkpoint was refused at start-up
EXIT_NONFINITE = 3  # the training loss became NaN or inf (the last good checkpoint is kept)
EXIT_WRITE_FAULT = 4  # a checkpoint could not be written (the previous one is intact)


def cli() -> None:
    """The command line: a config that cannot be composed is refused here in one line (exit 2)
    before Hydra starts; then Hydra runs main (once, or once per job of a multirun)."""
    preflight(sys.argv[1:])
    main()


@hydra.main(config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the best test accuracy: the objective of hparams_search sweeps."""
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    with exit_cleanly():
        return recipe(cfg, run_dir)


def recipe(cfg: DictConfig, run_dir: Path) -> float | None:
    from imgcls.checkpoint import resume

    validate_config(cfg)  # 1. config (fails before any work)
    check_writable(run_dir)  #    the run directory
    device = pick_device(cfg)  #    the device
    dist, device, run_dir = join_ranks(device, run_dir)  #    torchrun: one process per device
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, device)  # 2. seed
    data = load_data(cfg, device, dist)  # 3. data (fills schedule.steps_per_epoch)
    model = build_model(cfg, data.num_classes, device)  # 4. model
    optimizer = build_optimizer(cfg, model, device)  # 5. optimizer
    scheduler = build_scheduler(cfg, optimizer)  # 6. scheduler
    write_config(cfg, run_dir, dist)  #    the resolved config, beside .hydra/
    state = resume(cfg, run_dir, model, optimizer, scheduler, dist)  # 7. resume
    if state.epoch >= cfg.trainer.epochs:
        print(f"run in {run_dir} already finished at step {state.step}: nothing to do")
        return state.best_acc
    stop = train(cfg, run_dir, data, model, optimizer, scheduler, state, device, dist)  # 8. loop
    if stop:
        sys.exit(EXIT_SIGNAL[stop])
    write_results(run_dir, state, device, dist)  # 9. save
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


class exit_cleanly:
    """Known faults end the process with one line on stderr and a documented exit code
    (HYDRA_FULL_ERROR=1 shows the traceback instead)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if kind is None or os.environ.get("HYDRA_FULL_ERROR") == "1":
            return False
        from omegaconf.errors import OmegaConfBaseException

        from imgcls.checkpoint import CheckpointError, CheckpointWriteError

        if issubclass(kind, FloatingPointError):
            code = EXIT_NONFINITE
        elif issubclass(kind, CheckpointWriteError):
            code = EXIT_WRITE_FAULT
        elif issubclass(kind, (ValueError, FileNotFoundError, CheckpointError, OmegaConfBaseException)):
            code = EXIT_BAD_INPUT
        else:
            return False
        print(f"error: {exc}", file=sys.stderr, flush=True)
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if HydraConfig.get().mode == RunMode.MULTIRUN:
            return False  # Hydra marks this job failed and runs the next one
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
    """The train and test loaders on the training device, and what the schedule needs."""

    def __init__(self, train, test, num_classes: int, steps_per_epoch: int, description: str):
        self.train, self.test = train, test
        self.num_classes, self.steps_per_epoch = num_classes, steps_per_epoch
        self.description = description


def load_data(cfg: DictConfig, device, dist) -> Data:
    import torch

    from imgcls.data import DeviceLoader, describe, load_dataset

    d, t = cfg.data, cfg.trainer
    ds = load_dataset(
        name=d.name,
        root=d.get("root", "data"),
        download=d.get("download", False),
        path=d.get("path"),
        synthetic_size=tuple(d.get("synthetic_size", (512, 256))),
        num_classes=d.num_classes or 10,
        seed=t.seed,
    )
    if t.batch_size > len(ds.train_labels):
        raise ValueError(
            f"trainer.batch_size: {t.batch_size} is larger than the {len(ds.train_labels)} training "
            f"images; use at most {len(ds.train_labels)}"
        )
    if t.batch_size % dist.world:
        raise ValueError(f"trainer.batch_size: {t.batch_size} is not divisible by the {dist.world} ranks")
    channels_last = device.type == "cuda"  # NHWC feeds the tensor cores without transposes
    common = dict(device=device, mean=ds.mean, std=ds.std, channels_last=channels_last, dtype=torch.float32)
    train = DeviceLoader(  # trainer.batch_size is the global batch: rank r takes its images r::N
        ds.train_images,
        ds.train_labels,
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
    test = DeviceLoader(ds.test_images, ds.test_labels, t.eval_batch_size, train=False, drop_last=False, **common)
    steps = min(len(train), t.limit_train_batches or len(train))
    with open_dict(cfg):
        cfg.schedule.steps_per_epoch = steps
        if d.num_classes is None:
            cfg.data.num_classes = len(ds.classes)
    if dist.is_main:
        ranks = f" x {dist.world} ranks" if dist.enabled else ""
        print(describe(ds), f"| {steps} steps per epoch on {device}{ranks}", flush=True)
    return Data(train, test, len(ds.classes), steps, describe(ds))


# --------------------------------------------------------------------------------------
# 4. model, 5. optimizer, 6. scheduler
# --------------------------------------------------------------------------------------
def build_model(cfg: DictConfig, num_classes: int, device):
    import torch

    with config_errors("model"):
        model = hydra.utils.instantiate(cfg.model)(num_classes=num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: DictConfig, model, device):
    import inspect

    with config_errors("optimizer"):
        factory = hydra.utils.instantiate(cfg.optimizer, _convert_="all")
        extra = {}
        if device.type == "cuda" and "fused" in inspect.signature(factory.func).parameters:
            extra["fused"] = True  # one kernel for the whole update instead of one per tensor
        return factory(model.parameters(), **extra)


def build_scheduler(cfg: DictConfig, optimizer):
    """The schedule tree of cfg.scheduler, built on the optimizer (the one place it gets it),
    refused if it does not fit the run (a milestone past the end, a warmup that never ends)."""
    from imgcls.config import check_schedule_fits

    with config_errors("scheduler"):
        scheduler = hydra.utils.instantiate(cfg.scheduler, _convert_="all")(optimizer)
    check_schedule_fits(scheduler, cfg)
    return scheduler


def write_config(cfg: DictConfig, run_dir: Path, dist) -> None:
    if dist.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


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

    def __init__(self, path: Path | None, progress: bool, logger=None):
        self.file = open(path, "a") if path is not None else None  # None: a rank other than 0
        self.progress = progress
        self.logger = logger

    def write(self, record: dict, echo: bool, **extra) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.logger is not None:
            self.logger.log({**record, **extra})
        if echo and not self.progress:
            print(" ".join(f"{k}={_fmt(v)}" for k, v in record.items()), flush=True)

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.logger is not None:
            self.logger.close()


def build_logger(cfg: DictConfig, run_dir: Path, optimizer):
    """The logger of cfg.logger (None for logger=none); imported only when chosen."""
    if cfg.logger.get("_target_") is None:
        return None
    with config_errors("logger"):
        return hydra.utils.instantiate(cfg.logger)(run_dir=run_dir, num_groups=len(optimizer.param_groups))


def _fmt(v):
    return f"{v:.4g}" if isinstance(v, float) else v


def train(cfg, run_dir, data: Data, model, optimizer, scheduler, state: State, device, dist) -> str | None:
    """The loop. Returns the name of the signal that stopped it, or None when it finished."""
    from imgcls.checkpoint import checkpoint_due

    loop = Loop(cfg, run_dir, data, model, optimizer, scheduler, state, device, dist)
    with StopRequest() as stop, Reporter(loop) as report:
        for epoch in range(state.epoch, cfg.trainer.epochs):
            stopped = run_epoch(loop, report, epoch, stop)  # True: stopped at a step boundary
            if not stopped:
                end_epoch(loop, report, epoch)
                stopped = stop.requested(loop, epoch_end=True)
            if stopped or checkpoint_due(cfg.trainer, state):
                loop.checkpoint()
            if stopped:
                print(f"{stop.signal}: checkpoint saved at step {state.step}; exiting", flush=True)
                return stop.signal
    return None


class Loop:
    """What the loop works with, built once: the wrapped net (DDP, torch.compile), precision,
    the loss, when the scheduler steps, and the training loss summed on the device."""

    def __init__(self, cfg, run_dir, data: Data, model, optimizer, scheduler, state: State, device, dist):
        import torch

        from imgcls.config import SchedulerStepper

        self.cfg, self.t, self.run_dir, self.data = cfg, cfg.trainer, run_dir, data
        self.model, self.optimizer, self.scheduler, self.state = model, optimizer, scheduler, state
        self.device, self.dist = device, dist
        self.stepper = SchedulerStepper(scheduler, optimizer, cfg.schedule.interval)
        self.bf16 = self.t.precision == "bf16" or (self.t.precision == "auto" and device.type == "cuda")
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

        loss = train_step(self.net, self.optimizer, self.loss_fn, x, y, self.bf16, self.t.skip_nonfinite)
        if loss is None:
            self.state.skipped_steps += 1
            loss = torch.zeros((), device=self.device)
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

    def evaluate(self) -> dict:
        """Under torchrun rank 0 evaluates the model without its DDP wrapper (a DDP forward on
        one rank alone would wait for the others); every rank gets the numbers."""
        net = self.model if self.dist.enabled else self.net
        result = (
            evaluate(net, self.data.test, self.t, self.device, self.bf16, self.loss_fn) if self.dist.is_main else None
        )
        return distributed.broadcast(result, self.dist)

    def checkpoint(self) -> None:
        """Save at a step boundary; the partial training-loss sum goes with it."""
        from imgcls.checkpoint import save

        self.state.loss_sum = self.read_loss()
        save(self.cfg, self.run_dir, self.model, self.optimizer, self.scheduler, self.state, self.dist)


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
    evaluated = last or (epoch + 1) % t.eval_every == 0
    if evaluated:
        state.last_eval = loop.evaluate()
        acc = state.last_eval["test_acc"]
        state.best_acc = acc if state.best_acc is None else max(state.best_acc, acc)
    loop.stepper.after_epoch(state.last_eval["test_loss"] if state.last_eval else None)
    report.flush(loop)  # the epoch's last train line: its lr is the one after this epoch's step
    if evaluated:
        report.write({"step": state.step, "epoch": epoch + 1, **state.last_eval})
    state.finished = last


class Reporter:
    """What a run reports: metrics.jsonl lines (and the logger's), the progress bar, images/s.
    ``lr`` at step N is the lr after N steps and the scheduler steps due by then (the lr step
    N+1 uses), so a line at an epoch's last step waits for the epoch-end scheduler step."""

    def __init__(self, loop: Loop):
        cfg, t, dist, state = loop.cfg, loop.t, loop.dist, loop.state
        progress = _progress_enabled(t.progress) and dist.is_main
        self.log = (
            MetricsLog(loop.run_dir / "metrics.jsonl", progress, build_logger(cfg, loop.run_dir, loop.optimizer))
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

    def write(self, record: dict, **extra) -> None:
        self.log.write(record, echo=True, **extra)


def train_step(net, optimizer, loss_fn, x, y, bf16: bool, skip_nonfinite: bool = False):
    """One optimizer step on batch (x, y); the detached loss, or None if it was NaN/inf and
    skip_nonfinite is set (that check is a host sync per step, hence opt-in).
    Also what `make bench` times (benchmarks/bench_train.py)."""
    import torch

    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        loss = loss_fn(net(x), y)
    if skip_nonfinite and not torch.isfinite(loss):
        return None
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def evaluate(net, loader, t, device, bf16: bool, loss_fn) -> dict:
    """Test loss and accuracy (flip TTA if trainer.tta_flip), summed on the device, read once."""
    import torch

    net.eval()
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    n = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for i, (x, y) in enumerate(loader.epoch_batches(0)):
            if t.limit_eval_batches and i >= t.limit_eval_batches:
                break
            logits = net(x).float()
            if t.tta_flip:
                logits = (logits + net(x.flip(-1)).float()) / 2
            loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
            n += len(y)
    return {"test_loss": loss.item() / n, "test_acc": correct.item() / n}


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
def write_results(run_dir: Path, state: State, device, dist) -> None:
    import torch

    if not dist.is_main:
        return
    results = {
        "final_test_acc": state.last_eval["test_acc"] if state.last_eval else None,
        "best_test_acc": state.best_acc,
        "final_test_loss": state.last_eval["test_loss"] if state.last_eval else None,
        "steps": state.step,
        "skipped_steps": state.skipped_steps,
        "train_seconds": round(state.train_seconds, 3),  # the training loop only, evaluation excluded
        "images_per_second": round(state.images / state.train_seconds, 1) if state.train_seconds else None,
        "wall_seconds": round(time.time() - _PROCESS_START, 3),
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    (run_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    acc = results["final_test_acc"]
    print(
        f"done: test accuracy {acc if acc is None else f'{acc:.4f}'}, results in {run_dir / 'results.json'}", flush=True
    )


_PROCESS_START = time.time()

if __name__ == "__main__":
    cli()
