"""BatchNorm re-routing used during a CAM computation.

Train-mode BatchNorm couples the samples of a batch through its batch statistics. A CAM is a
per-sample quantity, so every evaluation beyond the main forward must see the *same function of
one sample* that the model applied to the batch: the batch statistics held as constants.
:func:`batchnorm_patch` records the batch statistics of train-mode BatchNorm calls during the
main forward (all of them, or only those after the target layer), and :func:`frozen_batchnorm`
replays them in later evaluations (gradient reruns, ScoreCAM's masked inputs, Shap-CAM's
coalitions) through elementary ops, which also have derivatives of every order. BN modules are
re-routed by temporarily replacing their ``forward`` (an instance attribute, removed afterwards).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from cams._precision import upcast

__all__ = ["Stats", "batchnorm_patch", "frozen_batchnorm", "train_batchnorms"]

Stats = dict[nn.Module, list[tuple[Tensor, Tensor]]]


def train_batchnorms(model: nn.Module) -> list[_BatchNorm]:
    """BatchNorm modules of ``model`` that use batch statistics in their current mode.

    Raises ``ValueError`` for a ``SyncBatchNorm`` that synchronizes across processes: its
    statistics are global, and the per-sample maps would need them recorded across ranks."""
    found = [
        m
        for m in model.modules()
        if isinstance(m, _BatchNorm) and (m.training or m.running_mean is None)
    ]
    if any(isinstance(m, nn.SyncBatchNorm) and _syncs(m) for m in found):
        raise ValueError(
            "CAMs of a model whose SyncBatchNorm layers synchronize across processes "
            "in train mode are not supported (the per-sample maps need the global "
            "batch statistics): use BatchNorm per process (trainer.sync_batchnorm="
            "false) or eval mode"
        )
    return found


def _syncs(m: nn.SyncBatchNorm) -> bool:
    dist = torch.distributed
    return bool(
        m.training
        and dist.is_available()
        and dist.is_initialized()
        and dist.get_world_size(m.process_group) > 1
    )


def _shape(x: Tensor) -> list[int]:
    return [1, -1] + [1] * (x.dim() - 2)


def _normalize(m: _BatchNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``(x - mean) / sqrt(var + eps) · weight + bias`` with per-channel statistics.

    Computed in the statistics' precision (float32 for a bf16/fp16 ``x`` under autocast) and
    returned in ``x``'s dtype, as the fused BatchNorm kernel does."""
    y = (x - mean.view(_shape(x))) * torch.rsqrt(var.view(_shape(x)) + m.eps)
    if m.weight is not None:
        y = y * m.weight.view(_shape(x)) + m.bias.view(_shape(x))
    return y.to(x.dtype)


def _batch_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, biased var)`` per channel, in float32 at least (the fused kernel accumulates a
    bf16/fp16 input in float32 too; 8-bit-mantissa statistics would shift every map)."""
    x = upcast(x)
    dims = [0, *range(2, x.dim())]
    return x.mean(dims), x.var(dims, unbiased=False)


@contextmanager
def _patched(
    modules: list[_BatchNorm], make: Callable[[_BatchNorm, Callable], Callable]
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
def batchnorm_patch(
    modules: list[_BatchNorm],
    after_target: Callable[[], bool],
    record: Stats,
    after: set[nn.Module],
    *,
    detach: bool = True,
    after_target_only: bool = False,
) -> Iterator[None]:
    """Main CAM forward: record the batch statistics ``(mean, biased var)`` of every call of the
    train-mode BatchNorm ``modules`` (:func:`train_batchnorms`) into ``record`` (only the calls
    after the target with ``after_target_only``: reruns that replace the target's output
    recompute the rest, and recording costs a pass over the largest feature maps); modules
    called after the target are added to ``after``. The module's own forward runs unchanged
    (running statistics updated once)."""

    def make(m: _BatchNorm, orig: Callable) -> Callable:
        def forward(x: Tensor) -> Tensor:
            is_after = after_target()
            if is_after:
                after.add(m)
            elif after_target_only:
                return orig(x)
            mean, var = _batch_stats(x)
            record.setdefault(m, []).append(
                (mean.detach(), var.detach()) if detach else (mean, var)
            )
            return orig(x)

        return forward

    with _patched(modules, make):
        yield


@contextmanager
def frozen_batchnorm(
    model: nn.Module, stats: Stats, active: Callable[[], bool] | None = None
) -> Iterator[None]:
    """Every model call inside uses the recorded statistics for the recorded modules (for the
    calls where ``active()`` is true, if given; the others run unchanged and are not counted)."""
    calls: dict[nn.Module, int] = {}
    reset = model.register_forward_pre_hook(lambda *_: calls.clear())

    def make(m: _BatchNorm, orig: Callable) -> Callable:
        def forward(x: Tensor) -> Tensor:
            if active is not None and not active():
                return orig(x)
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
