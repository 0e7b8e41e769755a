r"""Shapley value estimators for cooperative games (torch only).

A game on ``P`` players is a value function ``v: 2^N -> R``.  Its Shapley values are

.. math::

    \phi_j = \sum_{S \subseteq N \setminus \{j\}} \frac{|S|!\,(P-|S|-1)!}{P!}
             \bigl(v(S \cup \{j\}) - v(S)\bigr)
           = \mathbb{E}_{\pi}\bigl[v(\mathrm{Pre}_\pi(j) \cup \{j\}) - v(\mathrm{Pre}_\pi(j))\bigr],

the second form averaging over uniformly random orderings ``pi`` of the players, where
``Pre_pi(j)`` is the set of players before ``j`` in ``pi`` (Castro, Gomez & Tejada 2009).

Three estimators are provided:

* :func:`exact_shapley` enumerates all ``2^P`` coalitions (``P <= 24``).
* :func:`permutation_shapley` samples orderings for a generic game ``value_fn``.
* :func:`cams._additive_shapley.additive_game_shapley` is the fast path for games whose
  coalition logits are additive, ``y(S) = y(0) + sum_{j in S} u_j`` (a linear head after a
  global average pool with per-position contributions), with worth ``U(y(S))_c`` for a
  per-sample target class ``c``.  It is differentiable with memory bounded by one chunk of
  orderings.

Both sampling estimators use the same orderings for every sample of a batch and evaluate,
per ordering ``pi``, the ``P + 1`` prefix coalitions ``Pre_t = {pi_0, ..., pi_{t-1}}``
(``t = 0..P``); the marginal contribution of ``pi_t`` is ``v(Pre_{t+1}) - v(Pre_t)``.
These telescope, so every ordering's marginals sum to ``v(N) - v(0)`` and the estimate
satisfies efficiency, ``sum_j phi_j = v(N) - v(0)``, up to float rounding.  Given the
same generator (or seed) and ``n_permutations`` both estimators draw the same orderings.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor

from cams._checks import check_positive_int
from cams.utility import UTILITIES, get_utility

__all__ = [
    "UTILITY_NAMES",
    "exact_shapley",
    "permutation_shapley",
    "sample_permutations",
    "shapley_weights",
    "utility_fn",
]

ValueFn = Callable[[Tensor], Tensor]
"""``value_fn(masks: (M, P) bool) -> (..., M)``: worth of each coalition (``True`` = present)."""
UtilityFn = Callable[[Tensor, Tensor], Tensor]
"""``utility(logits: (..., K), targets: (...,) long) -> (...)``: per-sample worth."""
GeneratorLike = torch.Generator | int | None

UTILITY_NAMES = UTILITIES
_EXP_SAFE = 80.0  # |log| bound keeping float32 products of exponentials finite and normal
_MAX_EXACT_PLAYERS = 24


# ----------------------------------------------------------------------------- utilities


def utility_fn(name: str) -> UtilityFn:
    """The named per-sample utility's value function (see :mod:`cams.utility`)."""
    return get_utility(name).value


# ------------------------------------------------------------------------------ sampling


def _as_generator(generator: GeneratorLike) -> torch.Generator | None:
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, int) and not isinstance(generator, bool):
        return torch.Generator().manual_seed(generator)
    raise TypeError(f"generator must be a torch.Generator, an int seed or None, got {generator!r}")


def sample_permutations(
    n_players: int,
    n_permutations: int,
    *,
    antithetic: bool = False,
    generator: GeneratorLike = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Uniformly random orderings of ``n_players`` players, shape ``(n_permutations, P)``.

    Drawn on the CPU (argsort of float64 uniforms) from ``generator`` (a
    ``torch.Generator``, an int seed, or ``None`` for the global RNG), then moved to
    ``device``.  With ``antithetic=True`` rows come in pairs ``(pi, reversed(pi))``; for an
    odd count the last ordering is unpaired.
    """
    check_positive_int("n_players", n_players)
    check_positive_int("n_permutations", n_permutations)
    gen = _as_generator(generator)
    n_draw = (n_permutations + 1) // 2 if antithetic else n_permutations
    noise = torch.rand(n_draw, n_players, generator=gen, dtype=torch.float64)
    perms = noise.argsort(dim=1)
    if antithetic:
        perms = torch.stack([perms, perms.flip(1)], dim=1).reshape(-1, n_players)
        perms = perms[:n_permutations]
    return perms.to(device)


def _resolve_permutations(
    n_players: int,
    n_permutations: int,
    antithetic: bool,
    generator: GeneratorLike,
    permutations: Tensor | None,
    device: torch.device,
) -> Tensor:
    if permutations is None:
        return sample_permutations(
            n_players, n_permutations, antithetic=antithetic, generator=generator, device=device
        )
    perms = torch.as_tensor(permutations, device=device).long()
    expected = torch.arange(n_players, device=device).expand_as(perms)
    if perms.ndim != 2 or perms.shape[1] != n_players or perms.shape[0] < 1:
        raise ValueError(f"permutations must have shape (n, {n_players}), got {tuple(perms.shape)}")
    if not torch.equal(perms.sort(dim=1).values, expected):
        raise ValueError("every row of permutations must be a permutation of range(n_players)")
    return perms


def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + size, n)) for lo in range(0, n, size)]


@contextmanager
def _cpu_threads(num_threads: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with ``num_threads`` intra-op threads on CPU (``None``: unchanged)."""
    previous = torch.get_num_threads()
    if num_threads is None or device.type != "cpu" or num_threads == previous:
        yield
        return
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class _Scan:
    """The sampled orderings, walked in chunks of ``chunk`` with ``num_threads`` CPU threads."""

    def __init__(self, perms: Tensor, chunk: int, num_threads: int | None) -> None:
        self.perms, self.chunk, self.num_threads = perms, chunk, num_threads

    def parts(self) -> Iterator[Tensor]:
        """The orderings chunk by chunk, ``(C, P)`` each."""
        for lo, hi in _chunks(self.perms.shape[0], self.chunk):
            yield self.perms[lo:hi]

    def threads(self) -> Iterator[None]:
        return _cpu_threads(self.num_threads, self.perms.device)


# ------------------------------------------------------------------------------- exact


def shapley_weights(n_players: int) -> Tensor:
    r"""Float64 weights :math:`w_s = s!\,(P-s-1)!/P!` for coalition sizes ``s = 0..P-1``."""
    check_positive_int("n_players", n_players)
    p = n_players
    total = math.factorial(p)
    return torch.tensor(
        [math.factorial(s) * math.factorial(p - s - 1) / total for s in range(p)],
        dtype=torch.float64,
    )


def _coalition_masks(codes: Tensor, n_players: int) -> Tensor:
    """Bit ``j`` of each integer code as a ``(M, P)`` bool mask (player ``j`` present)."""
    bits = torch.arange(n_players, device=codes.device)
    return (codes.unsqueeze(1) >> bits) & 1 == 1


def exact_shapley(value_fn: ValueFn, n_players: int, batch_size: int = 4096) -> Tensor:
    r"""Exact Shapley values by enumerating all ``2^P`` coalitions.

    Uses :math:`\phi_j = \sum_S v(S)\, c_j(S)` with :math:`c_j(S) = w_{|S|-1}` if
    :math:`j \in S` and :math:`-w_{|S|}` otherwise, :math:`w_s = s!(P-s-1)!/P!`.

    Args:
        value_fn: ``value_fn(masks)`` with ``masks`` a ``(M, P)`` bool tensor (``True`` =
            player present) returning values of shape ``(..., M)``.
        n_players: ``P`` (at most 24).
        batch_size: coalitions per ``value_fn`` call.

    Returns:
        ``(..., P)`` Shapley values (accumulated in float64, returned in the values' dtype
        if floating, else float64).
    """
    check_positive_int("n_players", n_players)
    check_positive_int("batch_size", batch_size)
    if n_players > _MAX_EXACT_PLAYERS:
        raise ValueError(f"exact enumeration needs n_players <= {_MAX_EXACT_PLAYERS}")
    w = shapley_weights(n_players)
    w_in = torch.cat([w.new_zeros(1), w])  # w_in[s] = w_{s-1}, used when j in S (s >= 1)
    w_out = torch.cat([w, w.new_zeros(1)])  # w_out[s] = w_s, used when j not in S (s < P)
    phi: Tensor | None = None
    out_dtype = torch.float64
    for lo, hi in _chunks(1 << n_players, batch_size):
        masks = _coalition_masks(torch.arange(lo, hi), n_players)
        values = value_fn(masks)
        size = masks.sum(1)
        coef = torch.where(masks, w_in[size].unsqueeze(1), -w_out[size].unsqueeze(1))
        part = values.to(torch.float64) @ coef.to(values.device)
        phi = part if phi is None else phi + part
        out_dtype = values.dtype if values.is_floating_point() else torch.float64
    assert phi is not None
    return phi.to(out_dtype)


# ------------------------------------------------------------------------- permutations


def _end_counts(perms: Tensor, n_players: int) -> tuple[Tensor, Tensor]:
    """How often each player comes first and last over the orderings, float64 ``(P,)``."""
    first = torch.bincount(perms[:, 0], minlength=n_players).to(torch.float64)
    last = torch.bincount(perms[:, -1], minlength=n_players).to(torch.float64)
    return first, last


def _scatter_interior(acc: Tensor, perms: Tensor, values: Tensor) -> Tensor:
    r"""Add interior prefix values to their players' marginal sums.

    ``values[t-1, c]`` is ``v(Pre_t)`` of ordering ``c`` for ``t = 1..P-1``; it enters the
    marginal of ``pi_{t-1}`` with ``+`` and that of ``pi_t`` with ``-``.  ``acc``: ``(P, N)``
    float64, ``perms``: ``(C, P)``, ``values``: ``(P-1, C, N)``.  Returns the updated ``acc``
    (out of place, for autograd).  Summing in float64 keeps the telescoping exact, so
    efficiency holds to the precision of the values.
    """
    flat = values.reshape(-1, values.shape[-1]).to(acc.dtype)
    plus = perms[:, :-1].t().reshape(-1)
    minus = perms[:, 1:].t().reshape(-1)
    return acc.index_add(0, plus, flat).index_add(0, minus, flat, alpha=-1)


def _add_chunk_marginals_(acc: Tensor, perms: Tensor, values: Tensor) -> Tensor:
    r"""Add one chunk's interior marginals to ``acc`` in place (no autograd).

    Same sums as :func:`_scatter_interior`, as marginals: player ``pi_t`` gets
    ``v(Pre_{t+1}) - v(Pre_t)`` with the end values taken as 0 here.  The differences and the
    chunk's per-player sums stay in the values' dtype (one scatter of ``P * C`` rows instead
    of two float64 ones); only the ``(P, N)`` chunk total is added in float64.
    """
    marg = values.new_empty((values.shape[0] + 1, *values.shape[1:]))
    marg[0] = values[0]
    torch.sub(values[1:], values[:-1], out=marg[1:-1])
    torch.neg(values[-1], out=marg[-1])
    part = values.new_zeros((acc.shape[0], values.shape[-1]))
    part.index_add_(0, perms.t().reshape(-1), marg.view(-1, values.shape[-1]))
    return acc.add_(part)


def _prefix_masks(perms: Tensor) -> Tensor:
    """Interior prefix coalitions ``(P-1, C, P)`` bool: ``[t-1, c, j] = pos_c(j) < t``."""
    n_players = perms.shape[1]
    pos = perms.argsort(dim=1)
    sizes = torch.arange(1, n_players, device=perms.device)
    return pos.unsqueeze(0) < sizes.view(-1, 1, 1)


def permutation_shapley(
    value_fn: ValueFn,
    n_players: int,
    n_permutations: int,
    *,
    antithetic: bool = False,
    generator: GeneratorLike = None,
    chunk_size: int = 64,
    permutations: Tensor | None = None,
) -> Tensor:
    r"""Permutation-sampling Shapley estimate (Castro et al. 2009) for a generic game.

    :math:`\hat\phi_j = \frac1n \sum_{i=1}^n v(\mathrm{Pre}_{\pi_i}(j) \cup \{j\})
    - v(\mathrm{Pre}_{\pi_i}(j))`.  ``v(0)`` and ``v(N)`` are evaluated once; the ``P - 1``
    interior prefixes of ``chunk_size`` orderings go to ``value_fn`` in one call of
    ``chunk_size * (P - 1)`` coalitions.  Each ordering's marginals sum to ``v(N) - v(0)``,
    so efficiency holds up to float rounding.  Differentiable through ``value_fn`` by
    ordinary autograd (the graph of every chunk is kept).

    Args:
        value_fn: ``value_fn(masks: (M, P) bool) -> (..., M)`` values.
        n_players: ``P``.
        n_permutations: number of orderings ``n``.
        antithetic: pair every ordering with its reverse (see :func:`sample_permutations`).
        generator: ``torch.Generator``, int seed or ``None`` (global RNG).
        chunk_size: orderings per ``value_fn`` call.
        permutations: explicit ``(n, P)`` orderings; overrides sampling.

    Returns:
        ``(..., P)`` estimates (accumulated in float64, returned in the values' dtype).
    """
    check_positive_int("n_players", n_players)
    check_positive_int("chunk_size", chunk_size)
    perms = _resolve_permutations(
        n_players, n_permutations, antithetic, generator, permutations, torch.device("cpu")
    )
    ends = value_fn(torch.stack([torch.zeros(n_players), torch.ones(n_players)]).bool())
    lead, dtype = ends.shape[:-1], ends.dtype
    ends = ends.reshape(-1, 2).to(torch.float64)
    first, last = _end_counts(perms, n_players)
    acc = torch.outer(last.to(ends.device), ends[:, 1]) - torch.outer(
        first.to(ends.device), ends[:, 0]
    )
    chunks = _chunks(perms.shape[0], chunk_size) if n_players > 1 else []
    for lo, hi in chunks:
        masks = _prefix_masks(perms[lo:hi]).reshape(-1, n_players)
        values = value_fn(masks).reshape(-1, n_players - 1, hi - lo)
        acc = _scatter_interior(acc, perms[lo:hi].to(ends.device), values.permute(1, 2, 0))
    phi = (acc / perms.shape[0]).t().reshape(*lead, n_players)
    return phi.to(dtype if dtype.is_floating_point else torch.float64)
