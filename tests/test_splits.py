"""imgcls.splits: the stratified validation hold-out and the class-balanced evaluation order."""

from __future__ import annotations

import pytest
import torch

from imgcls.splits import balanced_order, val_count, val_indices


def labels(counts):
    return torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])


def test_val_split_is_stratified_exact_disjoint_and_fixed():
    y = labels([100, 50, 30])
    train, val = val_indices(y, 18)
    assert len(val) == 18 and len(train) == 162
    assert set(train.tolist()).isdisjoint(val.tolist()) and len(set(train.tolist()) | set(val.tolist())) == 180
    assert torch.bincount(y[val]).tolist() == [10, 5, 3]  # the same share of every class
    again_train, again_val = val_indices(y, 18)
    assert torch.equal(val, again_val) and torch.equal(train, again_train)  # a fixed seed
    assert not torch.equal(val, val_indices(y, 18, seed=1)[1])


def test_val_split_fraction_and_off():
    y = labels([60, 40])
    assert len(val_indices(y, 0.1)[1]) == 10
    assert torch.bincount(y[val_indices(y, 0.1)[1]]).tolist() == [6, 4]
    train, val = val_indices(y, 0)
    assert len(val) == 0 and torch.equal(train, torch.arange(100))
    assert val_count(None, 100) == 0


@pytest.mark.parametrize("bad", [-1, 100, 1.0, 1.5, "10", True, [1]])
def test_val_size_refused_names_the_key(bad):
    with pytest.raises(ValueError, match=r"data\.val_size"):
        val_indices(labels([60, 40]), bad)


def test_balanced_order_every_prefix_is_balanced():
    y = labels([7, 7, 7, 7])  # sorted by class, as an image folder is
    order = balanced_order(y)
    assert sorted(order.tolist()) == list(range(28))
    for n in (4, 8, 12, 28):
        assert torch.bincount(y[order[:n]], minlength=4).tolist() == [n // 4] * 4
    assert torch.equal(order, balanced_order(y))
    # unequal classes: the small class runs out first, the prefix stays as balanced as it can
    y2 = labels([5, 1])
    assert torch.bincount(y2[balanced_order(y2)[:2]]).tolist() == [1, 1]


def test_a_run_holds_out_the_same_split_whatever_trainer_seed():
    """The validation split a run holds out (train.py's data) is drawn from the split's own fixed
    seed, VAL_SEED: the same images for every trainer.seed (here the data itself is fixed)."""
    from imgcls.data import load_configured
    from imgcls.splits import VAL_SEED
    from tests.conftest import build_recipe

    fixed = ["experiment=smoke", "data.dataset.train_size=200", "data.dataset.test_size=20", "data.dataset.seed=0"]
    cfg = build_recipe(*fixed, "data.val_size=40", "trainer.seed=0")[0]
    ds = load_configured(cfg.data)
    keep, held = val_indices(ds.train_labels, 40, seed=VAL_SEED)
    assert not torch.equal(held, val_indices(ds.train_labels, 40, seed=1)[1])  # a seed would show
    for seed in (1, 2):
        data = build_recipe(*fixed, "data.val_size=40", f"trainer.seed={seed}")[2]
        assert torch.equal(data.val.images, ds.train_images[held]) and torch.equal(
            data.val.labels, ds.train_labels[held]
        )
        assert torch.equal(data.train.images, ds.train_images[keep])
