"""Weight initialization shared by the CIFAR families of RepDistiller."""

from __future__ import annotations

from torch import nn


def init_cifar(net: nn.Module, linear_std: float | None = None) -> None:
    """Conv weights Kaiming normal with fan_out (``std = sqrt(2 / (k*k*out_channels))``) and
    zero bias; BatchNorm weight 1, bias 0; Linear ``N(0, linear_std)`` with zero bias when
    ``linear_std`` is given, else PyTorch's default."""
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def conv_bn(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    """``[conv kxk (padding k//2, no bias), BatchNorm]``."""
    conv = nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False)
    return [conv, nn.BatchNorm2d(out_ch)]


def conv_bn_relu(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1
) -> nn.Sequential:
    """``conv kxk -> BatchNorm -> ReLU`` (named ``0, 1, 2``)."""
    return nn.Sequential(*conv_bn(in_ch, out_ch, kernel, stride, groups), nn.ReLU(inplace=False))
