"""The datasets the toolkit knows: classes, normalization, image size and sources of each.

A dataset is one :class:`DatasetSpec` entry in :data:`DATASETS` plus one data config
(``configs/data/<name>.yaml`` with ``dataset: <name>`` and ``num_classes``); every source
(torchvision download, image-folder copy, synthetic) and the normalization follow from the entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "CIFAR10",
    "CIFAR100",
    "CIFAR100_CLASSES",
    "CIFAR10_CLASSES",
    "DATASETS",
    "DEFAULT_DATASET",
    "DataError",
    "DatasetSpec",
    "get_dataset",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
# the fine labels in label order (torchvision's CIFAR100.classes, from the archive's meta file)
CIFAR100_CLASSES: tuple[str, ...] = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch",
    "crab", "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion",
    "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom",
    "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road",
    "rocket", "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake",
    "spider", "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone",
    "television", "tiger", "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale",
    "willow_tree", "wolf", "woman", "worm",
)  # fmt: skip

Stats = tuple[float, float, float]


class DataError(RuntimeError):
    """A user-facing data problem; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a dataset declares.

    ``name``: its key in :data:`DATASETS` and the value of ``data.dataset``; ``title``: how
    messages name it; ``classes``: class names in label order (an image folder must hold exactly
    these class folders); ``mean``, ``std``: per-channel statistics on the 0..1 scale, inputs are
    ``(x/255 - mean) / std``; ``image_size``: side of the square RGB images; ``torchvision``: the
    class in ``torchvision.datasets`` that downloads it; ``config``, ``folder_config``,
    ``synthetic_config``: the data configs of its three sources (named in error messages);
    ``folder_root``: the folder config's default root (named in error messages).
    """

    name: str
    title: str
    classes: tuple[str, ...]
    mean: Stats
    std: Stats
    image_size: int
    torchvision: str
    config: str
    folder_config: str
    folder_root: str
    synthetic_config: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def stats(self, device: torch.device | None = None) -> tuple[Tensor, Tensor]:
        """``mean``, ``std`` as float32 (1, 3, 1, 1) tensors on ``device``."""
        mean = torch.tensor(self.mean, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device, dtype=torch.float32).view(1, 3, 1, 1)
        return mean, std


CIFAR10 = DatasetSpec(
    name="cifar10",
    title="CIFAR-10",
    classes=CIFAR10_CLASSES,
    # attention-transfer's CIFAR-10 statistics
    mean=(125.3 / 255, 123.0 / 255, 113.9 / 255),
    std=(63.0 / 255, 62.1 / 255, 66.7 / 255),
    image_size=32,
    torchvision="CIFAR10",
    config="cifar10",
    folder_config="cifar10_folder",
    folder_root="../shared/data/cifar10-jpeg",
    synthetic_config="synthetic",
)
CIFAR100 = DatasetSpec(
    name="cifar100",
    title="CIFAR-100",
    classes=CIFAR100_CLASSES,
    # RepDistiller / mdistiller's CIFAR-100 statistics
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    image_size=32,
    torchvision="CIFAR100",
    config="cifar100",
    folder_config="cifar100_folder",
    folder_root="data/cifar100-folder",
    synthetic_config="synthetic100",
)
DATASETS: dict[str, DatasetSpec] = {d.name: d for d in (CIFAR10, CIFAR100)}
DEFAULT_DATASET = CIFAR10.name  # the dataset of configs written before datasets were configurable


def get_dataset(name: str | DatasetSpec | None) -> DatasetSpec:
    """The registered dataset ``name`` (None: CIFAR-10); :class:`DataError` naming the known
    ones."""
    if isinstance(name, DatasetSpec):
        return name
    found = DATASETS.get(name or DEFAULT_DATASET)
    if found is None:
        raise DataError(
            f"unknown data.dataset '{name}'; known: {', '.join(DATASETS)} "
            "(add one to distill.data.datasets.DATASETS and configs/data/)"
        )
    return found
