"""What the config builds, in the recipe's order: the seed, the data, the model, the optimizer
and the scheduler (train.py's steps 2-6; the lr finder, imgcls/lr_find.py, builds the same).

A start-up module (train.py imports it): torch is imported inside the functions.
"""

from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, OmegaConf, open_dict

from imgcls.device import device_switch, fused_argument
from imgcls.exits import config_errors


# --------------------------------------------------------------------------------------
# seed
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
# data
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
    from imgcls.loader import BatchFormat, DeviceLoader
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
    side, a = min(ds.train_images.shape[-2:]), cfg.augment
    for key, value, top in (("crop_padding", a.crop_padding, side - 1), ("cutout", a.cutout, side)):
        if value > top:
            raise ValueError(
                f"augment.{key}: {value} is not accepted for {side}-px images; expected an int in [0, {top}]"
            )
    channels_last = device_switch(t.channels_last, device)  # NHWC feeds the tensor cores without transposes
    fmt = BatchFormat(ds.mean, ds.std, channels_last, torch.float32)
    with config_errors("augment"):  # a bad augment.batch value is refused here, before any step
        augment = hydra.utils.instantiate(cfg.augment, seed=t.seed, num_classes=len(ds.classes))
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
# model, optimizer, scheduler
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
