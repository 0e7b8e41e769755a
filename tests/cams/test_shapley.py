"""Values of the Shapley estimators (``cams._shapley``, ``cams._additive_shapley``) against exact
enumeration."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

from cams._additive_shapley import additive_game_shapley
from cams._shapley import (
    exact_shapley,
    permutation_shapley,
    sample_permutations,
    shapley_weights,
    utility_fn,
)

F64 = torch.float64


def rel_l2(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


@dataclass
class HeadGame:
    """A 3x3 feature map, a tiny head (pointwise softplus layer, GAP, linear) and a utility.

    Absent positions take the per-channel spatial mean (Shap-CAM's baseline), so the
    coalition logits are additive: ``base + sum_{j in S} contrib_j``.
    """

    feats: Tensor  # (B, C, 9)
    w1: Tensor
    b1: Tensor
    w2: Tensor
    b2: Tensor
    targets: Tensor
    utility: str = "prob"

    def hidden(self, f: Tensor) -> Tensor:  # (..., C, 9) -> (..., D, 9), pointwise per position
        return torch.nn.functional.softplus(torch.einsum("dc,...cp->...dp", self.w1, f) + self.b1)

    def head(self, f: Tensor) -> Tensor:  # (..., C, 9) -> (..., K)
        return self.hidden(f).mean(-1) @ self.w2.T + self.b2

    @property
    def mean(self) -> Tensor:
        return self.feats.mean(-1, keepdim=True)

    def value_fn(self, masks: Tensor) -> Tensor:  # (M, 9) bool -> (B, M)
        m = masks.to(self.feats.dtype)[None, :, None, :]
        f = self.feats[:, None] * m + self.mean[:, None] * (1 - m)
        targets = self.targets[:, None].expand(-1, masks.shape[0])
        return utility_fn(self.utility)(self.head(f), targets)

    def additive(self) -> tuple[Tensor, Tensor]:
        base = self.head(self.mean.expand_as(self.feats))
        delta = (self.hidden(self.feats) - self.hidden(self.mean)) / self.feats.shape[-1]
        return base, delta.transpose(1, 2) @ self.w2.T


def make_game(
    seed: int = 0, utility: str = "prob", symmetric: bool = True, scale: float = 1.0
) -> HeadGame:
    """Positions 0 and 4 identical (symmetric players), position 8 at the mean (a dummy)."""
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 4, 9, generator=g, dtype=F64)
    if symmetric:
        feats[:, :, 4] = feats[:, :, 0]
        feats[:, :, 8] = feats[:, :, :8].mean(-1)
    return HeadGame(
        feats=feats,
        w1=torch.randn(6, 4, generator=g, dtype=F64),
        b1=torch.randn(6, 1, generator=g, dtype=F64),
        w2=scale * torch.randn(5, 6, generator=g, dtype=F64),
        b2=torch.randn(5, generator=g, dtype=F64),
        targets=torch.tensor([1, 3]),
        utility=utility,
    )


def efficiency_gap(phi: Tensor, value_fn: Callable[[Tensor], Tensor], p: int) -> float:
    ends = value_fn(torch.stack([torch.zeros(p), torch.ones(p)]).bool())
    return float((phi.sum(-1) - (ends[..., 1] - ends[..., 0])).abs().max())


# ------------------------------------------------------------------- exact enumeration


def test_additive_decomposition_of_the_head_game() -> None:
    game = make_game()
    base, contrib = game.additive()
    masks = torch.rand(50, 9, generator=torch.Generator().manual_seed(1)) > 0.5
    logits = base[:, None] + masks.to(F64) @ contrib
    m = masks.to(F64)[None, :, None, :]
    direct = game.head(game.feats[:, None] * m + game.mean[:, None] * (1 - m))
    torch.testing.assert_close(logits, direct, rtol=1e-12, atol=1e-12)


def test_shapley_weights_sum_to_one_per_player() -> None:
    for p in (1, 2, 5, 9):
        w = shapley_weights(p)
        total = sum(math.comb(p - 1, s) * float(w[s]) for s in range(p))
        assert total == pytest.approx(1.0, abs=1e-14)


def test_exact_shapley_closed_forms() -> None:
    w = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], dtype=F64)
    linear = exact_shapley(lambda m: m.to(F64) @ w, 5, batch_size=7)
    torch.testing.assert_close(linear, w, rtol=0, atol=1e-14)

    team = torch.tensor([True, False, True, True, False])  # unanimity game of {0, 2, 3}
    unanimity = exact_shapley(lambda m: (m | ~team).all(1).to(F64), 5)
    torch.testing.assert_close(unanimity, team.to(F64) / 3, rtol=0, atol=1e-14)

    votes = torch.tensor([2.0, 1.0, 1.0], dtype=F64)  # weighted voting [3; 2, 1, 1]
    voting = exact_shapley(lambda m: (m.to(F64) @ votes >= 3).to(F64), 3)
    torch.testing.assert_close(voting, torch.tensor([4 / 6, 1 / 6, 1 / 6], dtype=F64))


def test_exact_shapley_matches_the_subset_formula() -> None:
    game = make_game(symmetric=False)
    phi = exact_shapley(game.value_fn, 9, batch_size=100)
    w = shapley_weights(9)
    j, ref = 5, torch.zeros(2, dtype=F64)
    others = [i for i in range(9) if i != j]
    for size in range(9):
        for subset in itertools.combinations(others, size):
            m = torch.zeros(2, 9, dtype=torch.bool)
            m[0, list(subset)] = True
            m[1] = m[0]
            m[1, j] = True
            v = game.value_fn(m)
            ref += w[size] * (v[:, 1] - v[:, 0])
    torch.testing.assert_close(phi[:, j], ref, rtol=1e-12, atol=1e-14)


def test_exact_symmetry_dummy_and_efficiency() -> None:
    game = make_game()
    phi = exact_shapley(game.value_fn, 9)
    torch.testing.assert_close(phi[:, 0], phi[:, 4], rtol=0, atol=1e-14)
    assert phi[:, 8].abs().max() < 1e-14
    assert efficiency_gap(phi, game.value_fn, 9) < 1e-12


# ------------------------------------------------------------------------ sampling


@pytest.fixture(scope="module")
def head_game() -> tuple[HeadGame, Tensor]:
    game = make_game()
    return game, exact_shapley(game.value_fn, 9)


def test_permutation_shapley_close_to_exact(head_game: tuple[HeadGame, Tensor]) -> None:
    game, exact = head_game
    phi = permutation_shapley(game.value_fn, 9, 20_000, generator=0, chunk_size=2500)
    assert rel_l2(phi, exact) < 0.01
    assert efficiency_gap(phi, game.value_fn, 9) < 1e-5
    assert float((phi[:, 0] - phi[:, 4]).abs().max()) < 0.01 * float(exact.norm())
    assert float(phi[:, 8].abs().max()) < 1e-12  # a dummy's marginals are exactly zero


@pytest.mark.parametrize("utility", ["prob", "logprob", "rest", "logit"])
def test_additive_game_shapley_close_to_exact(
    head_game: tuple[HeadGame, Tensor], utility: str
) -> None:
    game = make_game(utility=utility)
    exact = head_game[1] if utility == "prob" else exact_shapley(game.value_fn, 9)
    base, contrib = game.additive()
    phi = additive_game_shapley(base, contrib, game.targets, utility, 20_000, generator=0)
    assert rel_l2(phi, exact) < 0.01
    assert efficiency_gap(phi, game.value_fn, 9) < 1e-5
    assert float((phi[:, 0] - phi[:, 4]).abs().max()) < 0.01 * float(exact.norm())
    assert float(phi[:, 8].abs().max()) < 1e-12


def test_additive_float32_efficiency(head_game: tuple[HeadGame, Tensor]) -> None:
    game, exact = head_game
    base, contrib = game.additive()
    phi = additive_game_shapley(
        base.float(), contrib.float(), game.targets, "prob", 20_000, generator=0
    )
    assert phi.dtype == torch.float32
    assert efficiency_gap(phi.double(), game.value_fn, 9) < 1e-6  # float64 accumulation
    assert rel_l2(phi.double(), exact) < 0.01


@pytest.mark.parametrize("antithetic", [False, True])
def test_additive_agrees_with_generic_sampler_for_the_same_seed(antithetic: bool) -> None:
    game = make_game(symmetric=False)
    base, contrib = game.additive()
    kw = {"antithetic": antithetic, "generator": 7}
    generic = permutation_shapley(game.value_fn, 9, 301, chunk_size=40, **kw)
    fast = additive_game_shapley(base, contrib, game.targets, "prob", 301, chunk_size=9, **kw)
    assert rel_l2(fast, generic) < 1e-5


def test_named_and_callable_utilities_agree() -> None:
    game = make_game(symmetric=False)
    base, contrib = game.additive()
    for name in ("prob", "logprob", "rest", "logit"):
        named = additive_game_shapley(base, contrib, game.targets, name, 50, generator=3)
        call = additive_game_shapley(base, contrib, game.targets, utility_fn(name), 50, generator=3)
        torch.testing.assert_close(named, call, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("utility", ["prob", "logprob"])
def test_float32_gradients_of_64_players_match_float64_autograd(utility: str) -> None:
    """The reverse exp-space scan (63 divisions per ordering) keeps float32 gradients accurate."""
    g = torch.Generator().manual_seed(7)
    base = torch.randn(4, 10, generator=g, dtype=F64) * 3
    contrib = torch.randn(4, 64, 10, generator=g, dtype=F64) * 0.5
    targets, upstream = torch.tensor([0, 3, 9, 5]), torch.randn(4, 64, generator=g, dtype=F64)

    def grads(b: Tensor, c: Tensor, name: str | Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        b, c = b.clone().requires_grad_(True), c.clone().requires_grad_(True)
        phi = additive_game_shapley(b, c, targets, name, 40, generator=2, chunk_size=16)
        (phi * upstream.to(phi.dtype)).sum().backward()
        assert b.grad is not None and c.grad is not None
        return torch.cat([b.grad.flatten(), c.grad.flatten()]).double()

    fast = grads(base.float(), contrib.float(), utility)
    ref = grads(base, contrib, utility_fn(utility))  # log-space path, plain autograd
    assert rel_l2(fast, ref) < 1e-5


def test_logit_utility_is_exact() -> None:
    game = make_game(utility="logit", symmetric=False)
    base, contrib = game.additive()
    phi = additive_game_shapley(base, contrib, game.targets, "logit", 1)
    torch.testing.assert_close(phi, exact_shapley(game.value_fn, 9), rtol=1e-10, atol=1e-12)


def test_large_logits_route_to_the_log_space_path() -> None:
    """A sample whose coalition logits could overflow exp() gets the same answer as alone."""
    game = make_game(symmetric=False)
    base, contrib = game.additive()
    base = base.clone()
    base[1, 0] = base[1, 3] + 200.0  # relative logit 200: exp() overflows float32
    b32, c32 = base.float(), contrib.float()
    phi = additive_game_shapley(b32, c32, game.targets, "prob", 200, generator=5)
    ref = additive_game_shapley(base, contrib, game.targets, utility_fn("prob"), 200, generator=5)
    assert torch.isfinite(phi).all()
    torch.testing.assert_close(phi.double(), ref, rtol=1e-4, atol=1e-6)


def test_one_large_contribution_with_in_range_coalitions_is_exact() -> None:
    """Every coalition's relative logit is in [-80, 80] but one factor e^{u} would overflow."""
    base = torch.tensor([[0.0, -20.0]])  # target class 0: relative logit -20
    contrib = torch.zeros(1, 3, 2)
    contrib[0, 0, 1] = 100.0  # coalitions holding player 0: relative logit 80
    contrib[0, 2, 1] = -30.0
    all_orders = torch.tensor(list(itertools.permutations(range(3))))
    base.requires_grad_(True)
    phi = additive_game_shapley(base, contrib, torch.tensor([0]), "prob", permutations=all_orders)

    def value(masks: Tensor) -> Tensor:
        logits = base.double() + masks.double() @ contrib[0].double()
        return logits.softmax(-1)[:, 0].unsqueeze(0)

    assert torch.isfinite(phi).all()
    torch.testing.assert_close(phi.double(), exact_shapley(value, 3), rtol=1e-5, atol=1e-7)
    phi.sum().backward()  # efficiency: the sum is v(N) - v(0), a finite gradient
    assert base.grad is not None and torch.isfinite(base.grad).all()


# ------------------------------------------------------------------------- properties


def test_batch_independence_and_seeded_determinism() -> None:
    game = make_game(symmetric=False)
    base, contrib = game.additive()
    base, contrib = base.float(), contrib.float()
    both = additive_game_shapley(base, contrib, game.targets, "prob", 300, generator=11)
    again = additive_game_shapley(base, contrib, game.targets, "prob", 300, generator=11)
    other = additive_game_shapley(base, contrib, game.targets, "prob", 300, generator=12)
    second = additive_game_shapley(
        base[1:], contrib[1:], game.targets[1:], "prob", 300, generator=11
    )
    assert torch.equal(both, again)
    assert not torch.allclose(both, other)
    torch.testing.assert_close(second[0], both[1], rtol=1e-5, atol=1e-7)


def test_antithetic_pairs_reduce_error_on_average() -> None:
    """Over 40 fixed seeds, antithetic orderings give a much smaller mean squared error.

    The target probability stays in the convex part of the sigmoid, so a player's marginal
    grows with its position and an ordering and its reverse err in opposite directions.
    """
    g = torch.Generator().manual_seed(0)
    contrib = torch.randn(1, 9, 4, generator=g, dtype=F64) * 0.1
    contrib[..., 0] += 0.3 * (torch.rand(1, 9, generator=g, dtype=F64) + 0.5)
    base = torch.tensor([[-5.0, 0.0, 0.5, -0.5]], dtype=F64)
    targets = torch.tensor([0])
    prob = utility_fn("prob")
    exact = exact_shapley(lambda m: prob(base + m.to(F64) @ contrib[0], targets.expand(len(m))), 9)

    def mse(antithetic: bool) -> float:
        total = 0.0
        for seed in range(40):
            phi = additive_game_shapley(
                base, contrib, targets, "prob", 20, antithetic=antithetic, generator=seed
            )
            total += float((phi - exact).square().sum())
        return total / 40

    assert mse(True) < 0.5 * mse(False)


def test_sample_permutations() -> None:
    perms = sample_permutations(7, 9, antithetic=True, generator=4)
    assert perms.shape == (9, 7)
    assert torch.equal(perms.sort(1).values, torch.arange(7).expand(9, 7))
    assert torch.equal(perms[1::2], perms[0:8:2].flip(1))
    assert torch.equal(perms, sample_permutations(7, 9, antithetic=True, generator=4))
    explicit = additive_game_shapley(
        torch.zeros(1, 3), torch.randn(1, 7, 3), torch.tensor([2]), "prob", permutations=perms
    )
    assert explicit.shape == (1, 7)


# ----------------------------------------------------------------------- gradients


@pytest.mark.parametrize("utility", ["prob", "logprob", "rest", "callable", "mixed"])
def test_gradcheck(utility: str) -> None:
    g = torch.Generator().manual_seed(2)
    base = torch.randn(3, 4, generator=g, dtype=F64)
    contrib = torch.randn(3, 5, 4, generator=g, dtype=F64)
    targets = torch.tensor([0, 3, 1])
    name: str | Callable[[Tensor, Tensor], Tensor] = utility
    if utility == "callable":
        name = utility_fn("rest")
    if utility == "mixed":  # sample 1 exceeds the exp-safe range -> log-space path
        name, base[1, 0] = "prob", 150.0
    base.requires_grad_(True)
    contrib.requires_grad_(True)

    def fn(b: Tensor, c: Tensor) -> Tensor:
        return additive_game_shapley(b, c, targets, name, 7, generator=1, chunk_size=3)

    assert torch.autograd.gradcheck(fn, (base, contrib))


def test_backward_keeps_no_per_permutation_graph() -> None:
    base = torch.randn(2, 3, requires_grad=True)
    contrib = torch.randn(2, 6, 3, requires_grad=True)
    phi = additive_game_shapley(base, contrib, torch.tensor([0, 2]), "prob", 100, generator=0)
    (phi[:, 0].sum() - phi[:, 3].sum()).backward()
    assert base.grad is not None and contrib.grad is not None
    assert torch.isfinite(contrib.grad).all() and contrib.grad.abs().sum() > 0


def test_num_threads_runs_the_scans_single_threaded_and_restores_the_setting() -> None:
    """``num_threads`` changes how the CPU scans run, not what they return."""
    game = make_game(symmetric=False)
    base, contrib = (t.float() for t in game.additive())
    seen: list[int] = []

    def rest(logits: Tensor, targets: Tensor) -> Tensor:  # records the scans' thread count
        if logits.ndim > 2:  # prefix logits (P-1, C, B, K), not the end values (B, K)
            seen.append(torch.get_num_threads())
        return utility_fn("rest")(logits, targets)

    def run(utility: str | Callable[[Tensor, Tensor], Tensor], threads: int | None) -> Tensor:
        c = contrib.clone().requires_grad_(True)
        phi = additive_game_shapley(
            base, c, game.targets, utility, 60, generator=4, chunk_size=16, num_threads=threads
        )
        (phi * torch.arange(9.0)).sum().backward()
        assert c.grad is not None
        return torch.cat([phi.detach().flatten(), c.grad.flatten()])

    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for utility in ("prob", "logprob", rest):
            single, default = run(utility, 1), run(utility, None)
            assert torch.get_num_threads() == 2  # restored after forward and backward
            torch.testing.assert_close(single, default, rtol=1e-6, atol=1e-7)
        assert seen and set(seen[: len(seen) // 2]) == {1} and set(seen[len(seen) // 2 :]) == {2}
    finally:
        torch.set_num_threads(previous)
    with pytest.raises(ValueError, match="num_threads"):
        additive_game_shapley(base, contrib, game.targets, "prob", 10, num_threads=0)


# --------------------------------------------------------------------------- errors


def test_bad_inputs_raise() -> None:
    base, contrib, targets = torch.zeros(2, 3), torch.zeros(2, 4, 3), torch.tensor([0, 1])
    with pytest.raises(ValueError, match="n_permutations"):
        additive_game_shapley(base, contrib, targets, "prob", 0)
    with pytest.raises(ValueError, match="utility"):
        additive_game_shapley(base, contrib, targets, "softmax", 10)
    with pytest.raises(ValueError, match="do not match"):
        additive_game_shapley(base, torch.zeros(2, 4, 5), targets, "prob", 10)
    with pytest.raises(ValueError, match="targets"):
        additive_game_shapley(base, contrib, torch.tensor([0, 3]), "prob", 10)
    with pytest.raises(ValueError, match="targets"):
        additive_game_shapley(base, contrib, torch.tensor([0.0, 1.0]), "prob", 10)
    with pytest.raises(ValueError, match="n_players"):
        exact_shapley(lambda m: m.sum(1).double(), 30)
    with pytest.raises(ValueError, match="permutation"):
        additive_game_shapley(
            base, contrib, targets, "prob", permutations=torch.zeros(2, 4, dtype=torch.long)
        )
    with pytest.raises(TypeError, match="generator"):
        sample_permutations(4, 2, generator="seed")  # type: ignore[arg-type]
