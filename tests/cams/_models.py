"""Small models for the cams tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class Tiny(nn.Module):
    """conv → BN → ReLU → global average pool → linear (the gradcheck model)."""

    def __init__(self, c_in: int = 2, c: int = 3, k: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, k)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.pool(self.relu(self.bn(self.conv(x)))), 1))


class _Block(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(c_in)
        self.conv0 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv1 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.short = nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        o = F.relu(self.bn0(x))
        return self.conv1(F.relu(self.bn1(self.conv0(o)))) + self.short(o)


class LocalWRN(nn.Module):
    """WRN-like stand-in with the project's module names (conv1, block1-3, bn, relu, pool, fc)."""

    def __init__(self, width: int = 4, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, padding=1, bias=False)
        self.block1 = nn.Sequential(_Block(width, width, 1))
        self.block2 = nn.Sequential(_Block(width, 2 * width, 2))
        self.block3 = nn.Sequential(_Block(2 * width, 4 * width, 2))
        self.bn = nn.BatchNorm2d(4 * width)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        return self.fc(self.pool(self.relu(self.bn(x))).view(x.size(0), -1))


def wrn(depth: int = 10, widen: int = 1) -> nn.Module:
    """The project's WideResNet when available, else :class:`LocalWRN`; BN statistics random."""
    try:
        from distill.models.wrn import WideResNet

        model: nn.Module = WideResNet(depth, widen)
    except ImportError:
        model = LocalWRN()
    return randomize_bn(model)


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
                    m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.rand(c, generator=g) - 0.5)
    return model


def resnet18() -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    return randomize_bn(torchvision.models.resnet18(weights=None))


def swap_parameter(module: nn.Module, name: str, value: Tensor) -> None:
    """Replace a parameter by a plain tensor (so gradcheck can differentiate w.r.t. it)."""
    if name in module._parameters:
        del module._parameters[name]
    setattr(module, name, value)
