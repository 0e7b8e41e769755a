"""Shap-CAM (Zheng et al., 2022): Shapley values of the target feature map's positions."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from cams._additive_shapley import additive_game_shapley
from cams._base import BaseCAM, CAMOutput, Forward
from cams._bn import train_batchnorms
from cams._checks import (
    TargetsLike,
    check_choice,
    check_input,
    check_positive_int,
    check_range,
    check_targets,
)
from cams._head import BNStats, Head
from cams._precision import upcast
from cams._shapley import exact_shapley, permutation_shapley
from cams.registry import register

__all__ = ["BASELINES", "ShapCAM"]

BASELINES: tuple[str, ...] = ("mean", "global_mean", "zero")
ValueFn = Callable[[Tensor], Tensor]


@register("shapcam")
class ShapCAM(BaseCAM):
    r"""Shap-CAM: the map is the Shapley value of every spatial position of ``A``.

    Players are the ``P = h·w`` positions (all channels of a position move together). A
    coalition ``S`` keeps ``A_j`` for ``j ∈ S`` and replaces the others by the baseline ``b``.
    The paper says absent positions take "the average value of the whole feature map", which
    reads two ways: ``"mean"`` (default) is the per-image, per-channel spatial mean of ``A``
    (our interpretation: it keeps every channel's level); ``"global_mean"`` is one scalar per
    image, the mean of ``A`` over channels and positions; ``"zero"`` is a zero baseline::

        v(S) = U(f_head(A_S), c),   φ_j = E_π[v(Pre_π(j) ∪ {j}) - v(Pre_π(j))]

    estimated by permutation sampling (Castro et al. 2009) with ``n_permutations`` orderings
    (the paper uses 10⁴). Every ordering's marginals telescope to ``v(N) - v(∅)``, so
    ``Σ_j φ_j = v(N) - v(∅)`` holds exactly (up to float rounding).

    **Fast path** (head ``f → global average pool → linear``, see :mod:`cams._head`): a
    coalition's logits are ``y(∅) + Σ_{j∈S} u_j`` with ``y(∅) = W f(b) + c_0`` and
    ``u_j = W (f(A_j) - f(b)) / P``, so only the body runs once and each ordering is one
    running sum (:func:`cams._additive_shapley.additive_game_shapley`). **Generic path**: the
    network is rerun with the target layer's output replaced by the coalition activations (a
    forward hook; a sample's input is fed once per model call and broadcast, or repeated if the
    model needs it), ``batch_size`` coalitions per call — expensive, lower ``n_permutations`` there.
    Reruns happen in eval mode with the main forward's BatchNorm statistics, and in float32 even
    under autocast (the values are differences of coalition worths; see
    :mod:`cams._precision`). On a model without
    batch statistics the generic path processes ``batch_size`` samples at a time, so memory does
    not grow with the batch (with an int ``seed`` the maps equal the whole-batch ones).

    The map is the Shapley values themselves, signed, as in the paper's Eq. 4 (``relu=False``
    by default; ``relu=True`` clips negative contributions like the gradient CAMs).

    Default utility ``"prob"`` (the paper's class probability). The same orderings serve every
    sample; with an int ``seed`` every call draws the same orderings, so a sample's map does not
    depend on the batch it is in (a ``torch.Generator`` advances between calls; ``None`` uses
    the global RNG). Differentiable with ``create_graph=True`` (first order, through ``A``,
    the head parameters and the baseline).

    Args:
        n_permutations: sampled orderings (default 10_000, the paper's value).
        antithetic: pair every ordering with its reverse.
        baseline: "mean" (default), "global_mean" or "zero".
        relu: final ReLU (default ``False``: the signed Shapley values of the paper).
        seed: int (default 0), ``torch.Generator`` or ``None``.
        exact: enumerate all ``2^P`` coalitions instead of sampling (``P <= 24``).
        batch_size: coalitions per network rerun on the generic path (default 256).
        chunk_size: orderings per estimator chunk (``None``: the estimator's default).
        num_threads: CPU threads of the estimator's scans (default 1, see
            :func:`cams._additive_shapley.additive_game_shapley`; ``None``: torch's setting).
    """

    default_utility = "prob"
    quick_options = {"n_permutations": 8}
    _needs_grad = False
    _reruns = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str,
        *,
        utility: str | None = None,
        relu: bool = False,
        n_permutations: int = 10_000,
        antithetic: bool = False,
        baseline: str = "mean",
        seed: int | torch.Generator | None = 0,
        exact: bool = False,
        batch_size: int = 256,
        chunk_size: int | None = None,
        num_threads: int | None = 1,
        fast_path: bool = True,
    ) -> None:
        super().__init__(model, target_layer, utility=utility, relu=relu, fast_path=fast_path)
        check_positive_int("n_permutations", n_permutations)
        check_positive_int("batch_size", batch_size)
        check_positive_int("chunk_size", chunk_size, optional=True)
        check_positive_int("num_threads", num_threads, optional=True)
        if seed is not None and not isinstance(seed, (int, torch.Generator)):
            raise TypeError(f"seed must be an int, a torch.Generator or None, got {seed!r}")
        self.baseline = check_choice("baseline", baseline, BASELINES)
        self.n_permutations, self.antithetic, self.seed = n_permutations, bool(antithetic), seed
        self.exact, self.batch_size, self.chunk_size = bool(exact), batch_size, chunk_size
        self.num_threads = num_threads
        self._expand_input = False  # generic path: repeat the input instead of broadcasting

    # ------------------------------------------------------------------ public helper
    def value_function(self, x: Tensor, targets: TargetsLike = None) -> ValueFn:
        """The game of ``x``: ``value_fn(masks (M, P) bool) -> (B, M)`` worths (no grad).

        For analysis (e.g. exact Shapley values by enumeration). The returned closure keeps
        ``x`` and the activations alive and reruns the network on the generic path.
        """
        check_input(x)
        tgt = check_targets(targets, x.shape[0], x.device)
        with torch.no_grad():
            fwd = self._forward(x, body_graph=False, create_graph=False)
        if tgt is None:
            tgt = fwd.logits.argmax(1)
        check_range(tgt, fwd.logits.shape[1])
        a = upcast(fwd.activation.detach())
        head, stats = self._fast(fwd)
        if head is not None:
            with fwd.amp.exact():
                game = self._additive(head, a, self._base(a), stats)

            def additive_fn(masks: Tensor) -> Tensor:
                with fwd.amp.exact():
                    return self._additive_values(*game, tgt, masks)

            return additive_fn
        generic = self._generic_game(x, a, self._base(a), tgt)

        def value_fn(masks: Tensor) -> Tensor:
            with torch.no_grad(), fwd.amp.exact(), self._rerun(fwd, autocast=False):
                return generic(masks)

        return value_fn

    # ------------------------------------------------------------------ internals
    def _run(
        self, x: Tensor, targets: TargetsLike, *, create_graph: bool, keep_logits: bool
    ) -> CAMOutput:
        """The generic path on a model without batch statistics runs the batch in chunks of
        ``batch_size`` samples: each sample's map is independent of the others then, and peak
        memory does not grow with the batch (one full-batch forward would)."""
        if (
            create_graph
            or self.head() is not None
            or train_batchnorms(self.model)
            or not isinstance(x, Tensor)
            or x.dim() != 4
            or x.shape[0] <= self.batch_size
        ):
            return super()._run(x, targets, create_graph=create_graph, keep_logits=keep_logits)
        tgt = check_targets(targets, x.shape[0], x.device)
        parts = [
            super(ShapCAM, self)._run(
                x[s : s + self.batch_size],
                None if tgt is None else tgt[s : s + self.batch_size],
                create_graph=False,
                keep_logits=keep_logits,
            )
            for s in range(0, x.shape[0], self.batch_size)
        ]
        return CAMOutput(torch.cat([p.maps for p in parts]), torch.cat([p.logits for p in parts]))

    def _base(self, a: Tensor) -> Tensor:
        """The absent positions' value, (B, C, 1, 1)."""
        if self.baseline == "mean":
            return a.mean((2, 3), keepdim=True)
        if self.baseline == "global_mean":
            return a.mean((1, 2, 3), keepdim=True).expand(-1, a.shape[1], 1, 1)
        return torch.zeros_like(a[:, :, :1, :1])

    @staticmethod
    def _additive(
        head: Head, a: Tensor, base: Tensor, stats: BNStats | None
    ) -> tuple[Tensor, Tensor]:
        """``(y(∅) (B, K), u (B, P, K))`` of the additive game."""
        weight, bias = upcast(head.linear.weight), head.linear.bias
        f_base = head.features(base, stats)
        base_logits = f_base.flatten(1) @ weight.t()
        if bias is not None:
            base_logits = base_logits + upcast(bias)
        delta = (head.features(a, stats) - f_base).flatten(2).transpose(1, 2)
        return base_logits, delta @ weight.t() / delta.shape[1]

    def _additive_values(
        self, base_logits: Tensor, contrib: Tensor, targets: Tensor, masks: Tensor
    ) -> Tensor:
        masks = masks.to(device=contrib.device, dtype=contrib.dtype)
        logits = base_logits[:, None] + torch.einsum("mp,bpk->bmk", masks, contrib)
        b, m, k = logits.shape
        return self.utility.value(logits.reshape(b * m, k), targets.repeat_interleave(m)).view(b, m)

    def _rerun_logits(self, x_i: Tensor, acts: Tensor) -> Tensor:
        """Logits with the target layer's output replaced by ``acts`` (m, C, h, w)."""

        def run(inp: Tensor) -> Tensor:
            handle = self.target_layer.register_forward_hook(lambda *_: acts)
            try:
                return self.model(inp)
            finally:
                handle.remove()

        if not self._expand_input:
            try:
                out = run(x_i[None])
                if isinstance(out, Tensor) and out.shape[0] == acts.shape[0]:
                    return out
            except RuntimeError:
                pass
            self._expand_input = True
        return run(x_i[None].expand(acts.shape[0], *x_i.shape))

    def _generic_game(self, x: Tensor, a: Tensor, base: Tensor, targets: Tensor) -> ValueFn:
        h, w = a.shape[-2:]

        def value_fn(masks: Tensor) -> Tensor:
            masks = masks.to(a.device).view(-1, 1, h, w)
            rows = []
            for i in range(a.shape[0]):
                vals = []
                for s in range(0, masks.shape[0], self.batch_size):
                    acts = torch.where(masks[s : s + self.batch_size], a[i], base[i])
                    logits = self._rerun_logits(x[i], acts)
                    target = targets[i].expand(acts.shape[0])
                    vals.append(self.utility.value(upcast(logits), target))
                rows.append(torch.cat(vals))
            return torch.stack(rows)

        return value_fn

    def _maps(self, x: Tensor, fwd: Forward, targets: Tensor, create_graph: bool) -> Tensor:
        a = self._activation(fwd, create_graph)
        b, _, h, w = a.shape
        head, stats = self._fast(fwd)
        with torch.set_grad_enabled(create_graph):
            base = self._base(a)
            if head is not None:
                self.last_path = "fast"
                base_logits, contrib = self._additive(head, a, base, stats)
                if self.exact:
                    phi = exact_shapley(
                        lambda m: self._additive_values(base_logits, contrib, targets, m), h * w
                    )
                else:
                    phi = additive_game_shapley(
                        base_logits,
                        contrib,
                        targets,
                        self.utility.name,
                        self.n_permutations,
                        antithetic=self.antithetic,
                        generator=self.seed,
                        chunk_size=self.chunk_size,
                        num_threads=self.num_threads,
                    )
            else:
                # float32 reruns (autocast stays off): the marginals are differences of
                # coalition worths, which logits rounded to bf16 cannot resolve
                with self._rerun(fwd, autocast=False):
                    game = self._generic_game(x, a, base, targets)
                    if self.exact:
                        phi = exact_shapley(game, h * w)
                    else:
                        phi = permutation_shapley(
                            game,
                            h * w,
                            self.n_permutations,
                            antithetic=self.antithetic,
                            generator=self.seed,
                            chunk_size=self.chunk_size or 64,
                        )
        return phi.view(b, h, w).to(a.dtype)
