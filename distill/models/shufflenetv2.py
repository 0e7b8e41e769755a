"""CIFAR ShuffleNetV2 (1x) as in RepDistiller (``shufflenetv2`` = their ``ShuffleV2``).

Stem: conv1x1 (3 -> 24, stride 1) - BN - ReLU. Three stages ``block1 .. block3`` with 116, 232,
464 channels and 3, 7, 3 basic units, each preceded by a down-sampling unit (stride 2: 32 -> 16
-> 8 -> 4 at 32x32 input). Head: ``head`` = conv1x1 (464 -> 1024) - BN - ReLU, then
``fc(flatten(pool(head)))``. ``head`` (post-ReLU, 4x4 at 32x32 input) is the CAM layer and the
input of the pool.

* Down-sampling unit (``in -> out``, ``mid = out // 2``): left = dw3x3 s2 - BN - 1x1 (mid) - BN -
  ReLU; right = 1x1 (mid) - BN - ReLU - dw3x3 s2 - BN - 1x1 - BN - ReLU; concat, channel shuffle.
* Basic unit (``c`` channels): split into halves ``(x1, x2)``; ``x2`` -> 1x1 - BN - ReLU - dw3x3 -
  BN - 1x1 - BN - ReLU; concat ``(x1, x2')``, channel shuffle (2 groups).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from distill.models._init import conv_bn, conv_bn_relu, init_cifar
from distill.models.registry import register_model

__all__ = ["ShuffleNetV2", "channel_shuffle"]

#: net size -> (stage channels + head channels, basic units per stage)
SIZES: dict[float, tuple[tuple[int, int, int, int], tuple[int, int, int]]] = {
    0.5: ((48, 96, 192, 1024), (3, 7, 3)),
    1.0: ((116, 232, 464, 1024), (3, 7, 3)),
    1.5: ((176, 352, 704, 1024), (3, 7, 3)),
    2.0: ((224, 488, 976, 2048), (3, 7, 3)),
}


def channel_shuffle(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """(B, g*k, H, W) -> channel ``i*k + j`` moves to ``j*g + i`` (the groups interleaved)."""
    return x.unflatten(1, (groups, -1)).transpose(1, 2).flatten(1, 2)


class DownUnit(nn.Module):
    """Stride-2 unit: two branches of ``out // 2`` channels each, concatenated and shuffled."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        mid = out_ch // 2
        self.left = nn.Sequential(
            *conv_bn(in_ch, in_ch, 3, 2, groups=in_ch), *conv_bn_relu(in_ch, mid, 1)
        )
        self.right = nn.Sequential(
            *conv_bn_relu(in_ch, mid, 1),
            *conv_bn(mid, mid, 3, 2, groups=mid),
            *conv_bn_relu(mid, mid, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(torch.cat([self.left(x), self.right(x)], 1))


class BasicUnit(nn.Module):
    """Channel split: the first half passes, the second goes through 1x1 - dw3x3 - 1x1."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half = channels // 2
        self.branch = nn.Sequential(
            *conv_bn_relu(half, half, 1),
            *conv_bn(half, half, 3, groups=half),
            *conv_bn_relu(half, half, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.chunk(2, dim=1)
        return channel_shuffle(torch.cat([x1, self.branch(x2)], 1))


class ShuffleNetV2(nn.Module):
    """ShuffleNetV2 of ``net_size`` for 32x32 inputs (see the module docstring)."""

    #: the last feature map before the global pool (4x4 at 32x32 input)
    cam_layer: ClassVar[str] = "head"
    #: attention-transfer feature layers: the stage outputs (16x16, 8x8, 4x4)
    feature_layers: ClassVar[tuple[str, ...]] = ("block1", "block2", "block3")

    def __init__(self, net_size: float = 1.0, num_classes: int = 10) -> None:
        super().__init__()
        if net_size not in SIZES:
            raise ValueError(
                f"ShuffleNetV2 net_size must be one of {sorted(SIZES)}, got {net_size}"
            )
        (c1, c2, c3, last), units = SIZES[net_size]
        self.net_size, self.num_classes = net_size, num_classes
        self.stem = conv_bn_relu(3, 24, 1)
        ins = (24, c1, c2)
        for i, (in_ch, out_ch, n) in enumerate(zip(ins, (c1, c2, c3), units, strict=True), 1):
            stage = [DownUnit(in_ch, out_ch), *(BasicUnit(out_ch) for _ in range(n))]
            self.add_module(f"block{i}", nn.Sequential(*stage))
        self.head = conv_bn_relu(c3, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_cifar(self)

    @property
    def arch(self) -> str:
        """``shufflenetv2`` (1x), else ``shufflenetv2_<size>x``."""
        return "shufflenetv2" if self.net_size == 1.0 else f"shufflenetv2_{self.net_size:g}x"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(self.head(x)), 1))


@register_model("shufflenetv2")
def shufflenetv2(num_classes: int = 10, net_size: float = 1.0) -> ShuffleNetV2:
    """RepDistiller's ``ShuffleV2``: ShuffleNetV2 1x."""
    return ShuffleNetV2(net_size, num_classes)
