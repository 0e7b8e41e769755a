r"""Shapley values of additive-logit games: the estimator behind Shap-CAM's fast path.

For games whose coalition logits are additive, ``y(S) = y(0) + Σ_{j∈S} u_j`` (a linear head after
a global average pool with per-position contributions), with worth ``U(y(S))_c`` for a
per-sample target class ``c``, :func:`additive_game_shapley` scans each ordering as a running sum
(exp-space for the named utilities, log-space otherwise) and differentiates through a custom
backward that keeps no per-prefix state. One algorithm: the forward scan kernels, their backward
and the autograd function that ties them are kept in one file. Orderings, chunking and the
generic estimators live in :mod:`cams._shapley`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cams._checks import check_positive_int
from cams._shapley import (
    _EXP_SAFE,
    GeneratorLike,
    UtilityFn,
    _add_chunk_marginals_,
    _end_counts,
    _resolve_permutations,
    _Scan,
    utility_fn,
)
from cams.utility import get_utility

__all__ = ["additive_game_shapley"]


# ------------------------------------------------------------------------ additive game


def _check_additive_inputs(base: Tensor, contrib: Tensor, targets: Tensor) -> None:
    if base.ndim != 2 or contrib.ndim != 3:
        raise ValueError(
            "expected base_logits (B, K) and contributions (B, P, K), got "
            f"{tuple(base.shape)} and {tuple(contrib.shape)}"
        )
    b, k = base.shape
    if contrib.shape[0] != b or contrib.shape[2] != k:
        raise ValueError(
            f"contributions {tuple(contrib.shape)} do not match base_logits {tuple(base.shape)}"
        )
    if targets.shape != (b,) or targets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"targets must be an integer tensor of shape ({b},)")
    if b and (targets.min() < 0 or targets.max() >= k):
        raise ValueError(f"targets must lie in [0, {k})")


def _relative_logits(logits: Tensor, targets: Tensor) -> Tensor:
    """``logits - logits[target]`` with the target column removed: ``(B, ..., K-1)``."""
    k = logits.shape[-1]
    idx = targets.view(-1, *([1] * (logits.ndim - 1)))
    target = logits.gather(-1, idx.expand(*logits.shape[:-1], 1))
    keep = torch.arange(k - 1, device=logits.device).expand(targets.shape[0], k - 1)
    keep = keep + (keep >= targets.unsqueeze(1)).long()  # skip the target column
    keep = keep.view(targets.shape[0], *([1] * (logits.ndim - 2)), k - 1)
    return logits.gather(-1, keep.expand(*logits.shape[:-1], k - 1)) - target


def _exp_safe(base_rel: Tensor, contrib_rel: Tensor) -> Tensor:
    """Per sample: every coalition's relative logits and every contribution lie in [-80, 80].

    Then each running product of the exp-space scans (a coalition's ``e^r``) and each factor
    ``e^{±u}`` is a normal float32 number.
    """
    hi = base_rel + contrib_rel.clamp(min=0).sum(1)
    lo = base_rel + contrib_rel.clamp(max=0).sum(1)
    u_max = contrib_rel.abs().amax(dim=(1, 2)) if contrib_rel.shape[1] else hi.new_zeros(len(hi))
    return (hi.amax(-1) <= _EXP_SAFE) & (lo.amin(-1) >= -_EXP_SAFE) & (u_max <= _EXP_SAFE)


def _default_chunk(batch: int, n_classes: int) -> int:
    """Orderings per chunk so that one scan state holds about 2^19 elements (2 MB in float32):
    large enough that per-op threading overhead does not dominate (timings in BENCHMARKS.md)."""
    return max(1, min(1024, (1 << 19) // max(1, batch * n_classes)))


def additive_game_shapley(
    base_logits: Tensor,
    contributions: Tensor,
    targets: Tensor,
    utility: str | UtilityFn = "prob",
    n_permutations: int = 10_000,
    *,
    antithetic: bool = False,
    generator: GeneratorLike = None,
    chunk_size: int | None = None,
    permutations: Tensor | None = None,
    num_threads: int | None = 1,
) -> Tensor:
    r"""Shapley values of the additive-logit game, by permutation sampling.

    Sample ``b``'s game on ``P`` players has coalition logits
    :math:`y_b(S) = y_b(0) + \sum_{j \in S} u_{b,j}` and worth
    :math:`v_b(S) = U(y_b(S))_{c_b}`.  Along an ordering the prefix logits are one running
    sum of the permuted contributions, so an ordering costs ``P - 1`` vector updates.

    * ``"logit"`` is a linear game: every ordering gives :math:`\phi_{b,j} = u_{b,j,c}`,
      returned exactly (no sampling).
    * ``"prob"`` / ``"logprob"`` / ``"rest"`` use relative logits
      :math:`r_k = y_k - y_c` (``k != c``) and :math:`s = \sum_{k \ne c} e^{r_k}`:
      ``prob`` = :math:`1/(1+s)`, ``logprob`` = :math:`-\log(1+s)`, ``rest`` =
      :math:`y_c - \log(1+s)` (its linear part :math:`u_{j,c}` is added exactly).
      The running state is the product :math:`e^{r(S)}` (no ``exp`` per prefix); samples
      whose coalition relative logits could leave ``[-80, 80]`` use the log-space path.
    * A callable ``utility(logits (..., K), targets (...,)) -> (...)`` runs the log-space
      path on full logits (autograd through the callable in backward).

    The same orderings are used for every sample, so a sample's values do not depend on the
    rest of the batch.  Efficiency, :math:`\sum_j \phi_{b,j} = v_b(N) - v_b(0)`, holds up to
    float rounding.  Differentiable w.r.t. ``base_logits`` and ``contributions`` (first
    order; a custom autograd Function recomputes each chunk in backward, so memory stays
    bounded by one chunk); double backward is not supported.

    Cost: per ordering ``P - 1`` steps of a gather, a product and a sum over ``(chunk, K-1, B)``
    tensors (memory-bound, many small ops).  On CPU the scans run with ``num_threads`` intra-op
    threads (default 1: with many small ops, an OpenMP barrier per op can wait for a descheduled
    thread; the measurements behind the default are in BENCHMARKS.md).

    Args:
        base_logits: ``(B, K)`` logits of the empty coalition :math:`y(0)`.
        contributions: ``(B, P, K)`` per-player logit contributions :math:`u_j`.
        targets: ``(B,)`` target classes ``c``.
        utility: a name in :data:`UTILITY_NAMES` or a per-sample callable.
        n_permutations: number of sampled orderings ``n``.
        antithetic: pair every ordering with its reverse.
        generator: ``torch.Generator``, int seed or ``None`` (global RNG).
        chunk_size: orderings per chunk (default: about ``2^19 / (B K)``, at most 1024).
        permutations: explicit ``(n, P)`` orderings; overrides sampling.
        num_threads: CPU intra-op threads for the scans, forward and backward (``None``: keep
            ``torch.get_num_threads()``); the previous setting is restored afterwards.

    Returns:
        ``(B, P)`` Shapley value estimates in the dtype of ``contributions`` (float32 at
        least).
    """
    _check_additive_inputs(base_logits, contributions, targets)
    if isinstance(utility, str):
        get_utility(utility)  # unknown names raise
    dtype = torch.promote_types(contributions.dtype, torch.float32)
    base, contrib = base_logits.to(dtype), contributions.to(dtype)
    targets = targets.long()
    b, p, k = contrib.shape
    perms = _resolve_permutations(
        p, n_permutations, antithetic, generator, permutations, contrib.device
    )
    linear = contrib.gather(2, targets.view(b, 1, 1).expand(b, p, 1)).squeeze(2)
    if utility == "logit":
        return linear
    chunk = chunk_size or _default_chunk(b, k)
    check_positive_int("chunk_size", chunk)
    if num_threads is not None:
        check_positive_int("num_threads", num_threads)
    scan = _Scan(perms, chunk, num_threads)
    if callable(utility):
        return _sampled(base, contrib, targets, scan, utility)
    kind = "prob" if utility == "prob" else "logprob"
    phi = _sampled_named(base, contrib, targets, scan, kind)
    return phi + linear if utility == "rest" else phi


def _sampled_named(
    base: Tensor, contrib: Tensor, targets: Tensor, scan: _Scan, kind: str
) -> Tensor:
    """Route each sample to the exp-space (fast) or log-space (safe) scan."""
    if contrib.shape[2] == 1:  # one class: prob 1 / logprob 0 for every coalition
        return contrib.new_zeros(contrib.shape[:2]) + 0.0 * contrib.sum(2)
    base_rel = _relative_logits(base, targets)
    contrib_rel = _relative_logits(contrib, targets)
    safe = _exp_safe(base_rel.detach(), contrib_rel.detach())
    if bool(safe.all()):
        return _sampled(base_rel, contrib_rel, targets, scan, kind)
    named = utility_fn(kind)
    if not bool(safe.any()):
        return _sampled(base, contrib, targets, scan, named)
    idx_fast, idx_slow = safe.nonzero().squeeze(1), (~safe).nonzero().squeeze(1)
    fast = _sampled(base_rel[idx_fast], contrib_rel[idx_fast], None, scan, kind)
    slow = _sampled(base[idx_slow], contrib[idx_slow], targets[idx_slow], scan, named)
    out = fast.new_empty(contrib.shape[:2])
    return out.index_put((idx_fast,), fast).index_put((idx_slow,), slow)


def _sampled(
    base: Tensor,
    contrib: Tensor,
    targets: Tensor | None,
    scan: _Scan,
    utility: str | UtilityFn,
) -> Tensor:
    r"""Assemble :math:`\hat\phi = (\text{interior} + n_\text{last} v(N) - n_\text{first} v(0))/n`.

    With ``utility`` "prob"/"logprob" the inputs are relative logits (target removed);
    with a callable they are full logits and ``targets`` are passed to it.
    """
    n, p = scan.perms.shape
    v_empty = _end_value(base, targets, utility)
    v_full = _end_value(base + contrib.sum(1), targets, utility)
    first, last = (c.to(contrib) for c in _end_counts(scan.perms, p))
    phi = torch.outer(v_full, last) - torch.outer(v_empty, first)
    if p > 1:
        phi = phi + _InteriorShapley.apply(base, contrib, targets, scan, utility)
    return phi / n


def _end_value(logits: Tensor, targets: Tensor | None, utility: str | UtilityFn) -> Tensor:
    if callable(utility):
        return utility(logits, targets)
    s = logits.exp().sum(-1)
    return 1.0 / (1.0 + s) if utility == "prob" else -torch.log1p(s)


# -------------------------------------------------------------- scan kernels (no autograd)


def _exp_inputs(base: Tensor, contrib: Tensor) -> tuple[Tensor, Tensor]:
    """``e^base`` as ``(K', 1, B)`` and ``e^contrib`` as ``(K', P, B)`` for the exp-space scans."""
    return base.exp().t().unsqueeze(1).contiguous(), contrib.exp().permute(2, 1, 0).contiguous()


def _exp_scan_marginals(
    e_base: Tensor, e_contrib: Tensor, perms: Tensor, kind: str, part: Tensor
) -> Tensor:
    r"""Walk the orderings in exp space and add their interior marginals to ``part`` ``(P, B)``.

    ``e_base``: ``(K', 1, B)``; ``e_contrib``: ``(K', P, B)``; ``perms``: ``(C, P)``.  The running
    state :math:`e^{r(\mathrm{Pre}_t)}` is laid out ``(K', C, B)``: a step gathers the added
    players' factors into a reused buffer, multiplies in place and sums ``K'`` contiguous slabs
    to :math:`s_t = \sum_k e^{r_k}` (contiguous slabs).  Player ``pi_t`` gets
    ``v(Pre_{t+1}) - v(Pre_t)`` (end values taken as 0, see :func:`_sampled`), added step by
    step so no ``(P, C, B)`` array is built.
    """
    cols = perms.t().contiguous()  # cols[t]: player added at step t of every ordering
    state = e_contrib.index_select(1, cols[0]).mul_(e_base)
    buf = torch.empty_like(state)
    prev = _named_value(state.sum(0), kind)  # v(Pre_1), (C, B)
    cur, marg = torch.empty_like(prev), torch.empty_like(prev)
    part.index_add_(0, cols[0], prev)
    for t in range(1, cols.shape[0] - 1):
        torch.index_select(e_contrib, 1, cols[t], out=buf)
        _named_value(torch.sum(state.mul_(buf), 0, out=cur), kind)  # v(Pre_{t+1})
        part.index_add_(0, cols[t], torch.sub(cur, prev, out=marg))
        prev, cur = cur, prev
    return part.index_add_(0, cols[-1], prev, alpha=-1)


def _log_scan(base: Tensor, contrib: Tensor, perms: Tensor) -> Tensor:
    """Prefix logits ``(P-1, C, B, K)`` for ``base (B, K)``, ``contrib (P, B, K)``."""
    cols = perms.t().contiguous()
    out = contrib.new_empty((cols.shape[0] - 1, cols.shape[1], *contrib.shape[1:]))
    torch.add(contrib.index_select(0, cols[0]), base, out=out[0])
    for t in range(1, cols.shape[0] - 1):
        torch.add(out[t - 1], contrib.index_select(0, cols[t]), out=out[t])
    return out


def _named_value(s: Tensor, kind: str) -> Tensor:
    """In place: prob ``1/(1+s)``, logprob ``-log(1+s)``."""
    return s.add_(1.0).reciprocal_() if kind == "prob" else s.log1p_().neg_()


def _named_coef(s: Tensor, kind: str) -> Tensor:
    r"""``dv/ds``: prob :math:`-1/(1+s)^2`, logprob :math:`-1/(1+s)`."""
    inv = (1.0 + s).reciprocal_()
    return inv.square_().neg_() if kind == "prob" else inv.neg_()


def _grad_values(grad_phi_t: Tensor, perms: Tensor) -> Tensor:
    """``dL/dv(Pre_t) = g[pi_{t-1}] - g[pi_t]``, ``(P-1, C, N)`` from ``grad_phi_t (P, N)``."""
    plus = grad_phi_t.index_select(0, perms[:, :-1].t().reshape(-1))
    minus = grad_phi_t.index_select(0, perms[:, 1:].t().reshape(-1))
    return (plus - minus).view(perms.shape[1] - 1, perms.shape[0], -1)


def _scatter_prefix_grads(grad_prefix: Tensor, perms: Tensor, grad_contrib: Tensor) -> Tensor:
    r"""Add :math:`\sum_{t > s} \partial L/\partial y(\mathrm{Pre}_t)` to player ``pi_s``.

    ``grad_prefix``: ``(P-1, C, ...)`` w.r.t. the prefix logits of ``Pre_1..Pre_{P-1}``;
    ``grad_contrib``: ``(P, ...)`` accumulated in place.  Returns the gradient w.r.t. the
    base logits summed over orderings, shape ``(...)``.
    """
    p = perms.shape[1]
    acc = torch.zeros_like(grad_prefix[0])
    for s in range(p - 2, -1, -1):
        acc += grad_prefix[s]
        grad_contrib.index_add_(0, perms[:, s], acc)
    return acc.sum(0)


class _InteriorShapley(torch.autograd.Function):
    r"""Unnormalized interior part :math:`\sum_{\pi,t=1}^{P-1} v(\mathrm{Pre}_t)
    (e_{\pi_{t-1}} - e_{\pi_t})`, ``(B, P)``, chunked over orderings; backward recomputes."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        base: Tensor,
        contrib: Tensor,
        targets: Tensor | None,
        scan: _Scan,
        utility: str | UtilityFn,
    ) -> Tensor:
        ctx.save_for_backward(base, contrib)
        ctx.extra = (targets, scan, utility)
        b, p, _ = contrib.shape
        acc = contrib.new_zeros((p, b), dtype=torch.float64)
        with scan.threads():
            if callable(utility):
                contrib_t = contrib.transpose(0, 1).contiguous()
                for perms in scan.parts():
                    logits = _log_scan(base, contrib_t, perms)
                    values = utility(logits, targets.expand(*logits.shape[:-1]))
                    _add_chunk_marginals_(acc, perms, values)
            else:
                e_base, e_contrib = _exp_inputs(base, contrib)
                part = contrib.new_empty((p, b))
                for perms in scan.parts():
                    acc += _exp_scan_marginals(e_base, e_contrib, perms, utility, part.zero_())
        return acc.t().to(contrib.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_phi: Tensor
    ) -> tuple[Tensor | None, ...]:
        base, contrib = ctx.saved_tensors
        targets, scan, utility = ctx.extra
        g_t = grad_phi.t().to(contrib.dtype).contiguous()
        with scan.threads():
            if callable(utility):
                grads = _backward_callable(base, contrib, targets, scan, utility, g_t)
            else:
                grads = _backward_named(base, contrib, scan, utility, g_t)
        return *grads, None, None, None


def _backward_named(
    base: Tensor, contrib: Tensor, scan: _Scan, kind: str, g_t: Tensor
) -> tuple[Tensor, Tensor]:
    r"""Exp-space backward: one reverse scan per chunk, no stored states.

    With :math:`E_t = e^{r(\mathrm{Pre}_t)}` and :math:`w_t = \partial L/\partial
    v(\mathrm{Pre}_t)\, v'(s_t)`, player :math:`\pi_i` gets
    :math:`\partial L/\partial u_{\pi_i} = \sum_{t > i} w_t E_t` per ordering.  Each ordering
    is walked from the grand coalition down (:math:`E_P` is the same for all orderings,
    :math:`E_t = E_{t+1} e^{-u_{\pi_t}}`), so that sum is a running sum.  Every state is a
    coalition's ``e^r`` and every factor ``e^{-u}`` is in range (see :func:`_exp_safe`).
    """
    e_inv = contrib.neg().exp().permute(2, 1, 0).contiguous()  # (K', P, B)
    e_full = (base + contrib.sum(1)).exp().t().unsqueeze(1)  # (K', 1, B)
    grad_contrib = torch.zeros_like(e_inv)
    grad_base = e_full.new_zeros(e_full.shape)
    for perms in scan.parts():
        cols = perms.t().contiguous()
        state = e_full.expand(-1, perms.shape[0], -1).contiguous()
        buf, acc = torch.empty_like(state), torch.zeros_like(state)
        g_next = g_t.index_select(0, cols[-1])
        for t in range(cols.shape[0] - 1, 0, -1):
            torch.index_select(e_inv, 1, cols[t], out=buf)
            state.mul_(buf)  # E_t
            g_prev = g_t.index_select(0, cols[t - 1])
            weight = _named_coef(state.sum(0), kind).mul_(g_prev - g_next)  # w_t
            acc.addcmul_(state, weight)  # sum_{t' >= t} w_t' E_t'
            grad_contrib.index_add_(1, cols[t - 1], acc)
            g_next = g_prev
        grad_base += acc.sum(1, keepdim=True)
    return grad_base.squeeze(1).t(), grad_contrib.permute(2, 1, 0)


def _backward_callable(
    base: Tensor,
    contrib: Tensor,
    targets: Tensor,
    scan: _Scan,
    utility: UtilityFn,
    g_t: Tensor,
) -> tuple[Tensor, Tensor]:
    """Log-space backward through the callable utility by autograd, chunk by chunk."""
    contrib_t = contrib.transpose(0, 1).contiguous()  # (P, B, K)
    grad_contrib = torch.zeros_like(contrib_t)
    grad_base = torch.zeros_like(base)
    for perms in scan.parts():
        logits = _log_scan(base, contrib_t, perms).requires_grad_(True)
        with torch.enable_grad():
            values = utility(logits, targets.expand(*logits.shape[:-1]))
            (grad_prefix,) = torch.autograd.grad(
                values, logits, _grad_values(g_t, perms).to(values.dtype)
            )
        grad_base += _scatter_prefix_grads(grad_prefix, perms, grad_contrib)
    return grad_base, grad_contrib.transpose(0, 1)
