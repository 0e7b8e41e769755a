"""Image-classification LightningDataModule (any dataset of :mod:`distill.data.datasets`;
CIFAR-10 by default) with tensor-resident data and batched on-device augmentation.

Images are decoded once into uint8 tensors and kept resident (on the training device when
``device="auto"``). Loaders yield batches of *indices*; the batch is gathered from the resident
tensors, moved to the device, and augmented/normalized as a whole in ``on_after_batch_transfer``.

Every batch is a dict (see docs/CONTRACTS.md)::

    {"image": float (B,3,H,W) normalized (augmented when training), "label": long (B,),
     "index": long (B,) index into the full training (or test) set, "aug": AugParams | None}

Shuffling and augmentation are deterministic functions of ``(seed, epoch, batch number, rank)``,
and the training loader (:class:`ResumableLoader`) records the data position in every checkpoint,
so a seeded run resumed from any checkpoint, also one written mid-epoch, sees the same batches as
an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from distill.data.augment import AugParams, normalize_images
from distill.data.datasets import DatasetSpec, get_dataset
from distill.data.sources import (
    CIFARArrays,
    DataError,
    load_folder,
    load_torchvision,
    make_synthetic,
)
from distill.data.splits import split_indices

__all__ = ["CIFAR10DataModule", "IndexBatchSampler", "ResidentDataset", "ResumableLoader"]

SOURCES = ("torchvision", "folder", "synthetic")
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant for seed mixing


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived deterministically from integers."""
    h = 0
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * _MIX + 0x632BE5AB) & 0xFFFFFFFFFFFFFFFF
    return h >> 1


class IndexBatchSampler:
    """Yields ``(indices, aug_seed | None)`` per batch over a fixed set of original indices.

    Shuffles with a generator seeded from ``(seed, epoch)`` (``set_epoch`` is called by Lightning)
    and shards by rank for multi-process training: with shuffling (training) each rank gets
    ``len // world_size`` samples; without (evaluation) every sample is seen by exactly one rank.
    """

    def __init__(
        self,
        indices: Tensor,
        batch_size: int,
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        augment: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.indices = indices.cpu().long()
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.drop_last, self.augment = drop_last, augment
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.skip = 0  # batches of the next iteration to leave out (resume inside an epoch)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _num_samples(self) -> int:
        n, w = len(self.indices), self.world_size
        if w == 1:
            return n
        # training: equal shards (drop the remainder); evaluation: every sample exactly once
        return n // w if self.shuffle else len(range(self.rank, n, w))

    def __len__(self) -> int:
        n = self._num_samples()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def epoch_order(self) -> Tensor:
        """This rank's original indices in this epoch's order."""
        idx = self.indices
        if self.shuffle:
            g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
            idx = idx[torch.randperm(len(idx), generator=g)]
        if self.world_size > 1:
            idx = idx[self.rank :: self.world_size][: self._num_samples()]
        return idx

    def __iter__(self) -> Iterator[tuple[Tensor, int | None]]:
        """Batches ``skip, ..., len - 1`` of this epoch (``skip`` is reset: used once)."""
        order = self.epoch_order()
        start, self.skip = self.skip, 0
        for b in range(start, len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            aug_seed = mix_seed(self.seed, self.epoch, b, self.rank, 1) if self.augment else None
            yield batch, aug_seed


class ResumableLoader:
    """The training loader, resumable by Lightning mid-epoch at the exact batch.

    Lightning stores :meth:`state_dict` in every checkpoint and, when it restarts inside an epoch,
    calls :meth:`load_state_dict` before iterating; the next iteration then runs the saved epoch's
    order from the first batch not yet trained on (the sampler's batch ``b`` of epoch ``e``
    depends only on ``(seed, e, b)``, so the skipped batches are never gathered).
    """

    def __init__(self, loader: DataLoader, trainer: pl.Trainer) -> None:
        self.loader, self.trainer = loader, trainer
        self.sampler: IndexBatchSampler = loader.sampler  # Lightning calls sampler.set_epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def state_dict(self) -> dict[str, int]:
        """Epoch and number of batches of it whose optimizer step is done."""
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": int(self.sampler.epoch), "batches": int(done)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.sampler.set_epoch(int(state["epoch"]))
        self.sampler.skip = int(state["batches"])


class ResidentDataset(Dataset):
    """Gathers batches from resident uint8 images: ``dataset[(indices, aug_seed)] -> batch``."""

    def __init__(self, images: Tensor, labels: Tensor, pad: int = 4) -> None:
        self.images, self.labels, self.pad = images, labels, pad

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, request: tuple[Tensor, int | None]) -> dict[str, Any]:
        indices, aug_seed = request
        idx = indices.to(self.images.device)
        aug = None
        if aug_seed is not None:
            aug = AugParams.sample(len(idx), self.pad, torch.Generator().manual_seed(aug_seed))
        return {"image": self.images[idx], "label": self.labels[idx], "index": idx, "aug": aug}


class CIFAR10DataModule(pl.LightningDataModule):
    """A dataset (CIFAR-10 by default) from torchvision, an image folder or synthetic data; see
    the module docstring.

    Args:
        source: "torchvision" (download when ``download``), "folder" (``root/train/<class>/*``,
            ``root/test/<class>/*``) or "synthetic".
        root: dataset directory for torchvision/folder.
        download: allow torchvision to download into ``root``.
        batch_size: training batch size; ``eval_batch_size`` for val/test (default: same).
        val_size: size of a seeded stratified validation split taken from the training images
            (0 = no validation split).
        split_seed: seed of the train subset and validation split.
        train_subset: use a seeded stratified subset of this many training images (None = all).
            Indices in batches stay the original training-set indices.
        synthetic_size, synthetic_test_size, synthetic_seed: synthetic data size and seed.
        cache_dir: where the decoded image-folder copy is cached as .pt (None = no cache).
        device: where the decoded tensors live: "auto" (the trainer's device), "cpu", "cuda", ...
        augment: random crop (reflect pad ``pad``) + horizontal flip on training batches.
        shuffle_seed: seed of the per-epoch shuffling and augmentation.
        drop_last: drop the last incomplete training batch.
        extra_augment: callables applied to every augmented uint8 training batch after the
            crop/flip (e.g. Hydra-instantiated ``torchvision.transforms.v2.RandomRotation``). They
            leave the finite crop/flip view set, so the teacher-output memo turns off.
        dataset: a :data:`distill.data.datasets.DATASETS` name: its classes, normalization,
            image size and torchvision class.
        num_classes: the number of classes (``data.num_classes``, which the model and module
            configs read); must be the dataset's, except for synthetic data (another count gets
            classes ``class0``, ...). None: the dataset's.
    """

    def __init__(
        self,
        source: str = "torchvision",
        root: str | Path = "data/cifar10",
        download: bool = True,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 0,
        split_seed: int = 0,
        train_subset: int | None = None,
        synthetic_size: int = 1000,
        synthetic_test_size: int = 500,
        synthetic_seed: int = 0,
        cache_dir: str | Path | None = None,
        device: str = "auto",
        augment: bool = True,
        pad: int = 4,
        shuffle_seed: int = 0,
        drop_last: bool = False,
        extra_augment: Sequence[Callable[[Tensor], Tensor]] | None = None,
        dataset: str = "cifar10",
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        if source not in SOURCES:
            raise DataError(f"data.source must be one of {', '.join(SOURCES)}; got '{source}'")
        self.spec: DatasetSpec = get_dataset(dataset)
        self.declared_classes = self.spec.num_classes if num_classes is None else num_classes
        if source != "synthetic" and self.declared_classes != self.spec.num_classes:
            raise DataError(
                f"data.num_classes={num_classes}, but {self.spec.title} has "
                f"{self.spec.num_classes} classes: set data.num_classes={self.spec.num_classes} "
                "(only synthetic data takes another count)"
            )
        self.source, self.root, self.download = source, root, download
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size, self.split_seed, self.train_subset = val_size, split_seed, train_subset
        self.synthetic = (synthetic_size, synthetic_test_size, synthetic_seed)
        self.cache_dir, self.device = cache_dir, device
        self.augment, self.pad = augment, pad
        self.shuffle_seed, self.drop_last = shuffle_seed, drop_last
        self.extra_augment = list(extra_augment or [])
        self.arrays: CIFARArrays | None = None
        self.train_indices = self.val_indices = torch.zeros(0, dtype=torch.long)
        self._resident: dict[str, ResidentDataset] = {}

    # ------------------------------------------------------------------ loading

    def load(self) -> CIFARArrays:
        """Decode the source once (idempotent); raises :class:`DataError` on bad input."""
        if self.arrays is None:
            if self.source == "torchvision":
                self.arrays = load_torchvision(self.root, self.download, self.spec)
            elif self.source == "folder":
                self.arrays = load_folder(self.root, self.cache_dir, self.spec)
            else:
                n, n_test, seed = self.synthetic
                self.arrays = make_synthetic(n, n_test, seed, self.declared_classes, self.spec)
        return self.arrays

    @property
    def dataset(self) -> DatasetSpec:
        """The dataset's declaration (classes, normalization, image size)."""
        return self.spec

    def normalize(self, images: Tensor) -> Tensor:
        """uint8 (or 0..1 float) images -> the network's input, with this dataset's statistics."""
        return normalize_images(images, self.spec)

    @property
    def train_images(self) -> Tensor:
        """uint8 (N, 3, H, W), the full un-augmented training set (CPU)."""
        return self.load().train_images

    @property
    def train_labels(self) -> Tensor:
        return self.load().train_labels

    @property
    def test_images(self) -> Tensor:
        return self.load().test_images

    @property
    def test_labels(self) -> Tensor:
        return self.load().test_labels

    @property
    def classes(self) -> tuple[str, ...]:
        return self.load().classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_train_total(self) -> int:
        """Size of the full training set (what ``index`` in training batches indexes)."""
        return len(self.train_labels)

    @property
    def dataset_id(self) -> str:
        """Identifies dataset, source and content (for caches keyed by dataset index)."""
        return self.load().dataset_id

    @property
    def view_pad(self) -> int | None:
        """``pad`` of the finite view set of the training augmentation (each image has
        ``(2 pad + 1)^2`` crop offsets x 2 flips), or None when ``extra_augment`` leaves it."""
        return None if self.extra_augment else self.pad

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        if self.source == "torchvision":
            load_torchvision(self.root, self.download, self.spec)
        elif self.source == "folder":
            load_folder(self.root, self.cache_dir, self.spec)  # fills the cache once

    def _target_device(self) -> torch.device:
        if self.device != "auto":
            return torch.device(self.device)
        trainer = getattr(self, "trainer", None)
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def setup(self, stage: str | None = None) -> None:
        arrays = self.load()
        self.train_indices, self.val_indices = split_indices(
            arrays.train_labels, self.train_subset, self.val_size, self.split_seed
        )
        dev = self._target_device()
        if self._resident and self._resident["train"].images.device == dev:
            return  # already resident there (setup runs again for "test")
        self._resident = {
            "train": ResidentDataset(
                arrays.train_images.to(dev), arrays.train_labels.to(dev), self.pad
            ),
            "test": ResidentDataset(
                arrays.test_images.to(dev), arrays.test_labels.to(dev), self.pad
            ),
        }

    def _rank_world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _loader(self, split: str, indices: Tensor, train: bool) -> DataLoader:
        if not self._resident:
            self.setup()
        rank, world = self._rank_world()
        sampler = IndexBatchSampler(
            indices,
            self.batch_size if train else self.eval_batch_size,
            shuffle=train,
            seed=self.shuffle_seed,
            drop_last=self.drop_last and train,
            augment=train and self.augment,
            rank=rank,
            world_size=world,
        )
        return DataLoader(
            self._resident[split], batch_size=None, sampler=sampler, collate_fn=_identity
        )

    def train_dataloader(self) -> DataLoader | ResumableLoader:
        """Shuffled, augmented batches; resumable mid-epoch when a trainer is attached."""
        loader = self._loader("train", self.train_indices, train=True)
        trainer = getattr(self, "trainer", None)
        return loader if trainer is None else ResumableLoader(loader, trainer)

    def val_dataloader(self) -> DataLoader | list:
        if len(self.val_indices) == 0:
            return []
        return self._loader("train", self.val_indices, train=False)

    def test_dataloader(self) -> DataLoader:
        n_test = len(self._resident["test"]) if self._resident else len(self.test_labels)
        return self._loader("test", torch.arange(n_test), train=False)

    def transform_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Augment (if the batch carries ``aug``) and normalize a gathered uint8 batch, in place."""
        images = batch["image"]
        if images.dtype == torch.uint8:
            aug = batch.get("aug")
            if aug is not None:
                aug = aug.to(images.device)
                images = aug.apply(images)
                batch["aug"] = aug
                for transform in self.extra_augment:
                    images = transform(images)
            batch["image"] = self.normalize(images)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        return self.transform_batch(batch)


def _identity(batch: Any) -> Any:
    return batch
