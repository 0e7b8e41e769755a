"""Mixed precision: the network runs in the caller's autocast dtype, the map's own math in fp32.

Under ``torch.autocast`` (bf16 on CPU, fp16 on GPU) the convolutions and linear layers run in
the low-precision dtype; that is where the speed is, and the CAM keeps them there: the main
forward, the gradient rerun of the generic path and Score-CAM's masked inputs run under the
caller's autocast state. Everything a CAM computes *from* the network's outputs runs with
autocast disabled on float32 copies (:func:`upcast`; float64 stays float64):

* the utility ``U`` and its closed-form derivatives (log-softmax, softmax, ``q = dU/dy``,
  ``(d²U/dy²) t``) — bf16 logits carry 8 significant bits (relative rounding up to 2^-9), so
  ``p = softmax(y)`` computed in bf16 would be off by ~0.4 % per class before any map arithmetic;
* the closed-form head (``g``, ``H·A``), whose matmuls autocast would run in the low-precision
  dtype, and the BatchNorm batch statistics held for it (the fused kernel accumulates them in
  float32 too);
* the channel weights — Grad-CAM++'s ``g²/(2g² + ΣA·g³)`` is the most sensitive: in bf16 its
  maps drop to a cosine of 0.54 on a random WRN where float32 keeps 0.99 (tests) — and the
  weighted sum ``Σ_k w_k A_k`` (an einsum, i.e. a bf16 bmm under autocast, rounded to 8 bits);
* ShapleyCAM's ``g − ½ H·A``; Shap-CAM's additive game and estimator, and on its generic path
  the coalition reruns themselves (autocast off): the Shapley values are differences of
  coalition worths, which logits rounded to bf16 cannot resolve (min cosine over seeds 0-2 on
  the test WRN: 0.987 with bf16 reruns, 0.9998 in float32).

On the generic (autograd) path ``∂U/∂A`` is back-propagated through the network's own autocast
ops from a float32 utility; for float16 logits each sample's utility is scaled by
``1 / max_k |∂U/∂y_k|`` first (and the gradient scaled back), so a confident sample's
``prob``/``logprob`` gradient does not underflow float16.

The maps are returned in float32 (float64 for a float64 model). What remains is the rounding
of the network itself (``A`` and the logits are bf16 tensors; on the generic path ``∂U/∂A`` is
back-propagated through the bf16 ops); see BENCHMARKS.md, "CAM maps under bf16 autocast".

:func:`fp32_parts` switches the float32 parts off (``with fp32_parts(False): ...``) to measure
what they buy (tests, ``benchmarks/amp_maps.py``); it is a diagnostic, not an option.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Autocast", "fp32_parts", "upcast"]

_FP32_PARTS = True


@contextmanager
def fp32_parts(enabled: bool) -> Iterator[None]:
    """Diagnostic: with ``False`` inside the block, :func:`upcast` is the identity and
    :meth:`Autocast.exact` leaves autocast on (the map arithmetic runs as autocast decides)."""
    global _FP32_PARTS
    previous, _FP32_PARTS = _FP32_PARTS, bool(enabled)
    try:
        yield
    finally:
        _FP32_PARTS = previous


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32 if it is a lower-precision float (bf16, fp16), else unchanged."""
    if _FP32_PARTS and t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
        return t.float()
    return t


@dataclass(frozen=True)
class Autocast:
    """The caller's autocast state on one device type, captured at the start of a CAM call."""

    device_type: str
    enabled: bool
    dtype: torch.dtype
    cache_enabled: bool

    @classmethod
    def capture(cls, device: torch.device) -> Autocast:
        """The current autocast state for ``device``'s type (off for unsupported types)."""
        kind = device.type
        try:
            enabled = torch.is_autocast_enabled(kind)
            dtype = torch.get_autocast_dtype(kind)
        except RuntimeError:  # a device type without autocast support
            return cls(kind, False, torch.float32, True)
        return cls(kind, enabled, dtype, torch.is_autocast_cache_enabled())

    @property
    def low_precision(self) -> bool:
        """Whether the network runs in a lower-precision dtype under this state."""
        return self.enabled and self.dtype not in (torch.float32, torch.float64)

    @contextmanager
    def network(self) -> Iterator[None]:
        """Evaluations of the network (reruns): the caller's autocast state, re-entered."""
        if not self.enabled:
            yield
            return
        with torch.autocast(self.device_type, dtype=self.dtype, cache_enabled=self.cache_enabled):
            yield

    @contextmanager
    def exact(self) -> Iterator[None]:
        """The map's own arithmetic: autocast off on this device type (no-op when it was off)."""
        if not (self.enabled and _FP32_PARTS):
            yield
            return
        with torch.autocast(self.device_type, enabled=False):
            yield
