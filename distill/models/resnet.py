"""CIFAR ResNets as in RepDistiller (He et al.'s CIFAR variant).

ResNet-d: depth ``d = 6n + 2``; a 3x3 stem conv-BN-ReLU with ``widths[0]`` channels, then three
stages of ``n`` post-activation basic blocks with ``widths[1:]`` channels and strides 1, 2, 2. A
block returns ``relu(bn2(conv2(relu(bn1(conv1(x))))) + s(x))`` with ``s`` the identity, or a 1x1
conv (stride of the block) + BN when the shape changes. Head: ``fc(flatten(pool(block3)))``.

Widths: ``resnet<d>`` (16, 16, 32, 64); ``resnet<d>x4`` (32, 64, 128, 256) (RepDistiller's
resnet8x4 / resnet32x4). Module names: ``stem, block1, block2, block3, pool, fc``; ``block3``
(post-ReLU, 8x8 at 32x32 input) is the CAM layer and the input of the pool.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from distill.models._init import conv_bn, conv_bn_relu, init_cifar
from distill.models.registry import register_model

__all__ = ["ResNet", "ResNetBlock"]

NARROW = (16, 16, 32, 64)
WIDE = (32, 64, 128, 256)


class ResNetBlock(nn.Module):
    """Post-activation basic block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = conv_bn(in_ch, out_ch, 3, stride)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv2, self.bn2 = conv_bn(out_ch, out_ch, 3)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(*conv_bn(in_ch, out_ch, 1, stride))
        self.relu = nn.ReLU(inplace=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR ResNet-depth with stem/stage ``widths`` (see the module docstring)."""

    #: the last feature map before the global pool (8x8 at 32x32 input)
    cam_layer: ClassVar[str] = "block3"
    #: attention-transfer feature layers: the stage outputs (32x32, 16x16, 8x8)
    feature_layers: ClassVar[tuple[str, ...]] = ("block1", "block2", "block3")

    def __init__(
        self, depth: int = 56, widths: tuple[int, ...] = NARROW, num_classes: int = 10
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6 != 0:
            raise ValueError(f"ResNet depth must be 6n+2 with n >= 1 (8, 14, 20, ...), got {depth}")
        if len(widths) != 4:
            raise ValueError(f"ResNet widths must be (stem, stage1, stage2, stage3), got {widths}")
        n = (depth - 2) // 6
        self.depth, self.widths, self.num_classes = depth, tuple(widths), num_classes
        self.stem = conv_bn_relu(3, widths[0], 3)
        self.block1 = self._stage(widths[0], widths[1], n, 1)
        self.block2 = self._stage(widths[1], widths[2], n, 2)
        self.block3 = self._stage(widths[2], widths[3], n, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[3], num_classes)
        init_cifar(self)

    @staticmethod
    def _stage(in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            *(
                ResNetBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1)
                for i in range(n)
            )
        )

    @property
    def arch(self) -> str:
        """``resnet<depth>``, ``resnet<depth>x4``, else ``resnet<depth>w<widths>``."""
        suffix = {NARROW: "", WIDE: "x4"}.get(self.widths)
        if suffix is None:
            suffix = "w" + "_".join(map(str, self.widths))
        return f"resnet{self.depth}{suffix}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def _register(depth: int, widths: tuple[int, ...], name: str) -> None:
    def factory(num_classes: int = 10) -> ResNet:
        return ResNet(depth, widths, num_classes)

    factory.__doc__ = f"{name}: CIFAR ResNet-{depth}, widths {widths}."
    register_model(name)(factory)


for _depth in (8, 14, 20, 32, 44, 56, 110):
    _register(_depth, NARROW, f"resnet{_depth}")
for _depth in (8, 32):
    _register(_depth, WIDE, f"resnet{_depth}x4")
