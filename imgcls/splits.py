"""Fixed, stratified subsets of a labelled split: the validation split and balanced evaluation.

Both are pure functions of the labels and a seed (a CPU ``torch.Generator``), so every run and
every resume of a config sees the same images, whatever ran before.

* ``val_indices`` holds ``data.val_size`` images out of the training split, the same share of
  every class (largest-remainder rounding, so the total is exact).
* ``balanced_order`` orders a split so that every prefix is class-balanced (one image of every
  class, then a second of every class, ...): ``trainer.limit_eval_batches`` takes a prefix, so a
  limited evaluation of an image folder (sorted by class) no longer sees only its first classes.
"""

from __future__ import annotations

import torch

VAL_SEED = 0  # the split's own seed: fixed, so trainer.seed changes the run but not the split


def val_count(val_size, n: int, key: str = "data.val_size") -> int:
    """Images to hold out of ``n``: ``val_size`` images (an int) or that fraction of ``n`` (a float
    in (0, 1)); 0 or null: none. ValueError naming ``key`` for anything else."""
    if val_size is None or (not isinstance(val_size, bool) and val_size == 0):
        return 0
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)):
        raise ValueError(
            f"{key}: {val_size!r} is not accepted; expected a number of images (an int >= 0) "
            f"or a fraction of the training split (a float in (0, 1))"
        )
    if isinstance(val_size, float):
        if not 0.0 < val_size < 1.0:
            raise ValueError(
                f"{key}: {val_size!r} is not accepted; a fraction must be in (0, 1) "
                f"(or give a number of images as an int)"
            )
        count = round(val_size * n)
    else:
        count = val_size
    if count < 0 or count >= n:
        raise ValueError(
            f"{key}: {val_size!r} holds out {count} of the {n} training images; expected "
            f"at least 1 and fewer than {n} (0 turns the validation split off)"
        )
    return max(1, int(count))


def _per_class_quota(counts: torch.Tensor, total: int) -> torch.Tensor:
    """Split ``total`` over classes in proportion to ``counts`` (largest remainder, exact sum)."""
    n = int(counts.sum())
    exact = counts.double() * total / n
    quota = exact.floor().long()
    remainder = total - int(quota.sum())
    if remainder:
        # ties broken by class index (stable sort), so the result is deterministic
        order = torch.sort(exact - quota.double(), descending=True, stable=True).indices
        quota[order[:remainder]] += 1
    return torch.minimum(quota, counts)


def val_indices(labels: torch.Tensor, val_size, seed: int = VAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, val) index tensors (sorted, int64) of a stratified hold-out of ``labels``.

    ``val_size``: see ``val_count``. With 0 the train indices are all images and val is empty.
    """
    n = labels.shape[0]
    count = val_count(val_size, n)
    if count == 0:
        return torch.arange(n), torch.zeros(0, dtype=torch.int64)
    num_classes = int(labels.max()) + 1
    counts = torch.bincount(labels, minlength=num_classes)
    quota = _per_class_quota(counts, count)
    g = torch.Generator().manual_seed(int(seed))
    held = torch.zeros(n, dtype=torch.bool)
    for c in range(num_classes):
        members = (labels == c).nonzero().flatten()
        pick = members[torch.randperm(len(members), generator=g)[: int(quota[c])]]
        held[pick] = True
    return (~held).nonzero().flatten(), held.nonzero().flatten()


def balanced_order(labels: torch.Tensor, seed: int = VAL_SEED) -> torch.Tensor:
    """A permutation of ``range(len(labels))`` whose every prefix is as class-balanced as the
    classes allow: rank k of every class (in a seeded random order within the class) comes
    before rank k+1 of any class; within one rank, classes in index order."""
    n = labels.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    shuffled = torch.randperm(n, generator=g)
    lab = labels[shuffled]
    # rank of each image within its class, in the shuffled order
    by_class = torch.sort(lab, stable=True).indices
    sorted_lab = lab[by_class]
    starts = torch.searchsorted(sorted_lab, sorted_lab, side="left")
    rank = torch.empty(n, dtype=torch.int64)
    rank[by_class] = torch.arange(n) - starts
    key = rank * (int(labels.max()) + 1) + lab
    return shuffled[torch.sort(key, stable=True).indices]
