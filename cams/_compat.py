"""Thin entry points for pytorch-grad-cam and torchcam habits (see cams/README.md, "Coming from
pytorch-grad-cam or torchcam"): ``target_layers=[module]``, ``with Method(...) as cam``,
``cam(input_tensor=x, targets=[ClassifierOutputTarget(c), ...])``. What is not offered fails
with a short error naming the cams call that does it."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

__all__ = ["CompatMeta", "call_input", "plain_targets"]

# pytorch-grad-cam's classifier targets -> the cams utility each one explains
TARGET_UTILITIES: dict[str, str] = {
    "ClassifierOutputTarget": "logit",
    "ClassifierOutputSoftmaxTarget": "prob",
    "ClassifierOutputReST": "rest",
}

# keywords of the native calls that cams does not take -> what to do instead
NOT_OFFERED: dict[str, str] = {
    "aug_smooth": "cams has no test-time augmentation: average cam(t(x)) over your transforms t",
    "eigen_smooth": "cams has no eigen smoothing: maps are the method's own weighted sums",
    "class_idx": "cams runs the forward itself: cam(x, targets=class_idx), no model(x) before it",
    "scores": "cams runs the forward itself: cam(x, targets=...); cam.compute(x) returns "
    "the logits too",
    "reshape_transform": "cams needs a target layer with a (B, C, h, w) output; reshape "
    "transformer tokens in a wrapper module and target it",
}


CALL_KEYWORDS = ("aug_smooth", "eigen_smooth", "class_idx", "scores")


def one_layer(target_layer: Any, target_layers: Any) -> Any:
    """``target_layers=[m]`` (pytorch-grad-cam) or ``target_layer=[m]`` (torchcam) -> ``m``."""
    if target_layers is not None:
        if target_layer is not None:
            raise TypeError("pass target_layer or target_layers, not both")
        target_layer = target_layers
    if isinstance(target_layer, Sequence) and not isinstance(target_layer, str):
        if len(target_layer) != 1:
            raise ValueError(
                f"cams explains one target layer per CAM object, got {len(target_layer)}; build "
                "one per layer, e.g. cams.GradCAM(model, layer), and average "
                "cams.upsample(maps, x.shape[-2:]) across them"
            )
        (target_layer,) = target_layer
    if target_layer is None:
        raise TypeError("missing target_layer: a submodule or its dotted name, e.g. 'layer4'")
    return target_layer


class CompatMeta(type):
    """Metaclass of :class:`cams.BaseCAM`: rewrites the native constructor keywords
    (``target_layers=[m]``, ``target_layer=[m]``) to cams' ``target_layer=m`` and refuses the
    ones cams does not take with :data:`NOT_OFFERED`'s advice."""

    def __init__(cls, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        init = inspect.signature(cls.__init__)  # help() and IDEs show the class's own signature
        params = list(init.parameters.values())[1:]
        cls.__signature__ = init.replace(parameters=params, return_annotation=init.empty)

    def __call__(cls, model: Any = None, target_layer: Any = None, *args: Any, **kw: Any) -> Any:
        _refuse(kw, constructor=True)
        layer = one_layer(target_layer, kw.pop("target_layers", None))
        return super().__call__(model, layer, *args, **kw)


def _refuse(kwargs: Mapping[str, Any], *, constructor: bool = False) -> None:
    for name in kwargs:
        if name in NOT_OFFERED and (name == "reshape_transform") == constructor:
            raise TypeError(f"{name} is not offered by cams: {NOT_OFFERED[name]}")


def call_input(x: Tensor | None, input_tensor: Tensor | None, native: Mapping[str, Any]) -> Any:
    """The input of ``cam(x)`` / ``cam(input_tensor=x)``; native keywords that are not offered
    (``aug_smooth=True``, ``class_idx=``...) raise with their cams equivalent."""
    _refuse({k: v for k, v in native.items() if v is not False and v is not None})
    unknown = sorted(set(native) - set(CALL_KEYWORDS))
    if unknown:
        raise TypeError(f"unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    if input_tensor is not None:
        if x is not None:
            raise TypeError("pass x or input_tensor, not both")
        return input_tensor
    if x is None:
        raise TypeError("missing input: cam(x) with x a (B, C, H, W) tensor")
    return x


def plain_targets(targets: Any, utility: str, method: str) -> Any:
    """pytorch-grad-cam targets (objects with a ``category``) -> their class indices, if the
    target's output matches ``utility``; anything else is returned unchanged."""
    if not isinstance(targets, Sequence) or isinstance(targets, str) or not targets:
        return targets
    if not any(hasattr(t, "category") for t in targets):
        return targets
    out = []
    for t in targets:
        kind = type(t).__name__
        if not hasattr(t, "category"):
            raise TypeError(
                f"targets mix pytorch-grad-cam targets and {kind}; pass one kind: "
                "class indices or target objects"
            )
        wanted = TARGET_UTILITIES.get(kind, utility)
        if wanted != utility:
            raise ValueError(
                f"{kind} explains utility {wanted!r} but this {method} explains {utility!r}; "
                f"build it with utility={wanted!r}, or pass class indices to explain {utility!r}"
            )
        try:
            out.append(operator.index(t.category))
        except TypeError:
            raise TypeError(
                f"{kind}.category must be one integer class index, got {t.category!r}"
            ) from None
    return out
