"""CIFAR-10 data: sources decoded once into uint8 tensors, batched augmentation, datamodule."""

from distill.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    AugParams,
    denormalize_images,
    normalize_images,
)
from distill.data.datamodule import CIFAR10DataModule, IndexBatchSampler, ResidentDataset
from distill.data.sources import (
    CIFAR10_CLASSES,
    CIFARArrays,
    DataError,
    decode_images,
    list_image_folder,
    load_folder,
    load_torchvision,
    make_synthetic,
)
from distill.data.splits import split_indices, stratified_subset

__all__ = [
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "AugParams",
    "CIFAR10DataModule",
    "CIFARArrays",
    "DataError",
    "IndexBatchSampler",
    "ResidentDataset",
    "decode_images",
    "denormalize_images",
    "list_image_folder",
    "load_folder",
    "load_torchvision",
    "make_synthetic",
    "normalize_images",
    "split_indices",
    "stratified_subset",
]
