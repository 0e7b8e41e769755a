"""Shared machinery of every CAM method: the single hooked forward, gradients w.r.t. the hooked
activation (fast closed form or autograd) and the side-effect guard.

**Per-sample maps.** Every map of sample ``i`` is defined from ``U_i`` and ``∂U_i/∂A_i`` alone.
A train-mode BatchNorm after the target couples the samples through its batch statistics, so
``∂(Σ_j U_j)/∂A_i`` is not ``∂U_i/∂A_i``; the batch statistics are then held as constants for
the derivative w.r.t. ``A`` (they stay those of the current batch, and a loss on the maps still
differentiates through them into the parameters). The closed-form head uses the recorded
statistics directly; the generic path reruns the network from the target with them frozen.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from cams._bn import Stats, batchnorm_patch, frozen_batchnorm, train_batchnorms
from cams._checks import (
    TargetsLike,
    check_input,
    check_range,
    check_targets,
    resolve_target_layer,
)
from cams._compat import CompatMeta, call_input, plain_targets
from cams._head import BNStats, Head, detect_head, grad_hvp
from cams._precision import Autocast, upcast
from cams.utility import Utility, get_utility

__all__ = ["BaseCAM", "CAMOutput", "Forward", "compiled", "preserve_state", "weighted_sum"]


class CAMOutput(NamedTuple):
    """What :meth:`BaseCAM.compute` returns: the maps (B, h, w) and the logits of its forward."""

    maps: Tensor
    logits: Tensor


@contextmanager
def preserve_state(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag and every buffer (BN statistics) on exit.

    Buffers are swapped for clones during the block and the untouched originals put back, so no
    tensor that an autograd graph saved is ever modified in place.
    """
    modes = [(m, m.training) for m in model.modules()]
    buffers = [
        (m, name, b) for m in model.modules() for name, b in m._buffers.items() if b is not None
    ]
    for m, name, b in buffers:
        m._buffers[name] = b.clone()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode
        for m, name, b in buffers:
            m._buffers[name] = b


@contextmanager
def rerun_context(model: nn.Module, stats: Stats, amp: Autocast | None = None) -> Iterator[None]:
    """Extra evaluations: eval mode (no dropout noise), the forward's BN statistics, buffers
    kept; the caller's autocast state ``amp`` (``None``: autocast as it is around the block)."""
    with preserve_state(model), frozen_batchnorm(model, stats):
        model.eval()
        if amp is None:
            yield
            return
        with amp.network():
            yield


RNGState = tuple[Tensor, Tensor | None]


def _rng_state(device: torch.device) -> RNGState:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


@contextmanager
def _replayed_rng(state: RNGState, device: torch.device) -> Iterator[None]:
    """Inside: the RNG state of the main forward (same dropout masks); outside: untouched."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], device)
        yield


@dataclass
class Forward:
    """Result of the hooked forward (kept only for the duration of one call).

    ``stats``: recorded train-mode BatchNorm batch statistics; ``coupled``: a train-mode
    BatchNorm ran after the target (samples coupled); ``rng``: RNG state at the forward's start;
    ``amp``: the caller's autocast state (reruns of the network re-enter it).
    """

    logits: Tensor
    activation: Tensor
    synthetic: bool
    stats: Stats
    amp: Autocast
    coupled: bool = False
    rng: RNGState | None = None

    def head_stats(self) -> BNStats | None:
        """The statistics of BatchNorm modules called once (the closed-form head's)."""
        return {m: v[0] for m, v in self.stats.items() if len(v) == 1} or None


class _Capture:
    def __init__(self, name: str, needs_grad: bool) -> None:
        self.name, self.needs_grad = name, needs_grad
        self.count, self.synthetic = 0, False
        self.activation: Tensor | None = None

    def hook(self, module: nn.Module, inputs: Any, output: Any) -> Tensor | None:
        self.count += 1
        if self.count > 1:
            return None
        if not isinstance(output, Tensor) or output.dim() != 4:
            got = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
            raise ValueError(
                f"target layer {self.name!r} must output a 4-D tensor (B, C, h, w), got {got}"
            )
        if self.needs_grad:
            torch.set_grad_enabled(True)  # the head always runs with grad; restored after forward
            if not output.requires_grad:
                output, self.synthetic = output.detach().requires_grad_(), True
        self.activation = output
        return output.clone()  # later in-place ops must not modify the captured activation


class BaseCAM(metaclass=CompatMeta):
    """Base class. Subclasses implement :meth:`_maps` ``(x, fwd, targets, create_graph)``.

    pytorch-grad-cam / torchcam spellings are accepted where they mean the same
    (:mod:`cams._compat`): ``target_layers=[m]``, ``with Method(...) as cam``,
    ``cam(input_tensor=x, targets=[ClassifierOutputTarget(c)])``.

    Args:
        model: a classifier returning logits (B, K).
        target_layer: a submodule or its dotted name in ``model.named_modules()`` (or a
            one-element list of either, as ``target_layers=[m]``).
        utility: "logit", "prob", "logprob" or "rest" (per sample, see :mod:`cams.utility`).
        relu: apply the final ReLU (``False`` returns the signed map).
        fast_path: use the closed-form head when detected (``False`` forces the generic path).
    """

    method_name: ClassVar[str] = ""  # set by cams.registry.register
    quick_options: ClassVar[dict[str, Any]] = {}  # cheap settings for tests, docs, smoke runs
    default_utility: ClassVar[str] = "logit"
    _needs_grad: ClassVar[bool] = True  # maps need ∂U/∂A
    _reruns: ClassVar[bool] = False  # extra evaluations of the network

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str,
        *,
        utility: str | None = None,
        relu: bool = True,
        fast_path: bool = True,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.target_name, self.target_layer = resolve_target_layer(model, target_layer)
        self.utility: Utility = get_utility(utility or self.default_utility)
        self.relu = bool(relu)
        self.fast_path = bool(fast_path)
        self._head: Head | None | bool = False  # False = not detected yet
        self.last_path = ""  # "fast" or "generic": which path the last call used
        self._warned_detached = False  # the no-gradient warning fires once per object

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(target_layer={self.target_name!r}, "
            f"utility={self.utility.name!r}, relu={self.relu})"
        )

    def __enter__(self) -> BaseCAM:
        """``with Method(...) as cam``: nothing to release (no hook outlives a call)."""
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    # ------------------------------------------------------------------ public API
    def __call__(
        self,
        x: Tensor | None = None,
        targets: TargetsLike = None,
        *,
        create_graph: bool = False,
        input_tensor: Tensor | None = None,
        **native: Any,
    ) -> Tensor:
        """Maps (B, h, w) on ``x``'s device; leaves modes, ``.grad`` and buffers as found.

        ``input_tensor`` is pytorch-grad-cam's name for ``x``; its ``aug_smooth`` /
        ``eigen_smooth`` (and torchcam's ``class_idx`` / ``scores``) are refused when set, with
        the cams way to do it. Maps stay at the layer's resolution and unscaled: pytorch-grad-cam's
        array is ``cams.metrics.scale_maps(maps, x.shape[-2:]).numpy()``."""
        x = call_input(x, input_tensor, native)
        with preserve_state(self.model):
            return self._run(x, targets, create_graph=create_graph, keep_logits=False).maps

    def compute(
        self, x: Tensor, targets: TargetsLike = None, *, create_graph: bool = False
    ) -> CAMOutput:
        """One forward that a training loop can reuse: ``CAMOutput(maps, logits)``.

        ``logits`` carry the autograd graph when grad mode is on; in train mode BatchNorm running
        statistics are updated once, as by an ordinary forward.
        """
        return self._run(x, targets, create_graph=create_graph, keep_logits=True)

    # ------------------------------------------------------------------ internals
    def head(self) -> Head | None:
        """The fast-path head after the target layer (traced once), or ``None``."""
        if self._head is False:
            self._head = detect_head(self.model, self.target_name) if self.fast_path else None
        return self._head  # type: ignore[return-value]

    def _fast(self, fwd: Forward) -> tuple[Head | None, BNStats | None]:
        """The closed-form head and the BN statistics it runs with, or ``(None, None)``.

        A train-mode BatchNorm in the head is evaluated with the main forward's batch
        statistics (held constant), which keeps the head per-position."""
        head = self.head()
        stats = fwd.head_stats()
        usable = head is not None and head.usable(fwd.activation, stats, self.model)
        return (head, stats) if usable else (None, None)

    def _run(
        self, x: Tensor, targets: TargetsLike, *, create_graph: bool, keep_logits: bool
    ) -> CAMOutput:
        check_input(x)
        targets = plain_targets(targets, self.utility.name, type(self).__name__)
        tgt = check_targets(targets, x.shape[0], x.device)
        grad_on = torch.is_grad_enabled()
        if grad_on and not create_graph:
            self._warn_detached(x)
        create_graph = bool(create_graph) and grad_on
        fwd = self._forward(
            x, body_graph=create_graph or (keep_logits and grad_on), create_graph=create_graph
        )
        logits = fwd.logits
        if logits.dim() != 2 or logits.shape[0] != x.shape[0]:
            raise ValueError(
                f"the model must return logits (B, K), got shape {tuple(logits.shape)}"
            )
        if tgt is None:
            tgt = logits.detach().argmax(1)
        check_range(tgt, logits.shape[1])
        self.last_path = "generic"
        with fwd.amp.exact():
            maps = upcast(self._maps(x, fwd, tgt, create_graph))
            if self.relu:
                maps = torch.relu(maps)
        frozen = (
            fwd.synthetic
            and not x.requires_grad
            and not any(p.requires_grad for p in self.model.parameters())
        )
        if not create_graph or frozen:
            maps = maps.detach()
        if not (keep_logits and grad_on) or frozen:
            logits = logits.detach()
        return CAMOutput(maps, logits)

    def _warn_detached(self, x: Tensor) -> None:
        """Once per object: maps of a train-mode model computed with autograd on but
        ``create_graph=False`` are detached, so a loss on them trains nothing.

        Not raised in eval mode, under ``torch.no_grad()``, with ``create_graph=True``, or
        when nothing could be differentiated (no parameter and not ``x`` requires grad)."""
        if self._warned_detached or not self.model.training:
            return
        if not x.requires_grad and not any(p.requires_grad for p in self.model.parameters()):
            return
        self._warned_detached = True
        warnings.warn(
            f"{type(self).__name__} at {self.target_name!r}: maps computed on a train-mode "
            "model with autograd on but create_graph=False are detached and carry no gradient "
            "into a loss; pass create_graph=True to train through them, or compute them under "
            "torch.no_grad() / in eval mode when only looking at them",
            UserWarning,
            stacklevel=4,
        )

    def _forward(self, x: Tensor, *, body_graph: bool, create_graph: bool) -> Forward:
        cap = _Capture(self.target_name, self._needs_grad)
        batchnorms = train_batchnorms(self.model)
        stats: Stats = {}
        after: set[nn.Module] = set()
        # gradient reruns recompute the body in train mode; Shap-CAM's fast path needs only the
        # head's statistics; reruns of the whole network (generic Shap-CAM, ScoreCAM) need all
        after_only = self._needs_grad or self.head() is not None
        rng = _rng_state(x.device) if batchnorms else None
        handle = self.target_layer.register_forward_hook(cap.hook)
        prev = torch.is_grad_enabled()
        try:
            with batchnorm_patch(
                batchnorms,
                lambda: cap.count > 0,
                stats,
                after,
                detach=not create_graph,
                after_target_only=after_only,
            ):
                torch.set_grad_enabled(body_graph)
                logits = self.model(x)
        finally:
            torch.set_grad_enabled(prev)
            handle.remove()
        if cap.count != 1 or cap.activation is None:
            raise ValueError(
                f"target layer {self.target_name!r} ran {cap.count} times in one "
                "forward; "
                "choose a layer that runs exactly once"
            )
        if not isinstance(logits, Tensor):
            raise ValueError(f"the model must return a logits tensor, got {type(logits).__name__}")
        amp = Autocast.capture(x.device)
        return Forward(logits, cap.activation, cap.synthetic, stats, amp, bool(after), rng)

    def _held_stats_rerun(
        self, x: Tensor, fwd: Forward, create_graph: bool
    ) -> tuple[Tensor, Tensor]:
        """``(logits, leaf)``: the network rerun with the target's output replaced by ``leaf``
        (the value of ``A``) and the after-target BatchNorm layers frozen to the main forward's
        batch statistics, in the same modes and with the same RNG state (dropout masks).

        ``∂U/∂leaf`` is then the per-sample derivative. With ``create_graph`` the replacement is
        ``leaf + (A - A.detach())``: the same value, and a loss on the maps still reaches ``A``
        (and, through the recorded statistics, the parameters) as in the main forward."""
        a = fwd.activation
        leaf = a.detach().requires_grad_()
        value = leaf + (a - a.detach()) if create_graph else leaf
        fired = False

        def replace(module: nn.Module, inputs: Any, output: Any) -> Tensor:
            nonlocal fired
            fired = True
            torch.set_grad_enabled(True)
            return value.clone()  # in-place ops after the target must not touch ``value``

        prev = torch.is_grad_enabled()
        handle = self.target_layer.register_forward_hook(replace)
        try:
            with (
                preserve_state(self.model),
                _replayed_rng(fwd.rng, x.device),
                frozen_batchnorm(self.model, fwd.stats, active=lambda: fired),
                fwd.amp.network(),
            ):
                torch.set_grad_enabled(create_graph)
                logits = self.model(x)
        finally:
            torch.set_grad_enabled(prev)
            handle.remove()
        return logits, leaf

    def _grads(
        self, x: Tensor, fwd: Forward, targets: Tensor, create_graph: bool, hvp: bool
    ) -> tuple[Tensor, Tensor | None]:
        """Per-sample ``g = ∂U/∂A`` and, if ``hvp``, ``H·A = ∂(g·A)/∂A`` (A held fixed as the
        vector); train-mode BatchNorm statistics after the target are held constant.

        Both come back in float32 (or float64): the closed form runs on float32 copies of ``A``
        and the logits; the autograd path back-propagates a float32 utility through the network's
        own (autocast) ops, and for float16 logits scales each sample's utility by
        ``1 / max_k |∂U/∂y_k|`` (undone afterwards) so that ``g`` does not underflow."""
        head, stats = self._fast(fwd)
        if head is not None:
            self.last_path = "fast"
            a, logits = upcast(fwd.activation), upcast(fwd.logits)
            if not create_graph:
                a, logits = a.detach(), logits.detach()
            with torch.set_grad_enabled(create_graph):
                return grad_hvp(head, a, logits, targets, self.utility, hvp, stats)
        if (create_graph or hvp) and compiled(self.model):
            raise ValueError(
                f"{type(self).__name__} at {self.target_name!r} needs the autograd path here "
                f"({'create_graph=True' if create_graph else 'H·A'}): a double backward through "
                "the network after the target layer, which torch.compile'd graphs do not support "
                "(AOTAutograd). Use an uncompiled model, or a target layer with the closed-form "
                "head (element-wise ops, global average pool, linear; see cams/README.md)"
            )
        logits, wrt = fwd.logits, fwd.activation
        if fwd.coupled:
            logits, wrt = self._held_stats_rerun(x, fwd, create_graph)
        with torch.enable_grad():
            u = self.utility.value(upcast(logits), targets)
            scale = _fp16_scale(self.utility, logits, targets)
            if scale is not None:
                u = u / scale
            (g,) = torch.autograd.grad(
                u.sum(), wrt, create_graph=create_graph or hvp, retain_graph=True, allow_unused=True
            )
            if g is None:
                raise ValueError(
                    f"the model output does not depend on target layer {self.target_name!r}"
                )
            h = None
            if hvp and g.requires_grad:
                (h,) = torch.autograd.grad(
                    g,
                    wrt,
                    grad_outputs=fwd.activation,
                    create_graph=create_graph,
                    retain_graph=True,
                    allow_unused=True,
                )
        g = upcast(g if create_graph else g.detach())
        h = None if not hvp else torch.zeros_like(g) if h is None else upcast(h)
        if scale is not None:
            factor = scale.view(-1, *([1] * (g.dim() - 1)))
            g, h = g * factor, (h * factor if h is not None else None)
        return g, h

    def _maps(self, x: Tensor, fwd: Forward, targets: Tensor, create_graph: bool) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _activation(fwd: Forward, create_graph: bool) -> Tensor:
        """``A`` in float32 (or float64), detached unless ``create_graph``."""
        return upcast(fwd.activation if create_graph else fwd.activation.detach())

    def _rerun(self, fwd: Forward, *, autocast: bool = True) -> Any:
        """Context of extra evaluations; ``autocast=False`` keeps them in float32 (inside the
        map's arithmetic, where autocast is off)."""
        return rerun_context(self.model, fwd.stats, fwd.amp if autocast else None)


def compiled(model: nn.Module) -> bool:
    """Whether ``model`` runs through ``torch.compile`` (``model.compile()`` in place, or the
    wrapper that ``torch.compile(model)`` returns)."""
    return getattr(model, "_compiled_call_impl", None) is not None or hasattr(model, "_orig_mod")


def _fp16_scale(utility: Utility, logits: Tensor, targets: Tensor) -> Tensor | None:
    """Per-sample ``max_k |∂U/∂y_k|`` (detached) for float16 logits, else ``None``.

    Back-propagating ``U / scale`` keeps the largest logit gradient at 1: a confident sample's
    ``prob`` / ``logprob`` gradient (``~1 - p_c``) would otherwise underflow float16 on its way
    to ``A``. The map uses ``g · scale``, which is ``∂U/∂A`` (a constant factor per sample)."""
    if logits.dtype != torch.float16:
        return None
    q = utility.grad(upcast(logits.detach()), targets).abs().amax(1)
    return torch.where(q > 0, q, torch.ones_like(q))


def weighted_sum(weights: Tensor, a: Tensor) -> Tensor:
    """``Σ_k w_k A_k`` for weights (B, K) and activations (B, K, h, w)."""
    return torch.einsum("bk,bkhw->bhw", weights, a)
