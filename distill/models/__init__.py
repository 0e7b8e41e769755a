"""Network architectures for CIFAR, by name (:func:`build_model`, :func:`model_names`).

Families (one module each, registered on import): WRN (``wrn<depth>_<width>``), CIFAR ResNet
(``resnet8 .. resnet110``, ``resnet8x4``, ``resnet32x4``), VGG-BN (``vgg8``, ``vgg11``,
``vgg13``), ``mobilenetv2`` and ``shufflenetv2`` (RepDistiller's CIFAR definitions).
"""

from distill.models.mobilenetv2 import MobileNetV2
from distill.models.registry import (
    build_model,
    canonical_name,
    model_name,
    model_names,
    model_overrides,
    register_model,
    register_pattern,
)
from distill.models.resnet import ResNet
from distill.models.shufflenetv2 import ShuffleNetV2
from distill.models.vgg import VGG
from distill.models.wrn import BasicBlock, WideResNet, wrn16_1, wrn16_2, wrn40_1, wrn40_2

__all__ = [
    "VGG",
    "BasicBlock",
    "MobileNetV2",
    "ResNet",
    "ShuffleNetV2",
    "WideResNet",
    "build_model",
    "canonical_name",
    "model_name",
    "model_names",
    "model_overrides",
    "register_model",
    "register_pattern",
    "wrn16_1",
    "wrn16_2",
    "wrn40_1",
    "wrn40_2",
]
