"""BatchNorm re-routing used during a CAM computation.

Two problems of train-mode BatchNorm are solved here by temporarily replacing the ``forward`` of
BatchNorm modules (an instance attribute, removed afterwards):

* PyTorch's fused ``batch_norm`` has no 3rd-order derivative, which ShapleyCAM's ``H·A`` inside a
  loss needs. :func:`batchnorm_patch` runs train-mode BatchNorm modules that execute *after* the
  target layer through elementary ops with the same math as ``F.batch_norm``, running-statistics
  update included (``r ← (1 - m) r + m · stat``, unbiased variance, ``momentum=None`` = cumulative
  average), so a forward still updates the statistics exactly once.
* Extra evaluations (ScoreCAM's masked inputs, Shap-CAM's coalitions) must see the same function
  the model applied to the batch: :func:`batchnorm_patch` records every train-mode BatchNorm's
  batch statistics and :func:`frozen_batchnorm` replays them (in eval mode the running statistics
  are used as usual).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["Stats", "batchnorm_patch", "frozen_batchnorm", "train_batchnorms"]

Stats = dict[nn.Module, list[tuple[Tensor, Tensor]]]


def train_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm modules of ``model`` that use batch statistics in their current mode."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)
            and (m.training or m.running_mean is None)]


def _shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _normalize(m: _BatchNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``(x - mean) / sqrt(var + eps) · weight + bias`` with per-channel statistics."""
    y = (x - mean.view(_shape(x))) * torch.rsqrt(var.view(_shape(x)) + m.eps)
    if m.weight is not None:
        y = y * m.weight.view(_shape(x)) + m.bias.view(_shape(x))
    return y


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=False)


def _elementary(m: _BatchNorm, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Train-mode BatchNorm from elementary ops; updates running statistics like the module."""
    n = x.numel() // x.size(1)
    if n <= 1:
        raise ValueError("Expected more than 1 value per channel when training, "
                         f"got input {list(x.shape)}")
    mean, var = _batch_stats(x)
    if m.training and m.track_running_stats and m.running_mean is not None:
        factor = 0.0 if m.momentum is None else m.momentum
        if m.num_batches_tracked is not None:
            m.num_batches_tracked.add_(1)
            if m.momentum is None:
                factor = 1.0 / float(m.num_batches_tracked)
        with torch.no_grad():
            m.running_mean.mul_(1 - factor).add_(mean.detach(), alpha=factor)
            m.running_var.mul_(1 - factor).add_(var.detach() * (n / (n - 1)), alpha=factor)
    return _normalize(m, x, mean, var), mean, var


@contextmanager
def _patched(modules: list[_BatchNorm], make: Callable[[_BatchNorm, Callable], Callable]
             ) -> Iterator[None]:
    saved = []
    for m in modules:
        had = "forward" in m.__dict__
        prev = m.__dict__.get("forward")
        orig = prev if had else type(m).forward.__get__(m)
        saved.append((m, had, prev))
        m.forward = make(m, orig)
    try:
        yield
    finally:
        for m, had, prev in saved:
            if had:
                m.forward = prev
            else:
                del m.forward


@contextmanager
def batchnorm_patch(model: nn.Module, after_target: Callable[[], bool], *, elementary: bool,
                    record: Stats | None, detach: bool = True,
                    record_after_target_only: bool = False) -> Iterator[None]:
    """Main CAM forward: elementary train-mode BN after the target; record batch statistics
    (only of the calls after the target with ``record_after_target_only``: reruns that replace
    the target's output never use the others, and their statistics cost a pass over the
    largest feature maps)."""
    modules = train_batchnorms(model) if (elementary or record is not None) else []

    def make(m: _BatchNorm, orig: Callable) -> Callable:
        def forward(x: Tensor) -> Tensor:
            after = after_target()
            keep = record is not None and (after or not record_after_target_only)
            if elementary and after:
                y, mean, var = _elementary(m, x)
            elif keep:
                mean, var = _batch_stats(x)
                y = orig(x)
            else:
                return orig(x)
            if keep:
                pair = (mean.detach(), var.detach()) if detach else (mean, var)
                record.setdefault(m, []).append(pair)
            return y
        return forward

    with _patched(modules, make):
        yield


@contextmanager
def frozen_batchnorm(model: nn.Module, stats: Stats) -> Iterator[None]:
    """Every model call inside uses the recorded statistics for the recorded modules."""
    calls: dict[nn.Module, int] = {}
    reset = model.register_forward_pre_hook(lambda *_: calls.clear())

    def make(m: _BatchNorm, orig: Callable) -> Callable:
        def forward(x: Tensor) -> Tensor:
            i = calls.get(m, 0)
            calls[m] = i + 1
            mean, var = stats[m][i % len(stats[m])]
            return _normalize(m, x, mean, var)
        return forward

    try:
        with _patched([m for m in stats if isinstance(m, _BatchNorm)], make):
            yield
    finally:
        reset.remove()
