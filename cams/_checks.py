"""Argument validation shared by the CAM methods and the Shapley estimator: short errors that
name the argument and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "TargetsLike",
    "check_choice",
    "check_input",
    "check_positive_int",
    "check_range",
    "check_targets",
    "resolve_target_layer",
]

TargetsLike = Tensor | int | Sequence[int] | None


def check_positive_int(name: str, value: Any, *, optional: bool = False) -> Any:
    """``value`` if it is an int ≥ 1 (or ``None`` when ``optional``), else a short
    ``ValueError`` naming ``name``."""
    if optional and value is None:
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        kind = "a positive int or None" if optional else "a positive int"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return value


def resolve_target_layer(model: nn.Module, target_layer: nn.Module | str) -> tuple[str, nn.Module]:
    """``(dotted name, module)``; unknown names list close candidates."""
    if isinstance(target_layer, nn.Module):
        for name, module in model.named_modules():
            if module is target_layer:
                return name, module
        raise ValueError("target_layer is not a submodule of the model")
    if not isinstance(target_layer, str):
        raise TypeError(
            f"target_layer must be a module or a dotted name, got {type(target_layer).__name__}"
        )
    modules = dict(model.named_modules())
    if target_layer in modules:
        return target_layer, modules[target_layer]
    close = difflib.get_close_matches(target_layer, [n for n in modules if n], n=5, cutoff=0.5)
    hint = f"close candidates: {', '.join(close)}" if close else "see model.named_modules()"
    raise ValueError(f"unknown target layer {target_layer!r}; {hint}")


def check_choice(kind: str, value: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a short ``ValueError``."""
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(choices)}")
    return value


def check_input(x: Any) -> None:
    """``x`` must be a finite floating tensor (B, C, H, W)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be 4-D (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or inf")


def check_targets(targets: TargetsLike, batch: int, device: torch.device) -> Tensor | None:
    """Targets as a long tensor (B,) on ``device`` (range is checked after the forward).

    One class for the whole batch may be a Python or numpy integer or a 0-d integer tensor."""
    if targets is None:
        return None
    if isinstance(targets, bool):
        raise TypeError("targets must be class indices, got a bool")
    if not isinstance(targets, Tensor):
        try:
            targets = torch.as_tensor(targets)
        except (TypeError, ValueError, RuntimeError):
            raise TypeError(
                "targets must be class indices (an int, a sequence of ints or an "
                f"integer tensor), got {type(targets).__name__}"
            ) from None
    if targets.dtype == torch.bool or targets.is_floating_point() or targets.is_complex():
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if targets.dim() == 0:
        return torch.full((batch,), int(targets), dtype=torch.long, device=device)
    if tuple(targets.shape) != (batch,):
        raise ValueError(f"targets must have shape ({batch},), got {tuple(targets.shape)}")
    return targets.to(device=device, dtype=torch.long)


def check_range(targets: Tensor, num_classes: int) -> None:
    if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= num_classes):
        raise ValueError(
            f"targets must lie in [0, {num_classes}), got values in "
            f"[{int(targets.min())}, {int(targets.max())}]"
        )
