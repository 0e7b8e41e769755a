"""Seeded, stratified subsets and train/validation splits over original dataset indices."""

from __future__ import annotations

import torch
from torch import Tensor

from distill.data.sources import DataError

__all__ = ["split_indices", "stratified_subset"]


def _quotas(counts: Tensor, k: int) -> Tensor:
    """Per-class sizes summing to ``k``, proportional to ``counts`` (largest remainder)."""
    exact = counts.double() * k / counts.sum()
    quota = exact.floor().long()
    rest = k - int(quota.sum())
    if rest > 0:
        order = torch.argsort(exact - quota.double(), descending=True, stable=True)
        quota[order[:rest]] += 1
    return quota


def stratified_subset(labels: Tensor, pool: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` indices drawn from ``pool`` (original indices) keeping class proportions; sorted."""
    if not 0 <= k <= len(pool):
        raise DataError(f"cannot draw {k} samples from a pool of {len(pool)}")
    pool_labels = labels[pool]
    classes = torch.unique(pool_labels)
    counts = torch.stack([(pool_labels == c).sum() for c in classes])
    chosen = []
    for c, q in zip(classes.tolist(), _quotas(counts, k).tolist(), strict=True):
        members = pool[pool_labels == c]
        chosen.append(members[torch.randperm(len(members), generator=generator)[:q]])
    return torch.sort(torch.cat(chosen)).values


def split_indices(
    labels: Tensor, train_subset: int | None, val_size: int, seed: int
) -> tuple[Tensor, Tensor]:
    """(train, val) original indices: an optional stratified subset, then a stratified val split.

    ``train_subset=None`` uses the whole training set; ``val_size=0`` gives an empty val split.
    The same ``seed`` always gives the same split; the two parts are disjoint and sorted.
    """
    n = len(labels)
    if train_subset is not None and not 0 < train_subset <= n:
        raise DataError(f"data.train_subset must be in 1..{n} (or null), got {train_subset}")
    g = torch.Generator().manual_seed(seed)
    pool = torch.arange(n)
    if train_subset is not None and train_subset < n:
        pool = stratified_subset(labels, pool, train_subset, g)
    if not 0 <= val_size < len(pool):
        raise DataError(
            f"data.val_size must be in 0..{len(pool) - 1} for {len(pool)} training images, "
            f"got {val_size}"
        )
    if val_size == 0:
        return pool, pool[:0]
    val = stratified_subset(labels, pool, val_size, g)
    keep = torch.ones(n, dtype=torch.bool)
    keep[val] = False
    return pool[keep[pool]], val
