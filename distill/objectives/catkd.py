"""Class attention transfer (CAT-KD; Guo et al., CVPR 2023)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses import LossConfigError
from distill.objectives import register_objective
from distill.objectives.base import (
    Objective,
    StudentOutputs,
    TeacherOutput,
    Term,
    check_domain,
    check_layers,
    declared_layer,
    exact,
    finite,
    layer_shapes,
    upcast,
)

if TYPE_CHECKING:
    from distill.loss_config import LossConfig


@dataclass
class CATKDConfig:
    """``loss.catkd``: the authors' WRN-40-2 -> WRN-16-2 setting (beta = 12, 2x2, no
    normalization, CE weight 1)."""

    enabled: bool = False
    weight: float = 12.0
    resolution: int = 2  # CAMs average-pooled to resolution x resolution
    # the last feature map before global pooling; null: each network's declared ``pooled_layer``
    # (WRN: "relu", after the final BN-ReLU), else its ``cam_layer``
    layer: str | None = None
    classifier: str = "fc"  # the linear layer on the pooled features


def class_cams(feature: Tensor, weight: Tensor, resolution: int) -> Tensor:
    """CAMs of all classes ``CAM_k = sum_c W_kc A_c`` (the classifier's weights as a 1x1
    convolution, without its bias) of a feature map (B, C, h, w), average-pooled to
    (B, K, resolution, resolution)."""
    with exact(feature):
        cams = torch.einsum("bchw,kc->bkhw", upcast(feature), upcast(weight).to(upcast(feature)))
        return F.adaptive_avg_pool2d(cams, resolution)


def _classifier(net: nn.Module, name: str, channels: int) -> nn.Linear:
    module = dict(net.named_modules()).get(name)
    if not isinstance(module, nn.Linear) or module.in_features != channels:
        raise LossConfigError(
            f"loss.catkd.classifier={name}: {type(net).__name__} needs a linear classifier "
            f"with {channels} inputs (the channels of loss.catkd.layer)"
        )
    return module


def pooled_layer(net: nn.Module, layer: str | None) -> str:
    """``layer``, or the module whose output ``net``'s global pool averages: its class attribute
    ``pooled_layer`` when declared (WRN: ``relu``), else its ``cam_layer``."""
    if layer is not None:
        return layer
    found = getattr(net, "pooled_layer", None)
    return found if isinstance(found, str) else declared_layer(net, None, "loss.catkd.layer")


@register_objective("catkd")
class CATKD(Objective):
    """``weight * MSE(CAM_s, CAM_t)`` of the pooled all-class CAMs (:func:`class_cams`), mean
    over batch, classes and cells, term ``catkd``. The student's CAMs carry gradients into its
    features and classifier weights; the teacher's (K x 2 x 2 = 40 values per image for
    CIFAR-10) are one teacher output, memoized like the logits."""

    Config = CATKDConfig
    teacher = ("catkd",)
    hooks_student = True

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        c = loss.catkd
        check_domain("catkd.weight", c.weight, finite(c.weight) and c.weight >= 0, ">= 0")
        check_domain("catkd.resolution", c.resolution, c.resolution >= 1, "an integer >= 1")

    def __init__(self, loss: LossConfig, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__(loss, student, teacher)
        nets = {"student": student, "teacher": teacher}
        self.layers = {side: pooled_layer(net, self.cfg.layer) for side, net in nets.items()}
        self.student_layers = (self.layers["student"],)
        shapes = {}
        for side, net in nets.items():
            layer = self.layers[side]
            check_layers(net, [layer], "catkd.layer")
            shapes[side] = layer_shapes(net, [layer])[layer]
            if len(shapes[side]) != 3:
                raise LossConfigError(
                    f"loss.catkd.layer={layer} gives {shapes[side]} on the {side}: CAT-KD needs "
                    "feature maps (B, C, h, w)"
                )
        self.student_fc = _classifier(student, self.cfg.classifier, shapes["student"][0])
        self.teacher_fc = _classifier(teacher, self.cfg.classifier, shapes["teacher"][0])
        if self.student_fc.out_features != self.teacher_fc.out_features:
            raise LossConfigError("CAT-KD needs student and teacher with the same classes")

    def teacher_outputs(self) -> list[TeacherOutput]:
        fc, resolution = self.teacher_fc, self.cfg.resolution

        def compute(features: list[Tensor], logits: Tensor) -> Tensor:
            return class_cams(features[0], fc.weight, resolution)

        layer = self.layers["teacher"]
        description = {"layer": layer, "classifier": self.cfg.classifier, "resolution": resolution}
        return [TeacherOutput("catkd", (layer,), compute, description)]

    def terms(
        self,
        student: StudentOutputs,
        teacher: Mapping[str, Tensor],
        batch: Mapping[str, Any],
        epoch: int,
    ) -> list[Term]:
        s = class_cams(
            student.features[self.layers["student"]], self.student_fc.weight, self.cfg.resolution
        )
        with exact(s):
            value = F.mse_loss(s, teacher["catkd"].detach().to(s.dtype))
        return [Term("catkd", value, self.cfg.weight)]
