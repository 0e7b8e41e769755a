"""Loss terms of explanation-guided distillation.

The student objective is::

    L = classification + alpha * || N(L_s) - N(L_t) ||^2

where ``L_s`` / ``L_t`` are the student's / teacher's class activation maps of the true class,
``N`` a per-sample normalization and the squared norm is summed over positions and averaged over
the batch. When the two maps differ in size both are average-pooled to a common size first
(:func:`aligned_size`, :func:`pool_maps`). The classification part is cross-entropy, or with
Hinton KD the attention-transfer convention ``(1 - beta) * CE + beta * T^2 * KL(p_t^T || p_s^T)``
(KL averaged over the batch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor

import cams
from cams.utils import NORMALIZATIONS


class LossConfigError(ValueError):
    """A loss option is invalid (negative alpha, unknown normalization, mismatched map shapes)."""


def check_alpha(alpha: float) -> float:
    """Return ``alpha`` as float; raise if it is negative or not finite."""
    try:
        value = float(alpha)
    except (TypeError, ValueError):
        value = math.nan
    if isinstance(alpha, bool) or not math.isfinite(value) or value < 0:
        raise LossConfigError(
            f"loss.alpha must be a finite number >= 0, got {alpha!r}; set e.g. loss.alpha=1.0"
        )
    return value


def aligned_size(
    student: Sequence[int], teacher: Sequence[int], map_size: int | None = None
) -> tuple[int, int]:
    """The (h, w) at which maps of sizes ``student`` and ``teacher`` (h, w) are compared.

    ``map_size`` None: the maps' own size when they are equal, else the smaller of two square
    maps whose sides divide (8x8 vs 4x4 -> 4x4); an int ``m``: (m, m), which must divide every
    side. Raises :class:`LossConfigError` saying why any other pair cannot be aligned by average
    pooling (sides that do not divide, ``m`` larger than a map, unequal non-square maps)."""
    s, t = (int(student[0]), int(student[1])), (int(teacher[0]), int(teacher[1]))
    if map_size is not None:
        m = int(map_size)
        for side, (h, w) in (("student", s), ("teacher", t)):
            if m > min(h, w):
                raise LossConfigError(f"loss.map_size={m} is larger than the {side}'s {h}x{w} maps")
            if h % m or w % m:
                raise LossConfigError(
                    f"loss.map_size={m} does not divide the {side}'s {h}x{w} maps"
                )
        return m, m
    if s == t:
        return s
    if s[0] != s[1] or t[0] != t[1]:
        raise LossConfigError(f"{s[0]}x{s[1]} and {t[0]}x{t[1]} maps are not both square")
    small, large = sorted((s[0], t[0]))
    if large % small:
        raise LossConfigError(f"{large}x{large} is not a multiple of {small}x{small}")
    return small, small


def pool_maps(maps: Tensor, size: Sequence[int]) -> Tensor:
    """Maps (B, h, w) average-pooled to ``size`` (h', w') in cells of (h/h', w/w') positions:
    ``P(L)_ij = mean of L over cell (i, j)``; unchanged when already that size."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.adaptive_avg_pool2d(maps.unsqueeze(1), tuple(size)).squeeze(1)


def explanation_loss(
    student_maps: Tensor,
    teacher_maps: Tensor,
    norm: str = "l2",
    size: Sequence[int] | None = None,
) -> Tensor:
    """``mean_b sum_p (N(P(L_s))_bp - N(P(L_t))_bp)^2`` for maps of shape (B, h, w).

    ``P`` average-pools the raw maps to ``size`` (:func:`pool_maps`; None or the maps' own size:
    the identity), before the normalization. ``norm`` is one of :data:`cams.utils.NORMALIZATIONS`
    (:func:`cams.normalize`): ``"l2"`` (flatten and divide by the L2 norm, as attention transfer
    does), ``"minmax"`` (per-map rescale to [0, 1]) or ``"none"``. The teacher maps are detached.
    """
    if norm not in NORMALIZATIONS:
        raise LossConfigError(f"unknown map normalization {norm!r}; choose one of {NORMALIZATIONS}")
    if size is not None:
        student_maps, teacher_maps = pool_maps(student_maps, size), pool_maps(teacher_maps, size)
    if student_maps.shape != teacher_maps.shape:
        raise LossConfigError(
            f"student maps {tuple(student_maps.shape)} and teacher maps "
            f"{tuple(teacher_maps.shape)} differ in shape: choose target layers with the same "
            "resolution (loss.student_layer / loss.teacher_layer) or align them (loss.map_size)"
        )
    diff = cams.normalize(student_maps, norm) - cams.normalize(teacher_maps.detach(), norm)
    return diff.flatten(1).pow(2).sum(1).mean()


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """Hinton KD term ``T^2 * KL(softmax(t/T) || softmax(s/T))``, averaged over the batch."""
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    log_p_t = F.log_softmax(teacher_logits.detach() / temperature, dim=1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def map_agreement(
    student_maps: Tensor, teacher_maps: Tensor, size: Sequence[int] | None = None
) -> Tensor:
    """Per-sample cosine similarity of flattened maps, (B,); 0 where a map is all zero. Maps of
    different sizes are compared at ``size`` (default: the smaller one's), average-pooled
    (:func:`pool_maps`)."""
    if size is None and student_maps.shape[-2:] != teacher_maps.shape[-2:]:
        s, t = student_maps.shape[-2:], teacher_maps.shape[-2:]
        size = (min(s[0], t[0]), min(s[1], t[1]))
    if size is not None:
        student_maps, teacher_maps = pool_maps(student_maps, size), pool_maps(teacher_maps, size)
    return F.cosine_similarity(student_maps.flatten(1), teacher_maps.flatten(1), dim=1, eps=1e-12)
