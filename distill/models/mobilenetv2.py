"""CIFAR MobileNetV2 as in RepDistiller (``mobilenetv2`` = their ``mobile_half``: width 0.5).

Stem: conv3x3 stride 2 - BN - ReLU with ``int(32 * width)`` channels (32 -> 16 at 32x32 input).
Seven stages ``block0 .. block6`` of inverted residuals, ``(t, c, n, s)`` =
(1, 16, 1, 1), (T, 24, 2, 1), (T, 32, 3, 2), (T, 64, 4, 2), (T, 96, 3, 1), (T, 160, 3, 2),
(T, 320, 1, 1) with ``T = expand_ratio`` (6) and ``int(c * width)`` channels; the first block of a
stage has stride ``s``. An inverted residual is 1x1 expand (to ``in * t``, also for ``t = 1``) -
BN - ReLU - depthwise 3x3 (stride) - BN - ReLU - 1x1 project - BN, plus the input when the stride
is 1 and the channels agree. Head: ``head`` = 1x1 conv - BN - ReLU to 1280 channels (``int(1280 *
width)`` if width > 1), then ``fc(flatten(pool(head)))``. ``head`` (post-ReLU, 2x2 at 32x32 input)
is the CAM layer and the input of the pool.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from distill.models._init import conv_bn, conv_bn_relu, init_cifar
from distill.models.registry import register_model

__all__ = ["InvertedResidual", "MobileNetV2"]

#: (expansion (None: the model's expand_ratio), channels, blocks, first stride) per stage
STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """1x1 expand - depthwise 3x3 - 1x1 linear projection (``conv``), residual when shapes agree."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_ch * expand
        self.residual = stride == 1 and in_ch == out_ch
        self.conv = nn.Sequential(
            *conv_bn_relu(in_ch, mid, 1),
            *conv_bn_relu(mid, mid, 3, stride, groups=mid),
            *conv_bn(mid, out_ch, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.residual else out


class MobileNetV2(nn.Module):
    """MobileNetV2 for 32x32 inputs (see the module docstring)."""

    #: the last feature map before the global pool (2x2 at 32x32 input)
    cam_layer: ClassVar[str] = "head"
    #: attention-transfer feature layers: RepDistiller's f1..f4 (16x16, 8x8, 4x4, 2x2)
    feature_layers: ClassVar[tuple[str, ...]] = ("block1", "block2", "block4", "block6")

    def __init__(self, width: float = 0.5, expand_ratio: int = 6, num_classes: int = 10) -> None:
        super().__init__()
        self.width, self.expand_ratio, self.num_classes = width, expand_ratio, num_classes
        in_ch = int(32 * width)
        self.stem = conv_bn_relu(3, in_ch, 3, 2)
        for i, (t, c, n, s) in enumerate(STAGES):
            out_ch = int(c * width)
            blocks = []
            for j in range(n):
                blocks.append(
                    InvertedResidual(in_ch, out_ch, s if j == 0 else 1, t or expand_ratio)
                )
                in_ch = out_ch
            self.add_module(f"block{i}", nn.Sequential(*blocks))
        last = int(1280 * width) if width > 1.0 else 1280
        self.head = conv_bn_relu(in_ch, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)
        init_cifar(self, linear_std=0.01)

    @property
    def arch(self) -> str:
        """``mobilenetv2`` for RepDistiller's mobile_half, else ``mobilenetv2_w<width>_t<T>``."""
        if (self.width, self.expand_ratio) == (0.5, 6):
            return "mobilenetv2"
        return f"mobilenetv2_w{self.width:g}_t{self.expand_ratio}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i in range(len(STAGES)):
            x = self.get_submodule(f"block{i}")(x)
        return self.fc(torch.flatten(self.pool(self.head(x)), 1))


@register_model("mobilenetv2")
def mobilenetv2(num_classes: int = 10, width: float = 0.5, expand_ratio: int = 6) -> MobileNetV2:
    """RepDistiller's ``mobile_half``: MobileNetV2 with width 0.5 and expansion 6."""
    return MobileNetV2(width, expand_ratio, num_classes)
