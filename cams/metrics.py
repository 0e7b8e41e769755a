r"""Explanation metrics of the ShapleyCAM paper as torchmetrics Metrics.

Import explicitly (``import cams`` never imports torchmetrics)::

    from cams.metrics import ADCC, AverageDrop, ExplanationMetrics

For an input ``x`` (normalized, as the model sees it), the class ``c`` (the model's
predicted class by default, as in the author's ``metrics/ADCC.py``, or given targets) and
the explanation ``cam = cam_fn(x, c)`` post-processed as pytorch-grad-cam does it (the
pipeline of the ShapleyCAM paper's evaluation scripts; :func:`scale_maps`): per sample
``(m - min) / (max + 1e-7)``, bilinear resize to the input size (``align_corners=False``,
cv2's ``INTER_LINEAR``), then ``(m - min) / (max + 1e-7)`` again (min-max -> resize ->
min-max; ``BaseCAM.compute_cam_per_layer`` then ``aggregate_multi_layers``, the same in
pytorch-grad-cam 1.5.7 and the author's fork). The second min-max matters whenever bilinear
upsampling misses the low-res extremes (e.g. an interior peak) and changes every metric:
ShapleyCAM at ``block3`` of a random-weight WRN-10-1 on 32 random 32x32 inputs gives AD
0.130 -> 0.109, Com 0.433 -> 0.457, ADCC 0.753 -> 0.744 without -> with it:

* :math:`Y = \mathrm{softmax}(f(x))_c`, :math:`O = \mathrm{softmax}(f(x \odot cam))_c`,
  :math:`D = \mathrm{softmax}(f(x \odot (1 - cam)))_c`;
* Average Drop :math:`AD = \max(0, Y - O) / Y`;
* Increase in Confidence :math:`IC = \mathbb{1}[O > Y]`;
* Average Drop in Deletion :math:`ADD = \max(0, Y - D) / Y`;
* Complexity :math:`Com = \mathrm{mean}_{pixels} |cam|`;
* Coherency :math:`Coh = (\rho(cam, cam') + 1) / 2` with :math:`cam'` the (scaled)
  explanation of :math:`x \odot cam` for the same class and :math:`\rho` the Pearson
  correlation over pixels; :math:`Coh = 0` if either map is constant;
* :math:`ADCC = 3 / (1/\overline{Coh} + 1/(1 - \overline{Com}) + 1/(1 - \overline{AD}))`
  from the dataset-averaged terms (0 when a term is 0).

Every metric reports a fraction in ``[0, 1]`` averaged over samples (multiply by 100 for the
percentages of the papers).  A constant map scales to all zeros.  As in the reference, the
``1e-7`` makes a map whose range is not much larger than ``1e-7`` peak below 1.

Where these definitions follow the author's code (``pytorch-shapley-cam``:
``metrics/ADCC.py``, ``metrics/cam_mult_image.py``, pytorch-grad-cam's ``scale_cam_image``)
rather than the papers' text:

* Complexity is the **mean** of :math:`|cam|` over pixels (``complexity`` divides the sum by
  ``H * W``), not the L1 norm :math:`\lVert cam \rVert_1` of the ADCC definition; only the
  mean lies in ``[0, 1]`` so that ``1 - Com`` is a valid ADCC term.
* The map multiplies the **normalized** input tensor (``multiply_tensor_with_cam``), not the
  ``[0, 1]`` image: a masked-out pixel becomes 0 after normalization, i.e. the normalization's
  mean colour, not black. The same holds for the deletion input :math:`x \odot (1 - cam)`.

Where this module departs from the author's code: no ReLU is applied before scaling
(pytorch-grad-cam applies one; ``cams`` maps with ``relu=True`` are non-negative anyway, a
signed map is scaled as it is), and ADCC combines the dataset means of AD, Coh and Com
(the author's ``ADCC`` returns per-sample ADCC values).

Two ways to update (every metric accepts both)::

    metric.update(model, cam_fn, x)            # class = argmax of model(x)
    metric.update(model, cam_fn, x, targets)   # given classes
    scores = explanation_scores(model, cam_fn, x)   # compute once ...
    for m in metrics: m.update(scores)              # ... feed several metrics

``cam_fn(x, targets) -> (B, h, w)`` is any explanation callable (e.g. a ``cams`` method).
The model is used as found (its train/eval mode is not changed; call ``model.eval()``
first); its forward passes run under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from cams._checks import TargetsLike, check_range, check_targets

__all__ = [
    "ADCC",
    "AverageDrop",
    "AverageDropInDeletion",
    "Coherency",
    "Complexity",
    "ExplanationMetrics",
    "ExplanationScores",
    "IncreaseInConfidence",
    "adcc_from_terms",
    "explanation_scores",
    "scale_maps",
]

CamFn = Callable[[Tensor, Tensor], Tensor]
_FIELDS = ("drop", "deletion", "coherency", "complexity")


@dataclass
class ExplanationScores:
    """Per-sample quantities ``(B,)``; a field is ``None`` when it was not requested.

    ``base`` = Y, ``masked`` = O, ``deleted`` = D (target-class probabilities),
    ``coherency`` and ``complexity`` as in the module docstring (maps scaled by
    :func:`scale_maps`).
    """

    base: Tensor
    masked: Tensor | None = None
    deleted: Tensor | None = None
    coherency: Tensor | None = None
    complexity: Tensor | None = None

    def require(self, name: str) -> Tensor:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"these ExplanationScores were computed without {name!r}")
        return value


SCALE_EPS = 1e-7
"""The ``eps`` of pytorch-grad-cam's ``scale_cam_image``: ``(m - min) / (max(m - min) + eps)``."""


def _scale(flat: Tensor) -> Tensor:
    """``scale_cam_image`` on ``(B, N)`` rows: subtract the row minimum, divide by max + eps."""
    flat = flat - flat.amin(1, keepdim=True)
    return flat / (flat.amax(1, keepdim=True) + SCALE_EPS)


def scale_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """pytorch-grad-cam's post-processing of ``(B, h, w)`` maps, per sample, in torch.

    ``(m - min) / (max + 1e-7)`` (after subtracting ``min``), bilinear resize to ``size``
    (``align_corners=False``, cv2's ``INTER_LINEAR``), then ``(m - min) / (max + 1e-7)`` again:
    ``scale_cam_image(cam, (W, H))`` in ``BaseCAM.compute_cam_per_layer`` followed by
    ``scale_cam_image(result)`` in ``aggregate_multi_layers`` (pytorch-grad-cam 1.5.7, one target
    layer). The second pass matters: bilinear upsampling with half-pixel centers usually does not
    reach the low-res extremes, so without it the map's maximum is below 1. A constant map gives
    zeros. Computed in at least float32 (the eps underflows in half precision); the result has
    that dtype. Agrees with ``scale_cam_image`` to ~1e-6 (cv2 resizes in float32).
    """
    if maps.ndim != 3:
        raise ValueError(f"cam_fn must return maps of shape (B, h, w), got {tuple(maps.shape)}")
    if not torch.isfinite(maps).all():
        raise ValueError("cam_fn returned non-finite values")
    maps = maps.to(torch.promote_types(maps.dtype, torch.float32))
    out = _scale(maps.flatten(1)).view_as(maps)
    if tuple(maps.shape[1:]) != tuple(size):
        out = F.interpolate(out[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return _scale(out.flatten(1)).view_as(out)


def _class_prob(model: nn.Module, x: Tensor, targets: Tensor) -> Tensor:
    with torch.no_grad():
        logits = model(x)
    return torch.softmax(logits.float(), dim=1).gather(1, targets[:, None])[:, 0]


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    r"""Per-sample Pearson correlation of ``(B, N)`` rows; ``nan`` where a row is constant."""
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    va, vb = a.square().sum(1), b.square().sum(1)
    rho = (a * b).sum(1) / (va * vb).sqrt()
    return torch.where((va > 0) & (vb > 0), rho.clamp(-1.0, 1.0), torch.nan)


def coherency_score(cam: Tensor, cam_again: Tensor) -> Tensor:
    """``(rho + 1) / 2`` per sample for ``(B, H, W)`` maps; 0 if either map is constant."""
    rho = _pearson(cam.flatten(1).double(), cam_again.flatten(1).double())
    return torch.nan_to_num((rho + 1.0) / 2.0, nan=0.0).to(cam.dtype)


def explanation_scores(
    model: nn.Module,
    cam_fn: CamFn,
    x: Tensor,
    targets: TargetsLike = None,
    fields: tuple[str, ...] = _FIELDS,
) -> ExplanationScores:
    """Per-sample Y, O, D, coherency and complexity for a batch (see module docstring).

    Args:
        model: classifier returning logits ``(B, K)``.
        cam_fn: ``cam_fn(x, targets) -> (B, h, w)`` explanation maps.
        x: normalized inputs ``(B, C, H, W)``.
        targets: ``(B,)`` classes (an integer tensor, a list or tuple of ints, or one int for
            the batch, as for the CAM methods); ``None`` = the model's predicted class.
        fields: subset of ``("drop", "deletion", "coherency", "complexity")``; ``"drop"``
            gives O (for AD and IC), ``"deletion"`` gives D.
    """
    unknown = set(fields) - set(_FIELDS)
    if unknown:
        raise ValueError(f"unknown fields {sorted(unknown)}; expected a subset of {_FIELDS}")
    if x.ndim != 4:
        raise ValueError(f"x must have shape (B, C, H, W), got {tuple(x.shape)}")
    given = check_targets(targets, x.shape[0], x.device)
    with torch.no_grad():
        logits = model(x)
    if given is None:
        given = logits.argmax(1)
    check_range(given, logits.shape[1])
    targets = given
    base = torch.softmax(logits.float(), dim=1).gather(1, targets[:, None])[:, 0]
    cam = scale_maps(cam_fn(x, targets).detach(), tuple(x.shape[-2:])).to(x.dtype)
    scores = ExplanationScores(base=base)
    if "drop" in fields:
        scores.masked = _class_prob(model, x * cam[:, None], targets)
    if "deletion" in fields:
        scores.deleted = _class_prob(model, x * (1.0 - cam[:, None]), targets)
    if "complexity" in fields:
        scores.complexity = cam.abs().flatten(1).mean(1).float()
    if "coherency" in fields:
        again = scale_maps(cam_fn(x * cam[:, None], targets).detach(), tuple(x.shape[-2:]))
        scores.coherency = coherency_score(cam.float(), again.float())
    return scores


def relative_drop(base: Tensor, after: Tensor) -> Tensor:
    r"""``max(0, Y - after) / Y`` per sample (``Y`` clamped to the smallest positive float)."""
    return (base - after).clamp_min(0.0) / base.clamp_min(torch.finfo(base.dtype).tiny)


def adcc_from_terms(average_drop: Tensor, coherency: Tensor, complexity: Tensor) -> Tensor:
    r"""Harmonic mean :math:`3 / (1/Coh + 1/(1-Com) + 1/(1-AD))`; 0 if any term is 0."""
    terms = torch.stack([coherency, 1.0 - complexity, 1.0 - average_drop]).double()
    if bool((terms <= 0).any()):
        return torch.zeros((), dtype=torch.float32, device=terms.device)
    return (3.0 / terms.reciprocal().sum()).float()


class _ExplanationMetric(Metric):
    """Sums of per-sample terms and a sample count; ``update`` takes scores or computes them."""

    is_differentiable = False
    full_state_update = False
    fields: tuple[str, ...] = _FIELDS
    terms: tuple[str, ...] = ()

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        for name in self.terms:
            self.add_state(
                name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
            )
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        model: nn.Module | ExplanationScores,
        cam_fn: CamFn | None = None,
        x: Tensor | None = None,
        targets: TargetsLike = None,
    ) -> None:
        """``update(model, cam_fn, x, targets=None)`` or ``update(scores)``."""
        if isinstance(model, ExplanationScores):
            if cam_fn is not None or x is not None or targets is not None:
                raise ValueError("pass either precomputed scores alone or (model, cam_fn, x)")
            scores = model
        else:
            if cam_fn is None or x is None:
                raise ValueError("update(model, cam_fn, x, targets=None) needs cam_fn and x")
            scores = explanation_scores(model, cam_fn, x, targets, self.fields)
        for name, value in self._per_sample(scores).items():
            setattr(self, name, getattr(self, name) + value.double().sum())
        self.count += scores.base.shape[0]

    def _per_sample(self, scores: ExplanationScores) -> dict[str, Tensor]:
        """Per-sample values of ``self.terms``."""
        out: dict[str, Tensor] = {}
        if "ad" in self.terms:
            out["ad"] = relative_drop(scores.base, scores.require("masked"))
        if "ic" in self.terms:
            out["ic"] = (scores.require("masked") > scores.base).float()
        if "add" in self.terms:
            out["add"] = relative_drop(scores.base, scores.require("deleted"))
        if "coh" in self.terms:
            out["coh"] = scores.require("coherency")
        if "com" in self.terms:
            out["com"] = scores.require("complexity")
        return out

    def _mean(self, name: str) -> Tensor:
        return (getattr(self, name) / self.count.clamp_min(1)).float()


class AverageDrop(_ExplanationMetric):
    """Mean of ``max(0, Y - O) / Y`` with ``O`` on the normalized input times the map (lower
    is better)."""

    higher_is_better = False
    fields, terms = ("drop",), ("ad",)

    def compute(self) -> Tensor:
        return self._mean("ad")


class IncreaseInConfidence(_ExplanationMetric):
    """Fraction of samples with ``O > Y`` (higher is better)."""

    higher_is_better = True
    fields, terms = ("drop",), ("ic",)

    def compute(self) -> Tensor:
        return self._mean("ic")


class AverageDropInDeletion(_ExplanationMetric):
    """Mean of ``max(0, Y - D) / Y`` with ``D`` on ``x * (1 - cam)`` (higher is better)."""

    higher_is_better = True
    fields, terms = ("deletion",), ("add",)

    def compute(self) -> Tensor:
        return self._mean("add")


class Coherency(_ExplanationMetric):
    """Mean of ``(Pearson(cam, cam of x * cam) + 1) / 2`` (higher is better)."""

    higher_is_better = True
    fields, terms = ("coherency",), ("coh",)

    def compute(self) -> Tensor:
        return self._mean("coh")


class Complexity(_ExplanationMetric):
    """Mean ``|cam|`` of the scaled map (lower is better): the author's code's mean, not the
    L1 norm of the papers' text (see the module docstring)."""

    higher_is_better = False
    fields, terms = ("complexity",), ("com",)

    def compute(self) -> Tensor:
        return self._mean("com")


class ADCC(_ExplanationMetric):
    """ADCC from dataset-averaged AD, Coherency and Complexity (higher is better)."""

    higher_is_better = True
    fields, terms = ("drop", "coherency", "complexity"), ("ad", "coh", "com")

    def compute(self) -> Tensor:
        return adcc_from_terms(self._mean("ad"), self._mean("coh"), self._mean("com"))


class ExplanationMetrics(_ExplanationMetric):
    """All six metrics from one set of forward passes; ``compute()`` returns a dict with
    keys ``average_drop``, ``increase_in_confidence``, ``average_drop_in_deletion``,
    ``coherency``, ``complexity``, ``adcc``."""

    terms = ("ad", "ic", "add", "coh", "com")

    def compute(self) -> dict[str, Tensor]:
        ad, coh, com = self._mean("ad"), self._mean("coh"), self._mean("com")
        return {
            "average_drop": ad,
            "increase_in_confidence": self._mean("ic"),
            "average_drop_in_deletion": self._mean("add"),
            "coherency": coh,
            "complexity": com,
            "adcc": adcc_from_terms(ad, coh, com),
        }
