"""CIFAR VGG with BatchNorm as in RepDistiller (``vgg8``, ``vgg11``, ``vgg13``: their ``*_bn``).

Five stages ``block0 .. block4`` of conv3x3 (with bias) - BN - ReLU layers; 2x2 max-pools
``pool0, pool1, pool2`` follow the first three stages (32 -> 16 -> 8 -> 4 at 32x32 input;
RepDistiller's fourth max-pool runs only for 64x64 inputs and is left out). Head:
``fc(flatten(pool(block4)))`` with one ``Linear(512, num_classes)``. Stage channels:

* vgg8:  [64], [128], [256], [512], [512]
* vgg11: [64], [128], [256, 256], [512, 512], [512, 512]
* vgg13: [64, 64], [128, 128], [256, 256], [512, 512], [512, 512]

``block4`` (post-ReLU, 4x4 at 32x32 input) is the CAM layer and the input of the pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from torch import nn

from distill.models._init import init_cifar
from distill.models.registry import register_model

__all__ = ["VGG", "VGG_STAGES"]

VGG_STAGES: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


def _stage(in_ch: int, channels: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for out_ch in channels:
        layers += [nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.BatchNorm2d(out_ch), nn.ReLU()]
        in_ch = out_ch
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-BN for 32x32 inputs with the stage channels ``stages`` (see the module docstring)."""

    #: the last feature map before the global pool (4x4 at 32x32 input)
    cam_layer: ClassVar[str] = "block4"
    #: attention-transfer feature layers: RepDistiller's f1..f4 (16x16, 8x8, 4x4, 4x4)
    feature_layers: ClassVar[tuple[str, ...]] = ("block1", "block2", "block3", "block4")

    def __init__(
        self, stages: Sequence[Sequence[int]] = VGG_STAGES["vgg13"], num_classes: int = 10
    ) -> None:
        super().__init__()
        if len(stages) != 5 or not all(stages):
            raise ValueError(f"VGG needs 5 non-empty stages of channels, got {stages}")
        self.stages = tuple(tuple(s) for s in stages)
        self.num_classes = num_classes
        ins = [3] + [s[-1] for s in self.stages[:-1]]
        self.block0 = _stage(ins[0], self.stages[0])
        self.pool0 = nn.MaxPool2d(2, 2)
        self.block1 = _stage(ins[1], self.stages[1])
        self.pool1 = nn.MaxPool2d(2, 2)
        self.block2 = _stage(ins[2], self.stages[2])
        self.pool2 = nn.MaxPool2d(2, 2)
        self.block3 = _stage(ins[3], self.stages[3])
        self.block4 = _stage(ins[4], self.stages[4])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.stages[4][-1], num_classes)
        init_cifar(self, linear_std=0.01)

    @property
    def arch(self) -> str:
        """``vgg8`` / ``vgg11`` / ``vgg13`` (else ``vgg<number of conv layers + 3>``)."""
        for name, stages in VGG_STAGES.items():
            if stages == self.stages:
                return name
        return f"vgg{sum(map(len, self.stages)) + 3}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool0(self.block0(x))
        x = self.pool1(self.block1(x))
        x = self.pool2(self.block2(x))
        x = self.block4(self.block3(x))
        return self.fc(torch.flatten(self.pool(x), 1))


def _register(name: str) -> None:
    def factory(num_classes: int = 10) -> VGG:
        return VGG(VGG_STAGES[name], num_classes)

    factory.__doc__ = f"{name} with BatchNorm (RepDistiller's {name}_bn)."
    register_model(name)(factory)


for _name in VGG_STAGES:
    _register(_name)
