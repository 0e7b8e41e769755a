"""Per-sample utilities ``U(y, c)`` of the logits ``y`` (B, K) and targets ``c`` (B,).

Every utility acts on one sample's logits only, so a CAM computed from ``U.sum()`` is
batch-independent. With ``p = softmax(y)`` and ``e_c`` the one-hot target:

======== ============================ ======================== ==========================
name     ``U``                        ``q = dU/dy``            ``H t`` (``H = d²U/dy²``)
======== ============================ ======================== ==========================
logit    ``y_c``                      ``e_c``                  ``0``
prob     ``p_c``                      ``p_c (e_c - p)``        ``p_c [d (d·t) - S t]``
logprob  ``log p_c``                  ``e_c - p``              ``-S t``
rest     ``y_c + log p_c`` (ReST)     ``2 e_c - p``            ``-S t``
======== ============================ ======================== ==========================

with ``d = e_c - p`` and ``S t = p ⊙ t - p (p·t)`` (the softmax Jacobian times ``t``).
The gradients and Hessian-vector products are used by the closed-form fast path; the generic
path differentiates :meth:`Utility.value` with autograd.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["UTILITIES", "Utility", "get_utility"]

UTILITIES: tuple[str, ...] = ("logit", "prob", "logprob", "rest")


def _onehot(targets: Tensor, like: Tensor) -> Tensor:
    return torch.zeros_like(like).scatter_(1, targets[:, None], 1.0)


def _pick(t: Tensor, targets: Tensor) -> Tensor:
    return t.gather(1, targets[:, None])[:, 0]


def _softmax_jvp(p: Tensor, t: Tensor) -> Tensor:
    """``(diag(p) - p pᵀ) t`` per row."""
    return p * t - p * (p * t).sum(1, keepdim=True)


@dataclass(frozen=True)
class Utility:
    """A named per-sample utility with its closed-form derivatives w.r.t. the logits."""

    name: str

    def value(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``U(y, c)`` for logits (..., K) and targets (...,), shape (...,): one value per
        sample (and per coalition, for Shap-CAM's games)."""
        logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if self.name == "logit":
            return logit
        logprob = logit - torch.logsumexp(logits, dim=-1)
        if self.name == "prob":
            return logprob.exp()
        return logprob if self.name == "logprob" else logit + logprob

    def grad(self, logits: Tensor, targets: Tensor) -> Tensor:
        """``q = dU/dy`` per sample, shape (B, K)."""
        onehot = _onehot(targets, logits)
        if self.name == "logit":
            return onehot
        p = torch.softmax(logits, 1)
        if self.name == "prob":
            return _pick(p, targets)[:, None] * (onehot - p)
        if self.name == "logprob":
            return onehot - p
        return 2.0 * onehot - p

    def hvp(self, logits: Tensor, targets: Tensor, t: Tensor) -> Tensor | None:
        """``(d²U/dy²) t`` per sample, shape (B, K); ``None`` when the Hessian is zero."""
        if self.name == "logit":
            return None
        p = torch.softmax(logits, 1)
        st = _softmax_jvp(p, t)
        if self.name != "prob":
            return -st
        d = _onehot(targets, logits) - p
        return _pick(p, targets)[:, None] * (d * (d * t).sum(1, keepdim=True) - st)


def get_utility(name: str | Utility) -> Utility:
    """The :class:`Utility` called ``name``; raises ``ValueError`` for unknown names."""
    if isinstance(name, Utility):
        return name
    if name not in UTILITIES:
        raise ValueError(f"unknown utility {name!r}; choose one of {', '.join(UTILITIES)}")
    return Utility(name)
