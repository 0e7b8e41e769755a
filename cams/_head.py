"""Fast-path detection: is the network after the target layer ``f → global average pool → linear``?

The model is traced once with :mod:`torch.fx` (the target layer kept as a leaf). The fast path
applies when the target node's only consumer is a chain of

* per-position element-wise ops ``f`` (``BatchNorm2d`` with running statistics, or with the
  batch's statistics held constant in train mode, ``ReLU``, ``ReLU6``, ``LeakyReLU``, ``ELU``,
  ``Sigmoid``, ``Tanh``, ``SiLU``, ``Identity``, eval-mode dropout, and the
  functional ``relu``/``sigmoid``/``tanh``/``silu``),
* a global average pool (``AdaptiveAvgPool2d(1)``, ``adaptive_avg_pool2d(·, 1)``, an
  ``AvgPool2d``/``avg_pool2d`` whose kernel covers the map, ``mean`` over the two spatial dims),
* flatten (also ``nn.Flatten``) / view / reshape / squeeze, and
* one ``nn.Linear`` whose output is the model's output,

so nothing computed before the target is used after it. Then the logits are
``y = W · mean_hw f(A) + b`` and every quantity the CAMs need is closed-form (see
:func:`grad_hvp`). Anything else (or a failed trace) uses the generic autograd path.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from cams._precision import upcast
from cams.utility import Utility

__all__ = ["Head", "detect_head", "grad_hvp"]

_ACT_MODULES: dict[type, str] = {
    nn.ReLU: "relu",
    nn.ReLU6: "relu6",
    nn.LeakyReLU: "leaky",
    nn.ELU: "elu",
    nn.Sigmoid: "sigmoid",
    nn.Tanh: "tanh",
    nn.SiLU: "silu",
    nn.Identity: "identity",
    nn.Dropout: "dropout",
    nn.Dropout2d: "dropout",
    nn.BatchNorm2d: "bn",
}
_ACT_FUNCTIONS: dict[Any, str] = {
    F.relu: "relu",
    torch.relu: "relu",
    torch.sigmoid: "sigmoid",
    torch.tanh: "tanh",
    F.silu: "silu",
    F.sigmoid: "sigmoid",
    F.tanh: "tanh",
}
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "tanh": "tanh"}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze}
_RESHAPE_METHODS = {"flatten", "view", "reshape", "squeeze", "contiguous"}
_SPATIAL = ({2, 3}, {-2, -1})


BNStats = dict[nn.Module, tuple[Tensor, Tensor]]  # module -> (batch mean, biased var)


@dataclass(frozen=True)
class _Op:
    kind: str
    module: nn.Module | None = None


@dataclass(frozen=True)
class Head:
    """The head after the target layer: element-wise ops, a global pool (with its kernel if it
    is an average pool whose coverage must be checked at run time) and the final linear layer."""

    ops: tuple[_Op, ...]
    pool_kernel: tuple[int, int] | None
    linear: nn.Linear
    modules: tuple[nn.Module, ...] = ()  # every module called after the target

    def usable(
        self, activation: Tensor, bn_stats: BNStats | None = None, model: nn.Module | None = None
    ) -> bool:
        """Run-time checks: no hooks, modes of BN/dropout, pool covers the map, channel count.

        A BatchNorm that uses batch statistics is per-position only with frozen statistics: it
        is accepted when ``bn_stats`` holds the statistics recorded in the main forward for it.
        Forward/backward hooks on a head module or on ``model``, and global module hooks, can
        change what the head computes and are invisible to the trace: they disable the fast
        path."""
        if hooked(*self.modules, self.linear, *([model] if model is not None else [])):
            return False
        for op in self.ops:
            m = op.module
            if (
                op.kind == "bn"
                and (m.training or m.running_mean is None)
                and (bn_stats is None or m not in bn_stats)
            ):
                return False
            if op.kind == "dropout" and m.training and m.p > 0:
                return False
        h, w = activation.shape[-2:]
        if self.pool_kernel is not None and self.pool_kernel != (h, w):
            return False
        return self.linear.in_features == activation.shape[1]

    def features(self, activation: Tensor, bn_stats: BNStats | None = None) -> Tensor:
        """``f(A)`` (same shape as ``A``); BN uses ``bn_stats`` where given, else running stats."""
        return chain(self.ops, activation, order=0, bn_stats=bn_stats)[0]


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def hooked(*modules: nn.Module) -> bool:
    """Whether any of ``modules`` has forward/backward (pre-)hooks, or global module hooks are
    registered (``torch.nn.modules.module.register_module_forward_hook`` and friends)."""
    glob = torch.nn.modules.module
    if any(getattr(glob, f"_global{name}", None) for name in _HOOK_DICTS):
        return True
    return any(getattr(m, name, None) for m in modules for name in _HOOK_DICTS)


class _Tracer(fx.Tracer):
    def __init__(self, leaf: nn.Module) -> None:
        super().__init__()
        self.leaf = leaf

    def is_leaf_module(self, m: nn.Module, qualified_name: str) -> bool:
        return m is self.leaf or super().is_leaf_module(m, qualified_name)


def _is_shape_query(node: Any) -> bool:
    """``x.size(...)``, ``x.dim()``, ``x.shape``, ``x.ndim`` and items of those (no data)."""
    if not isinstance(node, fx.Node) or node.op not in ("call_method", "call_function"):
        return False
    if node.op == "call_method":
        return node.target in ("size", "dim")
    if node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    return node.target is operator.getitem and _is_shape_query(node.args[0])


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), lambda n: found.append(n) or n)
    return [n for n in found if not _is_shape_query(n)]


def _next(node: fx.Node) -> fx.Node | None:
    users = [u for u in node.users if not _is_shape_query(u)]
    if len(users) != 1 or _tensor_args(users[0]) != [node]:
        return None
    return users[0]


def _pointwise(node: fx.Node, modules: dict[str, nn.Module]) -> _Op | None:
    if node.op == "call_module":
        m = modules[node.target]
        kind = _ACT_MODULES.get(type(m))
        return _Op(kind, m) if kind else None
    if node.op == "call_function" and node.target in _ACT_FUNCTIONS:
        return _Op(_ACT_FUNCTIONS[node.target])
    if node.op == "call_method" and node.target in _ACT_METHODS and len(node.args) == 1:
        return _Op(_ACT_METHODS[node.target])
    return None


def _as_pair(v: Any) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (v[0], v[1])
    return None


def _pool(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[bool, tuple[int, int] | None]:
    """(is a global average pool, kernel to check at run time)."""
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, nn.AdaptiveAvgPool2d):
            return _as_pair(m.output_size) == (1, 1), None
        if isinstance(m, nn.AvgPool2d) and m.divisor_override is None:
            kernel = _as_pair(m.kernel_size)
            return kernel is not None and _as_pair(m.padding) == (0, 0), kernel
        return False, None
    args = list(node.args[1:])
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        size = args[0] if args else node.kwargs.get("output_size")
        return _as_pair(size) == (1, 1), None
    if node.op == "call_function" and node.target is F.avg_pool2d:
        kernel = _as_pair(args[0] if args else node.kwargs.get("kernel_size"))
        padding = args[2] if len(args) > 2 else node.kwargs.get("padding", 0)
        divisor = args[5] if len(args) > 5 else node.kwargs.get("divisor_override")
        return kernel is not None and _as_pair(padding) == (0, 0) and divisor is None, kernel
    if (node.op == "call_method" and node.target == "mean") or (
        node.op == "call_function" and node.target is torch.mean
    ):
        dims = args[0] if args else node.kwargs.get("dim")
        return isinstance(dims, (tuple, list)) and set(dims) in _SPATIAL, None
    return False, None


def _is_reshape(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        m = modules[node.target]
        return isinstance(m, nn.Flatten) and m.start_dim in (1, -3) or isinstance(m, nn.Identity)
    return (node.op == "call_method" and node.target in _RESHAPE_METHODS) or (
        node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS
    )


def _walk(graph: fx.Graph, target: str, modules: dict[str, nn.Module]) -> Head | None:
    starts = [n for n in graph.nodes if n.op == "call_module" and n.target == target]
    if len(starts) != 1:
        return None
    node, ops, seen = _next(starts[0]), [], []
    while node is not None and (op := _pointwise(node, modules)) is not None:
        ops.append(op)
        seen.append(node)
        node = _next(node)
    if node is None:
        return None
    is_pool, kernel = _pool(node, modules)
    if not is_pool:
        return None
    seen.append(node)
    node = _next(node)
    while node is not None and _is_reshape(node, modules):
        seen.append(node)
        node = _next(node)
    if node is None or node.op != "call_module" or not isinstance(modules[node.target], nn.Linear):
        return None
    out = list(node.users)
    if len(out) != 1 or out[0].op != "output" or out[0].args[0] is not node:
        return None
    called = tuple(modules[n.target] for n in seen if n.op == "call_module")
    return Head(tuple(ops), kernel, modules[node.target], called)


def detect_head(model: nn.Module, target_name: str) -> Head | None:
    """The fast-path :class:`Head` after ``target_name``, or ``None`` (also if tracing fails)."""
    modules = dict(model.named_modules())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = _Tracer(modules[target_name]).trace(model)
    except Exception:  # noqa: BLE001 - any untraceable model falls back to the generic path
        return None
    return _walk(graph, target_name, modules)


def chain(
    ops: tuple[_Op, ...], a: Tensor, order: int, bn_stats: BNStats | None = None
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(f(a), f'(a), f''(a))`` of the element-wise chain; ``None`` derivatives mean 1 and 0.

    Composition rule for ``f = φ ∘ g``: ``f' = φ'(g)·g'``, ``f'' = φ''(g)·g'² + φ'(g)·g''``.
    """
    v, d1, d2 = a, None, None
    for op in ops:
        if op.kind in ("identity", "dropout"):
            continue
        if op.kind == "bn":
            m = op.module
            mean, var = (
                bn_stats[m]
                if bn_stats is not None and m in bn_stats
                else (m.running_mean, m.running_var)
            )
            scale = torch.rsqrt(upcast(var) + m.eps)
            if m.weight is not None:
                scale = scale * upcast(m.weight)
            shift = -upcast(mean) * scale
            if m.bias is not None:
                shift = shift + upcast(m.bias)
            scale, shift = scale.view(-1, 1, 1), shift.view(-1, 1, 1)
            v = v * scale + shift
            p1, p2 = scale, None
        else:
            v, p1, p2 = _activation(op, v, order)
        if order >= 2 and p2 is not None:
            d2 = p2 * (d1 * d1 if d1 is not None else 1.0) + (p1 * d2 if d2 is not None else 0.0)
        elif d2 is not None:
            d2 = p1 * d2
        if order >= 1:
            d1 = p1 if d1 is None else p1 * d1
    return v, d1, d2


def _activation(op: _Op, v: Tensor, order: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(φ(v), φ'(v), φ''(v))``; ``φ''`` is ``None`` where it is 0 (piecewise-linear)."""
    kind, m = op.kind, op.module
    if kind in ("relu", "relu6", "leaky"):
        if kind == "leaky":
            slope = torch.where(v > 0, 1.0, m.negative_slope).to(v.dtype)
            return v * slope, slope, None
        mask = (v > 0) if kind == "relu" else ((v > 0) & (v < 6))
        return (v.clamp(min=0) if kind == "relu" else v.clamp(0, 6)), mask.to(v.dtype), None
    if kind == "elu":
        ex = m.alpha * torch.expm1(v.clamp(max=0))
        pos = v > 0
        return (
            torch.where(pos, v, ex),
            torch.where(pos, 1.0, ex + m.alpha).to(v.dtype),
            torch.where(pos, 0.0, ex + m.alpha).to(v.dtype) if order >= 2 else None,
        )
    s = torch.sigmoid(v) if kind in ("sigmoid", "silu") else torch.tanh(v)
    if kind == "sigmoid":
        s1 = s * (1 - s)
        return s, s1, (s1 * (1 - 2 * s) if order >= 2 else None)
    if kind == "tanh":
        s1 = 1 - s * s
        return s, s1, (-2 * s * s1 if order >= 2 else None)
    ds = s * (1 - s)
    return v * s, s + v * ds, (ds * (2 + v * (1 - 2 * s)) if order >= 2 else None)


def grad_hvp(
    head: Head,
    a: Tensor,
    logits: Tensor,
    targets: Tensor,
    utility: Utility,
    hvp: bool,
    bn_stats: BNStats | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Closed-form ``g = ∂U/∂A`` and (if ``hvp``) ``H·A`` for ``y = W · mean_hw f(A) + b``.

    With ``q = ∂U/∂y``, ``G = Wᵀq`` and ``n = h·w``::

        g   = f'(A) ⊙ G / n
        H·A = f'(A) ⊙ Wᵀ (∂²U/∂y²) W s / n  +  f''(A) ⊙ A ⊙ G / n,   s = Σ_hw f'(A) ⊙ A / n
    """
    n = a.shape[-1] * a.shape[-2]
    weight = upcast(head.linear.weight)
    _, d1, d2 = chain(head.ops, a, order=2 if hvp else 1, bn_stats=bn_stats)
    big_g = (utility.grad(logits, targets) @ weight)[:, :, None, None] / n
    g = (big_g if d1 is None else d1 * big_g).expand_as(a)
    if not hvp:
        return g, None
    s = (a if d1 is None else d1 * a).sum((2, 3)) / n
    r = utility.hvp(logits, targets, s @ weight.t())
    out = torch.zeros_like(a)
    if r is not None:
        rr = (r @ weight)[:, :, None, None] / n
        out = out + (rr if d1 is None else d1 * rr)
    if d2 is not None:
        out = out + d2 * a * big_g
    return g, out
