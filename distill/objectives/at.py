"""Attention transfer (AT; Zagoruyko & Komodakis, ICLR 2017) over the networks' stage outputs
(their declared ``feature_layers``; the WRN group outputs)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.losses import LossConfigError, aligned_size
from distill.objectives import register_objective
from distill.objectives.base import (
    Objective,
    StudentOutputs,
    TeacherOutput,
    Term,
    check_domain,
    check_layers,
    declared_layers,
    exact,
    finite,
    layer_shapes,
)

if TYPE_CHECKING:
    from distill.loss_config import LossConfig


@dataclass
class ATConfig:
    """``loss.at``: the attention-transfer code's WRN setting (beta / 2 = 500 on the mean
    squared difference; mdistiller uses 1000). Null layers: each network's declared
    ``feature_layers`` (WRN: its group outputs block1, block2, block3)."""

    enabled: bool = False
    weight: float = 500.0
    p: float = 2.0  # at(A) = normalize(mean_c |A_c|^p)
    student_layers: list[str] | None = None  # None: the student's feature_layers
    teacher_layers: list[str] | None = None  # None: the teacher's feature_layers


class _MeanSquare(torch.autograd.Function):
    """``mean_c A_c^2`` (B, h, w) accumulated in float32 (float64 for float64 ``A``) straight
    from ``A`` in its own dtype; the backward ``2/C * A * g`` is one pass in ``A``'s dtype and
    memory format (autograd of ``A.float().square().mean(1)`` makes float32 copies of the
    large group outputs, which cost AT ~15 % of a bf16 step)."""

    @staticmethod
    def forward(ctx: Any, a: Tensor) -> Tensor:
        ctx.save_for_backward(a)
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        with torch.autocast(a.device.type, enabled=False):
            return torch.linalg.vector_norm(a, 2, dim=1, dtype=dtype).square() / a.shape[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        (a,) = ctx.saved_tensors
        return a * (grad * (2.0 / a.shape[1])).unsqueeze(1).to(a.dtype)


def attention(feature: Tensor, p: float, size: Sequence[int]) -> Tensor:
    """``at(A) = vec(mean_c |A_c|^p) / ||vec(mean_c |A_c|^p)||`` (B, h*w) of a feature map
    (B, C, H, W) average-pooled to ``size`` first when larger (RepDistiller / mdistiller).

    The channel mean accumulates in float32 (float64 for float64 features) from the feature in
    its own dtype (bf16 under autocast: the network's precision); the rest is float32."""
    a = feature
    if tuple(a.shape[-2:]) != tuple(size):
        a = F.adaptive_avg_pool2d(a, tuple(size))
    if p == 2:
        mean = _MeanSquare.apply(a)
    else:
        dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
        mean = a.abs().pow(p).mean(1, dtype=dtype)
    with exact(feature):
        return F.normalize(mean.flatten(1), dim=1)


def at_loss(student: Sequence[Tensor], teacher: Sequence[Tensor]) -> Tensor:
    """``sum_groups mean_{b, positions} (at_s - at_t)^2`` of attention maps (B, n_g) per group
    (the teacher's detached)."""
    return sum(
        (s - t.detach().to(s.dtype)).pow(2).mean() for s, t in zip(student, teacher, strict=True)
    )  # type: ignore[return-value]


@register_objective("at")
class AttentionTransfer(Objective):
    """``weight * at_loss`` (:func:`attention`, :func:`at_loss`), term ``at``, over the pairs
    ``student_layers[g]`` / ``teacher_layers[g]`` (null: the networks' ``feature_layers``); a pair
    of unequal spatial sizes is compared at the smaller one, the larger feature map average-pooled
    (square maps whose sides divide, :func:`distill.losses.aligned_size`; any other pair is
    refused at setup). The teacher's attention maps (32^2 + 16^2 + 8^2 = 1,344 values per image for
    the WRN groups) are one teacher output, memoized like the logits."""

    Config = ATConfig
    teacher = ("at",)
    hooks_student = True

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        c = loss.at
        check_domain("at.weight", c.weight, finite(c.weight) and c.weight >= 0, "a number >= 0")
        check_domain("at.p", c.p, finite(c.p) and c.p > 0, "a number > 0")
        if c.student_layers is not None and c.teacher_layers is not None:
            _check_pairing(c.student_layers, c.teacher_layers)

    def __init__(self, loss: LossConfig, student: nn.Module, teacher: nn.Module) -> None:
        super().__init__(loss, student, teacher)
        c = self.cfg
        s_layers = declared_layers(student, c.student_layers, "loss.at.student_layers")
        t_layers = declared_layers(teacher, c.teacher_layers, "loss.at.teacher_layers")
        if c.student_layers is None and c.teacher_layers is None:
            # both declared: networks with different stage counts pair their last stages
            n = min(len(s_layers), len(t_layers))
            s_layers, t_layers = s_layers[len(s_layers) - n :], t_layers[len(t_layers) - n :]
        self.student_layers, self.teacher_layers = s_layers, t_layers
        _check_pairing(self.student_layers, self.teacher_layers)
        check_layers(student, self.student_layers, "at.student_layers")
        check_layers(teacher, self.teacher_layers, "at.teacher_layers")
        s_shapes = layer_shapes(student, self.student_layers)
        t_shapes = layer_shapes(teacher, self.teacher_layers)
        self.sizes: list[tuple[int, int]] = []
        for s_layer, t_layer in zip(self.student_layers, self.teacher_layers, strict=True):
            s, t = s_shapes[s_layer], t_shapes[t_layer]
            if len(s) != 3 or len(t) != 3:
                raise LossConfigError(
                    f"loss.at pairs {s_layer} {(1, *s)} with {t_layer} {(1, *t)}: attention "
                    "transfer needs feature maps (B, C, h, w)"
                )
            try:
                self.sizes.append(aligned_size(s[1:], t[1:]))
            except LossConfigError as err:
                raise LossConfigError(
                    f"loss.at pairs {s_layer} ({s[1]}x{s[2]}) with {t_layer} ({t[1]}x{t[2]}): "
                    f"they cannot be aligned by average pooling ({err}); pair layers whose map "
                    "sizes divide each other (loss.at.student_layers / loss.at.teacher_layers)"
                ) from None

    def teacher_outputs(self) -> list[TeacherOutput]:
        p, sizes = self.cfg.p, self.sizes

        def compute(features: list[Tensor], logits: Tensor) -> Tensor:
            maps = [attention(f, p, size) for f, size in zip(features, sizes, strict=True)]
            return torch.cat(maps, 1)

        description = {"layers": list(self.teacher_layers), "sizes": sizes, "p": p}
        return [TeacherOutput("at", self.teacher_layers, compute, description)]

    def terms(
        self,
        student: StudentOutputs,
        teacher: Mapping[str, Tensor],
        batch: Mapping[str, Any],
        epoch: int,
    ) -> list[Term]:
        p = self.cfg.p
        s_maps = [
            attention(student.features[layer], p, size)
            for layer, size in zip(self.student_layers, self.sizes, strict=True)
        ]
        t_maps = teacher["at"].split([h * w for h, w in self.sizes], dim=1)
        return [Term("at", at_loss(s_maps, t_maps), self.cfg.weight)]


def _check_pairing(student_layers: Sequence[str], teacher_layers: Sequence[str]) -> None:
    if not student_layers or len(student_layers) != len(teacher_layers):
        raise LossConfigError(
            f"loss.at.student_layers {list(student_layers)} and loss.at.teacher_layers "
            f"{list(teacher_layers)} must pair layers one to one (at least one); set both to "
            "lists of equal length, e.g. loss.at.teacher_layers=[<one teacher layer per student "
            "layer>]"
        )
