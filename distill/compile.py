"""``torch.compile`` where it pays: the frozen teacher's no-grad forward.

:func:`maybe_compile_forward` returns a callable for a network that is only ever evaluated
(a frozen teacher: eval mode, ``torch.no_grad()``, weights never change). It compiles the network
with Inductor's *freezing* (parameters and buffers become constants: BatchNorm is folded into the
convolutions and the weights are pre-packed for oneDNN), which is what makes compiling pay on CPU
(measurements in BENCHMARKS.md, "torch.compile on CPU"). The module itself is left uncompiled, so
hooks on it (the teacher's CAM) keep working on the eager module::

    fwd = maybe_compile_forward(teacher.net)     # once, after the weights are loaded
    with torch.no_grad():
        logits = fwd(x)                          # compiled on the first call per input shape

Contract: call ``fwd`` under ``torch.no_grad()`` (or inference mode) with the network in eval
mode; the weights are baked in at the first call, so a later change of the weights (loading
another checkpoint) needs a new ``maybe_compile_forward``. With grad enabled the call runs the
eager module instead (freezing applies to inference graphs only; this avoids a second, unfrozen
compilation).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

__all__ = ["compile_pays", "maybe_compile_forward"]


def compile_pays(device: torch.device | str = "cpu") -> bool:
    """Whether compiling the frozen forward is expected to pay on ``device``: CPU with a working
    Inductor C++ toolchain. (CUDA also benefits, but is not measured here; callers opt in with
    ``enabled=True``.)"""
    if torch.device(device).type != "cpu":
        return False
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        get_cpp_compiler()
    except Exception:  # noqa: BLE001 - no compiler, no compilation
        return False
    return True


class _FrozenForward:
    """``net(x)`` through a compiled, frozen graph under no-grad; eager otherwise."""

    def __init__(self, net: nn.Module, **compile_kwargs: object) -> None:
        self.net = net
        self.compiled = torch.compile(net, **compile_kwargs)

    def __call__(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() or self.net.training:
            return self.net(x)
        from torch._inductor import config

        with config.patch(freezing=True):
            return self.compiled(x)


def maybe_compile_forward(
    net: nn.Module, *, enabled: bool | None = None, **compile_kwargs: object
) -> Callable[[Tensor], Tensor]:
    """A callable computing ``net(x)``, compiled with Inductor freezing when ``enabled``
    (``None``: :func:`compile_pays` for the device of ``net``'s parameters), else ``net``.

    ``compile_kwargs`` go to ``torch.compile`` (e.g. ``dynamic=False``). See the module
    docstring for the contract (no-grad, eval mode, weights fixed after the first call)."""
    if enabled is None:
        param = next(net.parameters(), None)
        enabled = compile_pays(param.device if param is not None else "cpu")
    return _FrozenForward(net, **compile_kwargs) if enabled else net
