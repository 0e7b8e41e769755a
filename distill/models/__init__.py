"""Network architectures (WRN-d-k for CIFAR)."""

from distill.models.wrn import BasicBlock, WideResNet, wrn16_2, wrn40_2

__all__ = ["BasicBlock", "WideResNet", "wrn16_2", "wrn40_2"]
