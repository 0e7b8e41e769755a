"""Wide residual networks for CIFAR, as in Zagoruyko & Komodakis' attention-transfer code.

WRN-d-k: depth ``d = 6n + 4``, group widths ``16k, 32k, 64k`` (stem 16), ``n`` pre-activation basic
blocks per group. A block computes ``o1 = relu(bn0(x))``, ``z = conv1(relu(bn1(conv0(o1))))`` and
returns ``z + x``, or ``z + convdim(o1)`` (a 1x1 projection of the *pre-activated* input) when the
number of channels changes. The head is ``fc(flatten(pool(relu(bn(block3(...))))))``.

Initialization follows attention-transfer's ``utils.py``: Kaiming normal (fan_in) for conv and
linear weights, linear bias 0, BatchNorm weight ~ U[0, 1) and bias 0; no conv bias, no dropout.

Module names (relied on by CAM code, see docs/CONTRACTS.md): ``conv1, block1, block2, block3, bn,
relu, pool, fc``. ``block3`` is the last convolutional output (before the final BN-ReLU) and
``relu`` the input of the global average pool; both are 8x8 for 32x32 inputs.
"""

from __future__ import annotations

import re
from typing import ClassVar

import torch
from torch import nn

from distill.models.registry import register_model, register_pattern

__all__ = ["BasicBlock", "WideResNet", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2"]


def _conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus shortcut."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(in_ch)
        self.relu0 = nn.ReLU(inplace=False)
        self.conv0 = _conv3x3(in_ch, out_ch, stride)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.relu1 = nn.ReLU(inplace=False)
        self.conv1 = _conv3x3(out_ch, out_ch, 1)
        self.convdim: nn.Conv2d | None = None
        if in_ch != out_ch:
            self.convdim = nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.relu0(self.bn0(x))
        z = self.conv1(self.relu1(self.bn1(self.conv0(o1))))
        if self.convdim is not None:
            return z + self.convdim(o1)
        return z + x


def _group(in_ch: int, out_ch: int, n: int, stride: int) -> nn.Sequential:
    blocks = [
        BasicBlock(in_ch if i == 0 else out_ch, out_ch, stride if i == 0 else 1) for i in range(n)
    ]
    return nn.Sequential(*blocks)


class WideResNet(nn.Module):
    """WRN-depth-widen_factor for 32x32 inputs (attention-transfer variant)."""

    #: the default CAM layer: the last feature map before the global pool (8x8 at 32x32 input)
    cam_layer: ClassVar[str] = "block3"
    #: the input of the global pool (after the final BN-ReLU): CAT-KD's feature map
    pooled_layer: ClassVar[str] = "relu"
    #: the feature layers of attention transfer (group outputs: 32x32, 16x16, 8x8)
    feature_layers: ClassVar[tuple[str, ...]] = ("block1", "block2", "block3")

    def __init__(self, depth: int = 40, widen_factor: int = 2, num_classes: int = 10) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.depth, self.widen_factor, self.num_classes = depth, widen_factor, num_classes
        self.conv1 = _conv3x3(3, 16)
        self.block1 = _group(16, widths[0], n, 1)
        self.block2 = _group(widths[0], widths[1], n, 2)
        self.block3 = _group(widths[1], widths[2], n, 2)
        self.bn = nn.BatchNorm2d(widths[2])
        self.relu = nn.ReLU(inplace=False)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[2], num_classes)
        self.reset_parameters()

    @property
    def arch(self) -> str:
        """Short architecture name, e.g. ``"wrn-40-2"`` (used to check checkpoints)."""
        return f"wrn-{self.depth}-{self.widen_factor}"

    def reset_parameters(self) -> None:
        """Attention-transfer initialization (see the module docstring)."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.uniform_(m.weight, 0.0, 1.0)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(x))), 1))


@register_pattern(r"wrn[-_]?(\d+)[-_](\d+)", "wrn<depth>_<width>", lambda m: f"wrn{m[1]}_{m[2]}")
def _wrn(match: re.Match[str], num_classes: int = 10) -> WideResNet:
    """Any WRN-d-k by name: ``wrn28_10``, also the ``arch`` spelling ``wrn-28-10``."""
    return WideResNet(int(match[1]), int(match[2]), num_classes)


@register_model("wrn40_2")
def wrn40_2(num_classes: int = 10) -> WideResNet:
    """WRN-40-2 (teacher, ~2.2M parameters)."""
    return WideResNet(40, 2, num_classes)


@register_model("wrn16_2")
def wrn16_2(num_classes: int = 10) -> WideResNet:
    """WRN-16-2 (student, ~0.7M parameters)."""
    return WideResNet(16, 2, num_classes)


@register_model("wrn40_1")
def wrn40_1(num_classes: int = 10) -> WideResNet:
    """WRN-40-1 (student of the wrn40_2 pair in RepDistiller, ~0.57M parameters)."""
    return WideResNet(40, 1, num_classes)


@register_model("wrn16_1")
def wrn16_1(num_classes: int = 10) -> WideResNet:
    """WRN-16-1 (~0.18M parameters)."""
    return WideResNet(16, 1, num_classes)
