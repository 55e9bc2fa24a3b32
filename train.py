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
from omegaconf import DictConfig, OmegaConf

from imgcls import distributed
from imgcls.build import Data, build_model, build_optimizer, build_scheduler, load_data, seed_everything
from imgcls.config import check_filled_in, check_writable, preflight, setup, validate_config
from imgcls.device import pick_device
from imgcls.exits import EXIT_JOB_FAILED, StopRequest, exit_cleanly, interrupted
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
# 2. seed, 3. data, 4. model, 5. optimizer, 6. scheduler: imgcls/build.py
# --------------------------------------------------------------------------------------
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
