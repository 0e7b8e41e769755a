"""Image-classification data (CIFAR-10, CIFAR-100, ...): dataset declarations, sources decoded
once into uint8 tensors, batched augmentation, datamodule."""

from distill.data.augment import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    AugParams,
    denormalize_images,
    normalize_images,
)
from distill.data.datamodule import CIFAR10DataModule, IndexBatchSampler, ResidentDataset
from distill.data.datasets import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASETS,
    DataError,
    DatasetSpec,
    get_dataset,
)
from distill.data.sources import (
    CIFARArrays,
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
    "CIFAR100_CLASSES",
    "DATASETS",
    "AugParams",
    "CIFAR10DataModule",
    "CIFARArrays",
    "DataError",
    "DatasetSpec",
    "IndexBatchSampler",
    "ResidentDataset",
    "decode_images",
    "denormalize_images",
    "get_dataset",
    "list_image_folder",
    "load_folder",
    "load_torchvision",
    "make_synthetic",
    "normalize_images",
    "split_indices",
    "stratified_subset",
]
