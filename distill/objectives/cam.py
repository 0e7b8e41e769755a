"""The explanation term: the student's true-class CAM pulled toward the teacher's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from distill.losses import LossConfigError, check_alpha, explanation_loss
from distill.objectives import register_objective
from distill.objectives.base import Objective, StudentOutputs, Term, layer_shapes

if TYPE_CHECKING:
    from distill.loss_config import LossConfig


@register_objective("cam")
class CAMTerm(Objective):
    """``alpha * mean_b || N(L_s) - N(L_t) ||^2`` on the true-class maps of ``loss.method`` at
    ``loss.student_layer`` / ``loss.teacher_layer`` (:func:`distill.losses.explanation_loss`),
    term ``cam``. On with ``loss.method``; its options are the top-level CAM keys of the loss
    config (``alpha``, ``norm``, the layers, ``teacher_maps``, ``cam`` / ``student_cam`` /
    ``teacher_cam``). The student's maps come from the module's CAM on the step's one forward,
    the teacher's from :class:`~distill.teacher.Teacher` (online, memo or offline cache)."""

    teacher = ("maps",)
    quick_overrides = ("loss.method=gradcam", "loss.alpha=1.0")

    @classmethod
    def active(cls, loss: LossConfig) -> bool:
        return loss.method is not None

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        check_alpha(loss.alpha)

    def __init__(self, loss: LossConfig, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__(loss, student, teacher)
        _check_map_shapes(loss, student, teacher)

    def terms(
        self,
        student: StudentOutputs,
        teacher: Mapping[str, Tensor],
        batch: Mapping[str, Any],
        epoch: int,
    ) -> list[Term]:
        assert student.maps is not None, "the student module computes maps with loss.method"
        value = explanation_loss(student.maps, teacher["maps"], self.loss.norm)
        return [Term("cam", value, self.loss.alpha)]


def _check_map_shapes(loss: LossConfig, student: nn.Module, teacher: nn.Module) -> None:
    """Stop before training when student and teacher maps differ in size (one 32x32 probe)."""
    outputs = {
        "student": layer_shapes(student, [loss.student_layer])[loss.student_layer],
        "teacher": layer_shapes(teacher, [loss.teacher_layer])[loss.teacher_layer],
    }
    for side, shape in outputs.items():
        if len(shape) != 3:
            layer = getattr(loss, f"{side}_layer")
            raise LossConfigError(
                f"loss.{side}_layer={layer} outputs shape {(2, *shape)}, not spatial maps "
                f"(B, C, h, w): choose a convolutional layer, e.g. loss.{side}_layer=block3"
            )
    shapes = [shape[-2:] for shape in outputs.values()]
    if shapes[0] != shapes[1]:
        raise LossConfigError(
            f"student layer {loss.student_layer!r} gives {shapes[0]} maps but teacher "
            f"layer {loss.teacher_layer!r} gives {shapes[1]}: choose layers of equal "
            "resolution (loss.student_layer=..., loss.teacher_layer=...)"
        )
