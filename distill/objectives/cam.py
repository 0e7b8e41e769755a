"""The explanation term: the student's true-class CAM pulled toward the teacher's."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from distill.losses import (
    LossConfigError,
    aligned_size,
    check_alpha,
    explanation_loss,
)
from distill.objectives import register_objective
from distill.objectives.base import (
    Objective,
    StudentOutputs,
    Term,
    check_domain,
    declared_layer,
    layer_shapes,
)

if TYPE_CHECKING:
    from distill.loss_config import LossConfig


@register_objective("cam")
class CAMTerm(Objective):
    """``alpha * mean_b || N(P(L_s)) - N(P(L_t)) ||^2`` on the true-class maps of
    ``loss.method`` at ``loss.student_layer`` / ``loss.teacher_layer`` (null: each network's
    declared ``cam_layer``; :func:`distill.losses.explanation_loss`), term ``cam``. ``P``
    average-pools the raw maps to the common size (:func:`distill.losses.aligned_size`:
    ``loss.map_size``, or the smaller map's when they differ, e.g. 8x8 -> 4x4 in 2x2 cells;
    the identity for maps of equal size) before the normalization ``N``. On with
    ``loss.method``; its options are the top-level CAM keys of the loss config (``alpha``,
    ``norm``, the layers, ``map_size``, ``teacher_maps``, ``cam`` / ``student_cam`` /
    ``teacher_cam``). The student's maps come from the module's CAM on the step's one forward,
    the teacher's from :class:`~distill.teacher.Teacher` (online, memo or offline cache, at the
    teacher's size: pooled after retrieval)."""

    teacher = ("maps",)
    quick_overrides = ("loss.method=gradcam", "loss.alpha=1.0")

    @classmethod
    def active(cls, loss: LossConfig) -> bool:
        return loss.method is not None

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        check_alpha(loss.alpha)
        m = loss.map_size
        check_domain(
            "map_size", m, m is None or (isinstance(m, int) and m >= 1), "null or an integer >= 1"
        )

    def __init__(self, loss: LossConfig, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__(loss, student, teacher)
        self.size = map_pair_size(loss, student, teacher)  # (h, w) the maps are compared at

    def terms(
        self,
        student: StudentOutputs,
        teacher: Mapping[str, Tensor],
        batch: Mapping[str, Any],
        epoch: int,
    ) -> list[Term]:
        assert student.maps is not None, "the student module computes maps with loss.method"
        value = explanation_loss(student.maps, teacher["maps"], self.loss.norm, self.size)
        return [Term("cam", value, self.loss.alpha)]


def map_pair_size(loss: LossConfig, student: nn.Module, teacher: nn.Module) -> tuple[int, int]:
    """The (h, w) at which the CAM term compares the maps of ``loss.student_layer`` and
    ``loss.teacher_layer`` (null: the networks' declared ``cam_layer``), from one 32x32 probe;
    :class:`LossConfigError` with the fix, before training, when a layer gives no spatial maps or
    the pair cannot be aligned (:func:`distill.losses.aligned_size`)."""
    layers = {
        "student": declared_layer(student, loss.student_layer, "loss.student_layer"),
        "teacher": declared_layer(teacher, loss.teacher_layer, "loss.teacher_layer"),
    }
    nets = {"student": student, "teacher": teacher}
    shapes = {side: layer_shapes(nets[side], [layer])[layer] for side, layer in layers.items()}
    for side, shape in shapes.items():
        if len(shape) != 3:
            hint = getattr(nets[side], "cam_layer", None) or "<a convolutional layer>"
            raise LossConfigError(
                f"loss.{side}_layer={layers[side]} outputs shape {(2, *shape)}, not spatial maps "
                f"(B, C, h, w): choose a convolutional layer, e.g. loss.{side}_layer={hint}"
            )
    s, t = shapes["student"][-2:], shapes["teacher"][-2:]
    try:
        return aligned_size(s, t, loss.map_size)
    except LossConfigError as err:
        g = math.gcd(*s, *t)
        fix = f"set loss.map_size={g} or " if g > 1 and g != loss.map_size else ""
        raise LossConfigError(
            f"student layer {layers['student']!r} gives {s[0]}x{s[1]} maps and teacher layer "
            f"{layers['teacher']!r} gives {t[0]}x{t[1]}: they cannot be aligned by average "
            f"pooling ({err}); {fix}choose layers whose map sizes divide each other "
            "(loss.student_layer=..., loss.teacher_layer=...)"
        ) from None
