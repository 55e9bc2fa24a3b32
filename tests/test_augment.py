"""Augmentation (imgcls/augment.py, conf/augment/): cutout in the device loader, MixUp/CutMix as
a batch transform seeded by (seed, epoch, batch), soft targets through the one loss, and (slow)
a stopped and resumed run equal to an uninterrupted one with each option on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from imgcls.augment import Augment, mix
from imgcls.loader import BatchFormat, DeviceLoader
from imgcls.loss import classification_loss
from tests.conftest import assert_same_weights, metrics, run_recipe, run_recipe_until_sigterm, weights

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


def _data(n: int, classes: int, h: int = 8, w: int = 10):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (n, 3, h, w), dtype=torch.uint8, generator=g)  # no pixel is 0
    return x, torch.arange(n) % classes  # classes=n: the label is the image's id


def _loader(augment: Augment, n: int = 48, batch: int = 16, classes: int = 4) -> DeviceLoader:
    x, y = _data(n, classes)
    return DeviceLoader(x, y, batch, "cpu", BatchFormat(MEAN, STD), augment)


def _epoch(loader: DeviceLoader, epoch: int, start: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader.epoch_batches(epoch, start)]


def test_cutout_sets_a_clipped_square_per_image_to_the_mean_and_keeps_the_other_draws():
    s = 4
    plain = _loader(Augment(seed=3, crop_padding=2, cutout=0), classes=48)
    cut = _loader(Augment(seed=3, crop_padding=2, cutout=s), classes=48)
    p0, p1 = plain.epoch_plan(1), cut.epoch_plan(1)
    for key in ("perm", "dx", "dy", "flip"):  # cutout's draws come last: the rest is unchanged
        assert torch.equal(p0[key], p1[key]), key
    for (xa, ya), (xb, yb) in zip(_epoch(plain, 1), _epoch(cut, 1)):
        assert torch.equal(ya, yb)
        for i, k in enumerate(ya.tolist()):
            cy, cx = int(p1["cy"][k]), int(p1["cx"][k])
            hole = torch.zeros(8, 10, dtype=torch.bool)
            hole[max(cy - s // 2, 0) : cy - s // 2 + s, max(cx - s // 2, 0) : cx - s // 2 + s] = True
            assert torch.all(xb[i][:, hole] == 0)  # 0 after normalisation: the channel mean
            assert torch.equal(xb[i][:, ~hole], xa[i][:, ~hole])  # the rest is the crop/flip of before
    assert int(p1["cy"].min()) == 0 and int(p1["cx"].max()) == 9  # centres anywhere, squares clipped


@pytest.mark.parametrize("alphas", [(0.2, 0.0), (0.0, 1.0), (0.2, 1.0)], ids=["mixup", "cutmix", "mixup_cutmix"])
def test_batch_transform_is_a_function_of_seed_epoch_and_batch_and_leaves_the_global_rng(alphas):
    mixup_alpha, cutmix_alpha = alphas

    def loader(seed=0):
        batch = lambda num_classes: mix(num_classes, mixup_alpha, cutmix_alpha)  # noqa: E731
        return _loader(Augment(seed=seed, batch=batch, num_classes=4))

    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    first = _epoch(loader(), 2)
    assert torch.equal(torch.rand(3), expected_next)  # the global RNG (dropout's) is as it was
    torch.manual_seed(999)  # another global state: the batches do not depend on it
    again = _epoch(loader(), 2)
    resumed = _epoch(loader(), 2, start=1)  # a resume mid-epoch draws the same batches 1, 2
    for (xa, ya), (xb, yb) in zip(first, again):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for (xa, ya), (xb, yb) in zip(first[1:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for _, y in first:
        assert y.shape == (16, 4) and y.dtype == torch.float32
        torch.testing.assert_close(y.sum(1), torch.ones(16))
        assert (y.max(1).values < 1).any()  # mixed targets, not one-hot
    other_seed = _epoch(loader(seed=1), 2)
    assert not all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(first, other_seed))
    other_batch = [y for _, y in first]
    assert not torch.equal(other_batch[0], other_batch[1])  # each batch draws its own lam


def test_a_forks_own_batch_transform_draws_per_seed_epoch_and_batch():
    """A transform that draws from torch's global RNG (as a fork's own would) gets one stream per
    (seed, epoch, batch): batches differ from each other, and are the same on a second pass."""

    def noise(num_classes):
        return lambda x, y: (x + torch.rand(()), y)  # one draw per batch, added to every pixel

    def drawn(seed, epoch):
        plain, noisy = _loader(Augment(seed=seed)), _loader(Augment(seed=seed, batch=noise, num_classes=4))
        return [float((b - a).mean()) for (a, _), (b, _) in zip(_epoch(plain, epoch), _epoch(noisy, epoch))]

    first = drawn(0, 1)
    assert len(set(first)) == 3  # three batches, three draws
    assert drawn(0, 1) == first
    assert drawn(0, 2) != first and drawn(1, 1) != first


def test_mix_refuses_alphas_in_one_line():
    for kwargs, says in (
        ({"mixup_alpha": -1}, "augment.batch.mixup_alpha: -1 is not accepted"),
        ({"cutmix_alpha": float("inf")}, "augment.batch.cutmix_alpha: inf is not accepted"),
        ({"mixup_alpha": True}, "augment.batch.mixup_alpha: True is not accepted"),
        ({}, "augment.batch: mixup_alpha=0.0 and cutmix_alpha=0.0 is not accepted"),
    ):
        with pytest.raises(ValueError, match=says.replace(".", r"\.")):
            mix(10, **kwargs)


def test_soft_targets_take_the_label_smoothing_once():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(6, 5, generator=g), torch.tensor([0, 1, 2, 3, 4, 0])
    onehot = F.one_hot(y, 5).float()
    for eps in (0.0, 0.1):
        torch.testing.assert_close(classification_loss(logits, onehot, eps), classification_loss(logits, y, eps))
    soft = 0.7 * onehot + 0.3 * onehot.roll(1, 0)  # a MixUp target
    smoothed = 0.9 * soft + 0.1 / 5
    expected = -(smoothed * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(classification_loss(logits, soft, 0.1), expected)


@pytest.mark.slow
# cutout: the per-image draws of the epoch plan; mixup_cutmix: the batch transform (mixup and
# cutmix alone take the same path, seeded by (seed, epoch, batch), with one transform fewer)
@pytest.mark.parametrize("option", ["cutout", "mixup_cutmix"])
def test_a_run_stopped_and_resumed_with_per_image_or_batch_augmentation_equals_an_uninterrupted_one(tmp_path, option):
    overrides = ["experiment=smoke", f"augment={option}"]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    run_recipe(whole, *overrides)  # in process (a second, not five): bit-identical to a subprocess
    stopped = run_recipe_until_sigterm(parts, overrides, after_lines=3)  # a real SIGTERM, mid-epoch 1
    assert stopped.returncode == 143, stopped.stdout[-2000:]
    run_recipe(parts, *overrides)
    assert metrics(parts) == metrics(whole)
    assert_same_weights(weights(parts), weights(whole))
