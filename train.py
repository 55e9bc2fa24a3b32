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

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from imgcls import distributed
from imgcls.config import config_errors, device_switch, fused_argument, register_resolvers, validate_config

register_resolvers()

EXIT_SIGNAL = {"SIGTERM": 143, "SIGINT": 130}  # 128 + signal number, as a shell reports it
EXIT_BAD_INPUT = 2       # a config value, a data file or a checkpoint was refused at start-up
EXIT_NONFINITE = 3       # the training loss became NaN or inf (the last good checkpoint is kept)
EXIT_WRITE_FAULT = 4     # a checkpoint could not be written (the previous one is intact)


@hydra.main(config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the best test accuracy: the objective of hparams_search sweeps."""
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    with exit_cleanly():
        return recipe(cfg, run_dir)


def recipe(cfg: DictConfig, run_dir: Path) -> float | None:
    device = validate_config(cfg, run_dir)                   # 1. config (fails before any work)
    dist, device, run_dir = join_ranks(device, run_dir)      #    torchrun: one process per device
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, device)  # 2. seed
    data = load_data(cfg, device, dist)                      # 3. data (fills schedule.steps_per_epoch)
    model = build_model(cfg, data.num_classes, device)       # 4. model
    optimizer = build_optimizer(cfg, model, device)          # 5. optimizer
    scheduler = build_scheduler(cfg, optimizer)              # 6. scheduler
    write_config(cfg, run_dir, dist)                         #    the resolved config, beside .hydra/
    state = resume(cfg, run_dir, model, optimizer, scheduler, dist)  # 7. resume
    if state.epoch >= cfg.trainer.epochs:
        print(f"run in {run_dir} already finished at step {state.step}: nothing to do")
        return state.best_acc
    stop = train(cfg, run_dir, data, model, optimizer, scheduler, state, device, dist)  # 8. loop
    if stop:
        sys.exit(EXIT_SIGNAL[stop])
    write_results(run_dir, state, device, dist)              # 9. save
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

        from imgcls.checkpoint import CheckpointError

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
        root=d.root,
        download=d.download,
        path=d.path,
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
    channels_last = device_switch(t.channels_last, device)  # NHWC feeds the tensor cores without transposes
    common = dict(device=device, mean=ds.mean, std=ds.std, channels_last=channels_last, dtype=torch.float32)
    train_images, train_labels = distributed.shard(ds.train_images, ds.train_labels, dist)
    train = DeviceLoader(  # trainer.batch_size is the global batch: each rank takes 1/N of it
        train_images, train_labels, t.batch_size // dist.world, train=True, seed=t.seed,
        crop_padding=d.crop_padding, flip=d.flip, alternating_flip=d.alternating_flip, **common,
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
    """The schedule tree of cfg.scheduler, built on the optimizer (the one place it gets it)."""
    with config_errors("scheduler"):
        return hydra.utils.instantiate(cfg.scheduler, _convert_="all")(optimizer)


def write_config(cfg: DictConfig, run_dir: Path, dist) -> None:
    if dist.is_main:
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))


# --------------------------------------------------------------------------------------
# 7. resume
# --------------------------------------------------------------------------------------
class State:
    """Counters that a checkpoint carries, besides the model, optimizer and scheduler."""

    def __init__(self):
        self.step = 0            # optimizer steps done
        self.epoch = 0           # epoch in progress
        self.batch = 0           # next batch of that epoch
        self.finished = False
        self.best_acc = None     # best test accuracy so far
        self.last_eval = None    # {"test_loss", "test_acc"} of the latest evaluation
        self.loss_sum = 0.0      # training loss summed since the last log line...
        self.loss_count = 0      # ...over this many steps
        self.train_seconds = 0.0
        self.images = 0          # training images processed (for images per second)
        self.skipped_steps = 0   # steps whose loss was NaN/inf, dropped (trainer.skip_nonfinite)

    def to_dict(self) -> dict:
        return dict(vars(self))

    def load(self, d: dict) -> None:
        for k in vars(self):
            if k in d:
                setattr(self, k, d[k])


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / "checkpoints" / "last.pt"


def resume(cfg: DictConfig, run_dir: Path, model, optimizer, scheduler, dist) -> State:
    from imgcls.checkpoint import find_resumable, load_checkpoint, set_rng_state

    from imgcls.config import check_resume_config

    state = State()
    metrics = run_dir / "metrics.jsonl"
    if cfg.resume == "never":
        fresh_start(metrics, dist)
        return state
    if cfg.resume == "auto":
        found = find_resumable(checkpoint_path(run_dir), cfg.trainer.keep_checkpoints)
        if found is None:
            fresh_start(metrics, dist)
            return state
        ckpt, path = found
        set_aside_unreadable(checkpoint_path(run_dir), path, dist)
    else:
        path = Path(cfg.resume).expanduser()
        ckpt = load_checkpoint(path)
    check_resume_config(ckpt, cfg, path)
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
    except (KeyError, RuntimeError, ValueError) as e:
        raise ValueError(f"resume: checkpoint {path} does not fit this model/optimizer/scheduler: {e}") from e
    set_rng_state(ckpt["rng"])
    state.load(ckpt["state"])
    if dist.is_main:
        trim_metrics(run_dir / "metrics.jsonl", state.step)
    print(f"resumed from {path} at step {state.step} (epoch {state.epoch}, batch {state.batch})", flush=True)
    return state


def fresh_start(metrics: Path, dist) -> None:
    """Starting from step 0: drop what a run killed before its first checkpoint logged."""
    if dist.is_main:
        trim_metrics(metrics, 0)


def set_aside_unreadable(last: Path, resumed_from: Path, dist) -> None:
    """Resumed from a backup because last.pt is unreadable: rename it to last.pt.unreadable so
    that the next save does not rotate it over the good backup it resumed from."""
    if dist.is_main and resumed_from != last and last.exists():
        os.replace(last, last.with_name(last.name + ".unreadable"))
        print(f"resume: {last} was unreadable; kept as {last.name}.unreadable", flush=True)


def trim_metrics(path: Path, step: int) -> None:
    """Drop metrics lines written after the checkpoint (a run killed between checkpoints)."""
    if not path.exists():
        return
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
    if len(kept) != len(lines):
        path.write_text("".join(ln + "\n" for ln in kept))


def save(cfg: DictConfig, run_dir: Path, model, optimizer, scheduler, state: State, dist) -> None:
    """Rank 0 writes (every rank holds the same weights); the others wait for it."""
    if not dist.is_main:
        distributed.barrier(dist)
        return
    try:
        _save(cfg, run_dir, model, optimizer, scheduler, state)
    except OSError as e:
        raise CheckpointWriteError(str(e)) from e
    distributed.barrier(dist)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, read-only...); the previous one is intact."""


def _save(cfg: DictConfig, run_dir: Path, model, optimizer, scheduler, state: State) -> None:
    from imgcls.checkpoint import rng_state, save_checkpoint, unwrap_model

    save_checkpoint(
        {
            "model": unwrap_model(model).state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "state": state.to_dict(),
            "rng": rng_state(),
            "config": OmegaConf.to_container(cfg, resolve=True),
            "config_unresolved": OmegaConf.to_container(cfg, resolve=False),
        },
        checkpoint_path(run_dir),
        keep=cfg.trainer.keep_checkpoints,
    )


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
    import torch

    from sched import needs_metrics

    t = cfg.trainer
    steps_per_epoch = data.steps_per_epoch
    per_step = cfg.schedule.interval == "step"
    wants_metric = needs_metrics(scheduler)  # a ReduceLROnPlateau phase gets the test loss
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=t.label_smoothing)
    net = model
    if dist.enabled:  # gradients averaged over ranks during backward
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    net = torch.compile(net) if t.compile else net
    progress = _progress_enabled(t.progress) and dist.is_main
    log = (MetricsLog(run_dir / "metrics.jsonl", progress, build_logger(cfg, run_dir, optimizer))
           if dist.is_main else MetricsLog(None, progress))
    interval_start = (time.perf_counter(), state.images)  # for images/s per log interval
    bar = _bar(progress, total=t.epochs * steps_per_epoch, initial=state.step)
    # Training loss accumulates on the device; it is read once per log line (one host sync).
    loss_sum = torch.tensor(state.loss_sum, device=device, dtype=torch.float32)

    def step_fn(x, y):
        loss = train_step(net, optimizer, loss_fn, x, y, bf16, t.skip_nonfinite)
        if loss is None:
            state.skipped_steps += 1
            return torch.zeros((), device=device)
        return loss

    def read_loss_sum() -> float:
        """The host sync: read the accumulated loss; a NaN/inf anywhere in it stops the run."""
        value = distributed.mean_over_ranks(loss_sum, dist).item()
        if not math.isfinite(value):
            raise FloatingPointError(
                f"training loss is {value} between steps {state.step - state.loss_count} and "
                f"{state.step} (epoch {state.epoch}): stopped without saving; the last good checkpoint (if any) "
                f"{checkpoint_path(run_dir)} is intact. Lower optimizer.lr, or set "
                f"trainer.skip_nonfinite=true to skip such steps"
            )
        return value

    with StopRequest() as stop:
        try:
            for epoch in range(state.epoch, t.epochs):
                model.train()
                state.epoch = epoch
                t0 = time.perf_counter()
                start = state.batch
                for i, (x, y) in enumerate(data.train.epoch_batches(epoch, start), start=start):
                    if i >= steps_per_epoch:
                        break
                    loss_sum += step_fn(x, y).float()
                    state.loss_count += 1
                    state.step += 1
                    state.batch = i + 1
                    state.images += len(y)
                    if per_step:
                        scheduler.step()
                    if state.step % t.log_every == 0:
                        state.loss_sum = 0.0
                        record = {
                            "step": state.step,
                            "epoch": epoch + state.batch / steps_per_epoch,
                            "lr": [float(lr) for lr in scheduler.get_last_lr()],
                            "train_loss": read_loss_sum() / state.loss_count,  # the one sync
                        }
                        loss_sum.zero_()
                        state.loss_count = 0
                        now = time.perf_counter()
                        speed = (state.images - interval_start[1]) / max(now - interval_start[0], 1e-9)
                        interval_start = (now, state.images)
                        log.write(record, echo=True, images_per_second=speed)
                        bar and bar.set_postfix(loss=f"{record['train_loss']:.3f}", lr=f"{record['lr'][0]:.3g}")
                    bar and bar.update(1)
                    if distributed.any_rank(stop.signal is not None, dist, device):  # a step boundary
                        stop.signal = stop.signal or "SIGTERM"  # another rank was signalled
                        _sync(device)
                        state.train_seconds += time.perf_counter() - t0
                        state.loss_sum = read_loss_sum()
                        save(cfg, run_dir, model, optimizer, scheduler, state, dist)
                        print(f"{stop.signal}: checkpoint saved at step {state.step}; exiting", flush=True)
                        return stop.signal
                _sync(device)
                state.train_seconds += time.perf_counter() - t0
                state.batch = 0
                state.epoch = epoch + 1
                last = epoch + 1 == t.epochs
                if last or (epoch + 1) % t.eval_every == 0:
                    # under torchrun rank 0 evaluates the model without its DDP wrapper (a DDP
                    # forward on one rank alone would wait for the others); every rank gets the numbers
                    eval_net = model if dist.enabled else net
                    result = evaluate(eval_net, data.test, t, device, bf16, loss_fn) if dist.is_main else None
                    state.last_eval = distributed.broadcast(result, dist)
                    acc = state.last_eval["test_acc"]
                    state.best_acc = acc if state.best_acc is None else max(state.best_acc, acc)
                    log.write({"step": state.step, "epoch": epoch + 1, **state.last_eval}, echo=True)
                if not per_step:
                    metric = state.last_eval["test_loss"] if state.last_eval else None
                    scheduler.step(metric) if metric is not None and wants_metric else scheduler.step()
                state.finished = last
                if distributed.any_rank(stop.signal is not None, dist, device):
                    stop.signal = stop.signal or "SIGTERM"  # another rank was signalled
                if last or (epoch + 1) % t.checkpoint_every == 0 or stop.signal:
                    state.loss_sum = read_loss_sum()
                    save(cfg, run_dir, model, optimizer, scheduler, state, dist)
                if stop.signal:
                    print(f"{stop.signal}: checkpoint saved at step {state.step}; exiting", flush=True)
                    return stop.signal
        finally:
            log.close()
            bar and bar.close()
    return None


def train_step(net, optimizer, loss_fn, x, y, bf16: bool, skip_nonfinite: bool = False):
    """One optimizer step on batch (x, y); the detached loss, or None if it was NaN/inf and
    skip_nonfinite is set (that check is a host sync per step, hence opt-in).
    Also what `make bench` times (tests/bench_train.py)."""
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
    print(f"done: test accuracy {acc if acc is None else f'{acc:.4f}'}, results in {run_dir / 'results.json'}", flush=True)


_PROCESS_START = time.time()

if __name__ == "__main__":
    main()
