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

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from imgcls import distributed
from imgcls.config import check_filled_in, check_writable, preflight, setup, validate_config
from imgcls.device import device_switch, fused_argument, pick_device
from imgcls.exits import EXIT_JOB_FAILED, StopRequest, config_errors, exit_cleanly, interrupted
from imgcls.reporting import Reporter, TrainLoss, log_results
from imgcls.results import write_results
from imgcls.runlock import RunLock, hold, write_config

if TYPE_CHECKING:
    from imgcls.checkpoint import Extras, State
    from imgcls.distributed import Dist

setup()  # the resolvers and the config schema, before Hydra composes conf/


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
        sys.exit(interrupted())
    from imgcls import sweep

    if sweep.FAILED_JOBS:  # a multirun whose jobs all ran, some refused (each said why in one line)
        sys.exit(EXIT_JOB_FAILED)


@hydra.main(config_path=str(Path(__file__).resolve().parent / "conf"), config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """Returns the best validation accuracy (the test accuracy without a validation split): the
    objective of hparams_search sweeps."""
    run_dir = Path(hydra.core.hydra_config.HydraConfig.get().runtime.output_dir)
    with exit_cleanly(run_dir) as outcome, StopRequest() as stop:  # SIGTERM/SIGUSR2: imgcls.exits.SignalStop
        return recipe(cfg, run_dir, stop)
    return outcome.failed  # a refused job of a multirun (imgcls.exits.JobFailed): the next one runs


def recipe(cfg: DictConfig, run_dir: Path, stop: StopRequest | None = None) -> float | None:
    from imgcls.checkpoint import resume

    composed = OmegaConf.to_yaml(cfg)  # as Hydra composed it: .hydra/config.yaml, once accepted
    check_filled_in(cfg)  # 1. config (fails before any work): schedule.steps_per_epoch is ours
    validate_config(cfg)
    check_writable(run_dir)  #    the run directory
    device = pick_device(cfg.trainer.device)  #    the device
    dist, device, run_dir = distributed.join_ranks(device, run_dir)  #    torchrun: one process per device
    with hold(run_dir, dist.is_main) as lock:  #    one process per run directory, for the run's life
        seed_everything(cfg.trainer.seed, cfg.trainer.deterministic, device)  # 2. seed
        data = load_data(cfg, device, dist)  # 3. data (fills schedule.steps_per_epoch)
        model = build_model(cfg, data.num_classes, device, data.info["size"])  # 4. model
        optimizer = build_optimizer(cfg, model, device)  # 5. optimizer
        scheduler = build_scheduler(cfg, optimizer)  # 6. scheduler
        extras = build_extras(cfg, model, device, data)  #    grad scaler, averaged weights, data info
        run = Run(cfg, run_dir, device, dist, data, model, optimizer, scheduler, extras, lock)
        run.state = resume(run)  # 7. resume
        write_config(run, composed)  #    accepted: config.yaml and .hydra/ (not before)
        if run.state.epoch >= cfg.trainer.epochs or run.state.stopped_early is not None:
            print(f"run in {run_dir} already finished at step {run.state.step}: nothing to do")
            if not (run_dir / "results.json").exists():  # its writing failed (a full disk): once more
                write_results(run)
            return run.state.best_acc
        stop = stop or StopRequest()
        if train(run, stop) or stop.signal:  # 8. loop; a stop signal: checkpoint saved, then SignalStop
            raise stop.stopped(run.state.step)
        write_results(run)  # 9. save (and the test split)
        log_results(run)  #    logger=mlflow: results.json, checkpoint
        distributed.shutdown(dist)
        return run.state.best_acc


@dataclass
class Run:
    """A run's parts, built by the recipe in this order and passed as one: the loop, the
    checkpoint (imgcls.checkpoint.save/resume), results.json (imgcls.results) and the reports
    (imgcls.reporting) read what they need from it."""

    cfg: DictConfig
    run_dir: Path
    device: object  # torch.device
    dist: Dist
    data: Data
    model: object  # torch.nn.Module
    optimizer: object
    scheduler: object
    extras: Extras
    lock: RunLock | None = None  # rank 0's lock on run_dir (imgcls.runlock.hold)
    state: State | None = None  # the counters, from resume()


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

    def __init__(self, train, val, test, steps_per_epoch: int, info: dict):
        self.train, self.val, self.test = train, val, test
        self.num_classes, self.steps_per_epoch = len(info["classes"]), steps_per_epoch
        self.info = info

    @property
    def eval_split(self) -> str:
        """The split evaluated during training: val, or test when there is no validation split."""
        return "val" if self.val is not None else "test"


def load_data(cfg: DictConfig, device, dist) -> Data:
    import torch

    from imgcls.data import describe, load_configured
    from imgcls.loader import Augment, BatchFormat, DeviceLoader
    from imgcls.schedule import batches_per_epoch
    from imgcls.splits import balanced_order, val_indices

    d, t = cfg.data, cfg.trainer
    ds = load_configured(d)
    keep, held = val_indices(ds.train_labels, d.get("val_size", 0))  # stratified, from a fixed seed
    train_images, train_labels = ds.train_images[keep], ds.train_labels[keep]
    steps = batches_per_epoch(len(train_labels), t.batch_size, t.limit_train_batches)  # refuses a batch > the data
    if t.batch_size % (dist.world * t.accumulate_grad_batches):
        raise ValueError(
            f"trainer.batch_size: {t.batch_size} is not divisible by the {dist.world} rank(s) x "
            f"trainer.accumulate_grad_batches={t.accumulate_grad_batches} (equal micro-batches on every rank)"
        )
    side = min(ds.train_images.shape[-2:])
    if d.crop_padding >= side:
        raise ValueError(
            f"data.crop_padding: {d.crop_padding} is not accepted for {side}-px images; expected an int in "
            f"[0, {side - 1}] (the reflect padding must be smaller than the image)"
        )
    channels_last = device_switch(t.channels_last, device)  # NHWC feeds the tensor cores without transposes
    fmt = BatchFormat(ds.mean, ds.std, channels_last, torch.float32)
    augment = Augment(t.seed, d.crop_padding, d.flip, d.alternating_flip)
    # batch_size is global: under torchrun rank r takes images r::N of each batch
    train = DeviceLoader(train_images, train_labels, t.batch_size, device, fmt, augment, shard=(dist.rank, dist.world))

    def eval_loader(images, labels):
        if t.limit_eval_batches:  # a fixed, class-balanced subset (an image folder is sorted by class)
            pick = balanced_order(labels)[: t.limit_eval_batches * t.eval_batch_size]
            images, labels = images[pick], labels[pick]
        return DeviceLoader(images, labels, t.eval_batch_size, device, fmt)  # in order, no augmentation

    val = eval_loader(ds.train_images[held], ds.train_labels[held]) if len(held) else None
    test = eval_loader(ds.test_images, ds.test_labels)
    with open_dict(cfg):
        cfg.schedule.steps_per_epoch = steps
        cfg.data.num_classes = len(ds.classes)  # the model's output size (evaluate reads it)
    description = describe(ds, val=len(held))
    if dist.is_main:
        ranks = f" x {dist.world} ranks" if dist.enabled else ""
        print(description, f"| {steps} steps per epoch on {device}{ranks}", flush=True)
    info = {"classes": list(ds.classes), "mean": list(ds.mean), "std": list(ds.std)}
    info["size"] = list(ds.train_images.shape[1:])  # (C, H, W)
    return Data(train, val, test, steps, info)


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
    from imgcls.schedule import check_schedule_fits

    with config_errors("scheduler"):
        scheduler = hydra.utils.instantiate(cfg.scheduler, _convert_="all")(optimizer)
    check_schedule_fits(scheduler, cfg)
    return scheduler


def build_extras(cfg: DictConfig, model, device, data: Data) -> Extras:
    """What a checkpoint holds besides the model, optimizer, scheduler and counters (Extras)."""
    from imgcls.averaging import Averaging
    from imgcls.checkpoint import Extras
    from imgcls.precision import make_scaler, resolve_precision

    t = cfg.trainer
    precision = resolve_precision(t.precision, device)
    averaging = Averaging(model, t.epochs, t.ema_decay, t.swa_start)
    return Extras(precision, make_scaler(device, precision), averaging, data.info)


# --------------------------------------------------------------------------------------
# 7. resume: imgcls/checkpoint.py (what a checkpoint holds: State, Extras; resume, save)
# 8. loop
# --------------------------------------------------------------------------------------
def train(run: Run, stop: StopRequest) -> str | None:
    """The loop. Returns the name of the signal that stopped it, or None when it finished."""
    from imgcls.checkpoint import checkpoint_due

    loop, state = Loop(run), run.state
    with stop.loop(), Reporter(loop) as report:
        for epoch in range(state.epoch, run.cfg.trainer.epochs):
            stopped = run_epoch(loop, report, epoch, stop)  # True: stopped at a step boundary
            if not stopped:
                end_epoch(loop, report, epoch)
                stopped = stop.requested(loop, epoch_end=True)
            due = stopped or checkpoint_due(run.cfg.trainer, state)
            if due or loop.improved:  # best.pt: the best validation accuracy so far
                loop.checkpoint(last=due, best=loop.improved)
            if stopped:
                print(f"{stop.signal}: checkpoint saved at step {state.step}; exiting", flush=True)
                return stop.signal
            if state.finished:  # the last epoch, or stopped early (trainer.early_stop_patience)
                break
    return None


class Loop:
    """What the loop works with, built once from the run's parts: the wrapped net (DDP,
    torch.compile), precision, the loss, when the scheduler steps, and the training loss summed
    on the device."""

    def __init__(self, run: Run):
        import torch

        from imgcls.loss import training_loss
        from imgcls.schedule import SchedulerStepper
        from imgcls.step import StepSettings

        self.run, self.cfg, self.t, self.run_dir, self.data = run, run.cfg, run.cfg.trainer, run.run_dir, run.data
        self.model, self.optimizer, self.scheduler, self.state = run.model, run.optimizer, run.scheduler, run.state
        self.device, self.dist, self.extras = run.device, run.dist, run.extras
        self.stepper = SchedulerStepper(run.scheduler, run.optimizer, run.cfg.schedule.interval)
        self.precision, self.averaging = run.extras.precision, run.extras.averaging  # fp32 | bf16 | fp16; EMA/SWA
        self.split = run.data.eval_split  # val, or test when data.val_size is 0
        # "best": the EMA weights' accuracy when EMA is on (they are the weights reported), else the raw ones'
        self.monitor = f"ema_{self.split}_acc" if self.averaging.ema is not None else f"{self.split}_acc"
        self.improved = False  # the epoch's evaluation beat the best so far (best.pt is due)
        t = self.t
        self.loss_fn = training_loss(t)  # imgcls/loss.py: the one loss definition
        self.settings = StepSettings(
            self.precision, run.extras.scaler, t.grad_clip_norm, t.skip_nonfinite, t.accumulate_grad_batches
        )
        self.net = distributed.wrap(run.model, self.dist, self.device)  # DDP under torchrun
        self.net = torch.compile(self.net) if self.t.compile else self.net
        self.loss = TrainLoss(self.state, self.dist, self.device, self.run_dir)  # summed on the device

    def step(self, x, y) -> None:
        """One optimizer step, its counters, and the scheduler step due after it."""
        import torch

        from imgcls.step import train_step

        loss = train_step(self.net, self.optimizer, self.loss_fn, x, y, self.settings)
        if loss is None:
            self.state.skipped_steps += 1
            loss = torch.zeros((), device=self.device)
        else:
            self.averaging.after_step(self.model)
        self.loss.add(loss)
        self.state.step += 1
        self.state.batch += 1
        self.state.images += len(y)
        self.stepper.after_step()

    def evaluate(self, finishing: bool = False) -> dict:
        """The evaluated split (val, else test) with the raw weights, and with the EMA weights
        (and the SWA weights when finishing) when on: keys val_acc, ema_val_acc, swa_val_acc...
        Under torchrun rank 0 evaluates the model without its DDP wrapper (a DDP forward on
        one rank alone would wait for the others); every rank gets the numbers."""
        from imgcls.evaluate import evaluate_split

        net = self.model if self.dist.enabled else self.net
        loader = self.data.val if self.data.val is not None else self.data.test
        result = None
        if self.dist.is_main:
            result = evaluate_split(net, loader, self.t, self.device, self.precision, prefix=self.split)
            for name in ("ema", "swa") if finishing else ("ema",):
                averaged = getattr(self.averaging, name)
                if averaged is not None:
                    prefix = f"{name}_{self.split}"
                    result.update(evaluate_split(averaged, loader, self.t, self.device, self.precision, prefix))
        return distributed.broadcast(result, self.dist)

    def checkpoint(self, last: bool = True, best: bool = False) -> None:
        """Save at a step boundary (last.pt, and best.pt when asked); the partial training-loss
        sum goes with it."""
        from imgcls.checkpoint import save

        self.state.loss_sum = self.loss.read()
        save(self.run, last=last, best=best)
        self.improved = False


def run_epoch(loop: Loop, report, epoch: int, stop) -> bool:
    """Train epoch ``epoch`` from batch ``state.batch``; True if a stop request ended it early."""
    import torch

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
        if loop.device.type == "cuda":  # the epoch's time includes its queued GPU work
            torch.cuda.synchronize()
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
        if early_stop(state, t, acc) and not last:
            state.stopped_early = epoch + 1
    loop.stepper.after_epoch(state.last_eval[f"{loop.split}_loss"] if state.last_eval else None)
    report.flush(loop)  # the epoch's last train line: its lr is the one after this epoch's step
    if evaluated:
        report.evaluation(loop, epoch + 1)  # metrics.jsonl (and curves.png with trainer.plot_curves)
    state.finished = last or state.stopped_early is not None
    if state.stopped_early is not None:
        print(f"early stop: no gain above {t.early_stop_min_delta} in {t.early_stop_patience} evaluations", flush=True)


def early_stop(state, t, acc: float) -> bool:
    """trainer.early_stop_patience: True once that many evaluations in a row have not beaten
    the best by more than early_stop_min_delta (Lightning's EarlyStopping); the counter is in
    the checkpoint's State, so a resumed run keeps it."""
    if t.early_stop_patience is None:
        return False
    if state.early_stop_best is None or acc > state.early_stop_best + t.early_stop_min_delta:
        state.early_stop_best, state.early_stop_wait = acc, 0
        return False
    state.early_stop_wait += 1
    return state.early_stop_wait >= t.early_stop_patience


if __name__ == "__main__":
    cli()
