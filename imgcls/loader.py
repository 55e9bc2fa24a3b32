"""The device loader: a split as one uint8 tensor on the training device, batched,
augmented and normalised there with tensor ops (no per-image Python, no worker processes).

``Augment`` (imgcls/augment.py, the ``augment`` config group) holds a training split's
augmentation, ``BatchFormat`` what a batch looks like (mean/std, dtype, memory format); they are
built from the config in one place (``imgcls.build.load_data``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

from imgcls.augment import Augment


@dataclass(frozen=True)
class BatchFormat:
    """What a batch looks like: ``(pixel/255 - mean) / std`` per channel, as ``dtype``."""

    mean: Sequence[float]
    std: Sequence[float]
    channels_last: bool = False  # NHWC memory format (feeds CUDA tensor cores without transposes)
    dtype: torch.dtype = torch.float32


def _epoch_seed(*parts: int | str) -> int:
    """A 63-bit generator seed that is a pure function of ``parts`` (stable across runs)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _reflect(idx: torch.Tensor, n: int) -> torch.Tensor:
    """Reflect-pad index map (as ``F.pad(mode='reflect')``): -1 -> 1, n -> n-2. Needs |shift| < n."""
    idx = idx.abs()
    return torch.where(idx > n - 1, 2 * (n - 1) - idx, idx)


class DeviceLoader:
    """A whole split as one uint8 tensor on ``device``; yields normalised ``(x, y)`` batches.

    ``augment`` (a training split): each epoch is a permutation of all images (``len``
    batches; the last, short one dropped when ``augment.drop_last``), each image translated by
    (dx, dy) in ``[-crop_padding, crop_padding]`` px (a crop of the reflect-padded image) and,
    with ``flip``, mirrored left-right with p=0.5, and with ``cutout`` a square of that side
    around a random centre set to 0 after normalisation. All of an epoch's per-image random
    numbers are drawn on the CPU from a generator seeded by ``(seed, epoch)`` and moved to the
    device once; ``augment.mix`` (MixUp/CutMix) then runs on each batch under the global RNG
    seeded by ``(seed, epoch, batch)``. So batches are bit-identical for the same (seed, epoch,
    batch) whatever ran before, and a resumed run draws what an uninterrupted one drew.
    ``alternating_flip``: flips follow airbench's scheme instead: in epoch 2k a random half
    of the images (drawn from ``(seed, k)``) is flipped, in epoch 2k+1 exactly the others.
    ``augment=None`` (an evaluation split): all images in order, no augmentation; the last
    batch may be short. ``shard=(rank, world)`` (torchrun): ``batch_size`` is the global batch,
    drawn from the one per-epoch permutation, and rank r gets its images ``r::world``: N ranks
    together see the batches one process sees (so a resume with another N continues the same
    data order).

    x: ``fmt.dtype`` ``[B, C, H, W]``, ``(pixel/255 - mean) / std``, channels_last if asked.
    y: int64 ``[B]``, or float ``[B, num_classes]`` soft targets after MixUp/CutMix. On ``device``.
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        device: torch.device | str,
        fmt: BatchFormat,
        augment: Augment | None = None,
        shard: tuple[int, int] = (0, 1),
    ):
        # Checked once where the config enters (imgcls.config, imgcls.schedule); here: invariants.
        n, c, h, w = images.shape
        assert images.dtype == torch.uint8 and labels.dtype == torch.int64 and labels.shape == (n,), (
            "uint8 [N,C,H,W] + int64 [N]"
        )
        assert n > 0 and batch_size >= 1 and len(fmt.mean) == len(fmt.std) == c, (n, batch_size, fmt)
        assert augment is None or 0 <= augment.crop_padding < min(h, w), (
            "reflect padding needs crop_padding < image size"
        )
        assert augment is None or not augment.drop_last or batch_size <= n, "an epoch of no batches"
        assert augment is None or 0 <= augment.cutout <= max(h, w), "cutout side in [0, image size]"
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device).contiguous(), labels.to(self.device)
        self.n, self.c, self.h, self.w = n, c, h, w
        self.batch_size, self.fmt, self.augment = int(batch_size), fmt, augment
        self.train = augment is not None
        self.rank, self.world = shard  # torchrun: this rank takes images rank::world of each global batch
        # (u8/255 - mean)/std == u8 * scale + shift, in float32
        std_t, mean_t = torch.tensor(fmt.std, dtype=torch.float64), torch.tensor(fmt.mean, dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std_t)).float().view(1, c, 1, 1).to(self.device)
        self._shift = (-mean_t / std_t).float().view(1, c, 1, 1).to(self.device)
        self._ar_h, self._ar_w = torch.arange(h, device=self.device), torch.arange(w, device=self.device)

    def __len__(self) -> int:
        """Batches per epoch."""
        if self.train and self.augment.drop_last:
            return self.n // self.batch_size
        return -(-self.n // self.batch_size)

    def epoch_plan(self, epoch: int) -> dict[str, torch.Tensor]:
        """The epoch's random draws, on the CPU, indexed by image id (train only).

        ``perm`` [N] (batch order), ``dx``, ``dy`` [N] px shifts, ``flip`` [N] bool; with cutout,
        ``cy``, ``cx`` [N] the square's centre (drawn last, so the other draws do not change).
        """
        a = self.augment
        g = torch.Generator().manual_seed(_epoch_seed("epoch", a.seed, int(epoch)))
        perm = torch.randperm(self.n, generator=g)
        p = a.crop_padding
        dx = torch.randint(-p, p + 1, (self.n,), generator=g)
        dy = torch.randint(-p, p + 1, (self.n,), generator=g)
        flip_draw = torch.rand(self.n, generator=g) < 0.5  # always drawn: keeps streams aligned
        if not a.flip:
            flip = torch.zeros(self.n, dtype=torch.bool)
        elif a.alternating_flip:
            g2 = torch.Generator().manual_seed(_epoch_seed("altflip", a.seed, int(epoch) // 2))
            flip = torch.zeros(self.n, dtype=torch.bool)
            flip[torch.randperm(self.n, generator=g2)[: self.n // 2]] = True
            if epoch % 2 == 1:
                flip = ~flip
        else:
            flip = flip_draw
        plan = {"perm": perm, "dx": dx, "dy": dy, "flip": flip}
        if a.cutout:
            plan["cy"] = torch.randint(0, self.h, (self.n,), generator=g)
            plan["cx"] = torch.randint(0, self.w, (self.n,), generator=g)
        return plan

    def _normalise(self, xb: torch.Tensor) -> torch.Tensor:
        x = xb.to(torch.float32).mul_(self._scale).add_(self._shift).to(self.fmt.dtype)
        if self.fmt.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def epoch_batches(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches ``start_batch..len-1`` of ``epoch`` (identical to those of a full pass)."""
        nb = len(self)
        assert 0 <= start_batch <= nb, (start_batch, nb)  # the checkpoint's own counter
        return self._iter(int(epoch), int(start_batch), nb)

    def _iter(self, epoch: int, start: int, nb: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bs = self.batch_size
        if not self.train:
            for b in range(start, nb):
                sl = slice(b * bs, min((b + 1) * bs, self.n))
                yield self._normalise(self.images[sl]), self.labels[sl]
            return
        plan = {k: v.to(self.device, non_blocking=True) for k, v in self.epoch_plan(epoch).items()}
        perm = plan["perm"]
        for b in range(start, nb):
            idx = perm[b * bs : min((b + 1) * bs, self.n)][self.rank :: self.world]  # this rank's share
            x, y = self._augment(idx, plan), self.labels[idx]
            if self.augment.mix is not None:
                x, y = self._mix(x, y, epoch, b)
            yield x, y

    def _mix(self, x: torch.Tensor, y: torch.Tensor, epoch: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch transform under the global RNG seeded by (seed, epoch, batch), restored after
        (every rank draws the same, as one process drawing for the whole batch would)."""
        devices = [self.device] if self.device.type != "cpu" else []
        with torch.random.fork_rng(devices=devices, device_type=self.device.type):
            torch.manual_seed(_epoch_seed("batch", self.augment.seed, epoch, batch))
            return self.augment.mix(x, y)

    def _augment(self, idx: torch.Tensor, plan: dict[str, torch.Tensor]) -> torch.Tensor:
        """Crop (reflect-padded translation) + flip of images ``idx`` as two uint8 gathers, then cutout."""
        x = self.images[idx]  # [B, C, H, W] uint8
        bsz, c, h, w = x.shape
        # out[i, j] = img[reflect(i + dy), reflect(j' + dx)], j' = W-1-j when flipped else j
        rows = _reflect(self._ar_h.view(1, h) + plan["dy"][idx].view(-1, 1), h)
        cols = torch.where(plan["flip"][idx].view(-1, 1), (w - 1) - self._ar_w.view(1, w), self._ar_w.view(1, w))
        cols = _reflect(cols + plan["dx"][idx].view(-1, 1), w)
        x = x.gather(2, rows.view(bsz, 1, h, 1).expand(bsz, c, h, w))
        x = self._normalise(x.gather(3, cols.view(bsz, 1, 1, w).expand(bsz, c, h, w)))
        s = self.augment.cutout
        if s:  # rows/cols of each image's square: centre - s//2 .. centre - s//2 + s - 1, clipped
            top, left = plan["cy"][idx].view(-1, 1) - s // 2, plan["cx"][idx].view(-1, 1) - s // 2
            in_rows = (self._ar_h.view(1, h) >= top) & (self._ar_h.view(1, h) < top + s)
            in_cols = (self._ar_w.view(1, w) >= left) & (self._ar_w.view(1, w) < left + s)
            x = x.masked_fill(in_rows.view(bsz, 1, h, 1) & in_cols.view(bsz, 1, 1, w), 0.0)
        return x
