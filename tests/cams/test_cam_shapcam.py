"""Shap-CAM: exact Shapley values, efficiency, symmetry, dummy players, paths, baselines."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cams
from cams._shapley import exact_shapley
from tests.cams._models import wrn


class Game(nn.Module):
    """feat (Identity, the target) → conv3x3 → ReLU → GAP → linear: positions interact."""

    def __init__(self) -> None:
        super().__init__()
        self.feat = nn.Identity()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)
        with torch.no_grad():  # symmetric under a 180° rotation
            self.conv.weight.copy_(self.conv.weight + self.conv.weight.flip(-1, -2))

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.conv(self.feat(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return wrn().eval()


def _worth(model: nn.Module, x: Tensor, targets: Tensor, acts: Tensor) -> Tensor:
    """Utility "prob" with block3's output replaced by ``acts`` (independent of ShapCAM)."""
    handle = model.block3.register_forward_hook(lambda *_: acts)
    try:
        with torch.no_grad():
            return torch.softmax(model(x), 1)[torch.arange(len(x)), targets]
    finally:
        handle.remove()


def test_exact_enumeration_and_sampling(model: nn.Module) -> None:
    """3x3 positions: all 512 coalitions; 20,000 permutations within 1 % (relative L2)."""
    torch.manual_seed(3)
    x, targets = torch.randn(2, 3, 12, 12) * 3, torch.tensor([2, 7])
    exact = cams.ShapCAM(model, "block3", exact=True, relu=False)(x, targets)
    assert exact.shape == (2, 3, 3)
    # the game itself, checked independently on random coalitions
    game = cams.ShapCAM(model, "block3").value_function(x, targets)
    acts = {}
    h = model.block3.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    a = acts["a"]
    masks = torch.rand(5, 9) > 0.5
    direct = torch.stack(
        [
            _worth(
                model, x, targets, torch.where(m.view(1, 1, 3, 3), a, a.mean((2, 3), keepdim=True))
            )
            for m in masks
        ],
        1,
    )
    torch.testing.assert_close(game(masks), direct, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(exact.flatten(1), exact_shapley(game, 9), rtol=1e-5, atol=1e-8)
    # efficiency: Σ φ = v(N) - v(∅)
    gap = _worth(model, x, targets, a) - _worth(model, x, targets, a.mean((2, 3), keepdim=True))
    torch.testing.assert_close(exact.sum((1, 2)), gap, rtol=1e-5, atol=1e-7)
    for antithetic in (False, True):
        est = cams.ShapCAM(
            model, "block3", n_permutations=20_000, antithetic=antithetic, relu=False
        )(x, targets)
        assert float((est - exact).norm() / exact.norm()) < 0.01
        torch.testing.assert_close(est.sum((1, 2)), gap, rtol=1e-5, atol=1e-7)
    generic = cams.ShapCAM(model, "block3", exact=True, relu=False, fast_path=False)
    scale = float(exact.abs().max())
    torch.testing.assert_close(generic(x, targets), exact, rtol=0, atol=1e-5 * scale)


def test_symmetric_and_dummy_players() -> None:
    torch.manual_seed(0)
    model = Game().eval()
    x = torch.randn(2, 4, 3, 3)
    x = x + x.flip(-1, -2)  # symmetric under the rotation: (0, 0) ~ (2, 2), (0, 1) ~ (2, 1), ...
    others = torch.cat([x.flatten(2)[:, :, :4], x.flatten(2)[:, :, 5:]], 2)
    x[:, :, 1, 1] = others.mean(2)  # the centre equals the baseline (channel mean): a dummy
    cam = cams.ShapCAM(model, "feat", utility="prob", relu=False)
    assert cam.head() is None  # conv after the target: generic path
    exact = cams.ShapCAM(model, "feat", exact=True, relu=False)(x)
    sampled = cams.ShapCAM(model, "feat", n_permutations=500, antithetic=True, relu=False)(x)
    for phi, tol in ((exact, 1e-5), (sampled, 0.1)):  # sampling: symmetric up to its error
        scale = float(phi.abs().max())
        assert scale > 1e-3
        torch.testing.assert_close(phi, phi.flip(-1, -2), rtol=0, atol=tol * scale)
        assert phi[:, 1, 1].abs().max() < 1e-6  # the dummy's marginals are all 0


def test_fast_and_generic_paths_agree_on_resnet18() -> None:
    from tests.cams._models import resnet18

    model = resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    opts = {"n_permutations": 8, "relu": False, "utility": "rest"}
    fast = cams.ShapCAM(model, "layer4", **opts)
    slow = cams.ShapCAM(model, "layer4", fast_path=False, **opts)
    a, b = fast(x), slow(x)
    assert fast.last_path == "fast" and slow.last_path == "generic"
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5


def test_baselines_and_relu(model: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    opts = {"n_permutations": 20, "relu": False}
    mean = cams.ShapCAM(model, "relu", **opts)(x)
    zero = cams.ShapCAM(model, "relu", baseline="zero", **opts)(x)
    assert not torch.allclose(mean, zero)
    # before a global average pool with the mean baseline v(N) = v(∅): values sum to 0
    torch.testing.assert_close(mean.sum((1, 2)), torch.zeros(2), atol=1e-6, rtol=0)
    # with the zero baseline and the logit utility the game is additive: φ_j = W_c·A_j / P
    logit = cams.ShapCAM(model, "relu", baseline="zero", utility="logit", **opts)(x)
    grad = cams.GradCAM(model, "relu", relu=False)(x)
    torch.testing.assert_close(logit, grad, rtol=1e-5, atol=1e-6)
    clipped = cams.ShapCAM(model, "relu", n_permutations=20, relu=True)(x)
    torch.testing.assert_close(clipped, torch.relu(mean))
    # the default map is the signed Shapley values (the paper's Eq. 4)
    assert (mean < 0).any()
    torch.testing.assert_close(cams.ShapCAM(model, "relu", n_permutations=20)(x), mean)


@pytest.mark.parametrize("baseline", ["mean", "global_mean", "zero"])
def test_baseline_readings_match_exact_enumeration(model: nn.Module, baseline: str) -> None:
    """Each baseline is the value absent positions take: per-channel spatial mean, one scalar
    per image (mean over channels and positions), or zero; checked by direct enumeration."""
    torch.manual_seed(4)
    x, targets = torch.randn(2, 3, 8, 8) * 3, torch.tensor([1, 6])
    acts = {}
    h = model.block3.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        model(x)
    h.remove()
    a = acts["a"]  # (2, C, 2, 2): 4 players
    fill = {
        "mean": a.mean((2, 3), keepdim=True),
        "global_mean": a.mean((1, 2, 3), keepdim=True),
        "zero": torch.zeros_like(a[:, :, :1, :1]),
    }[baseline]

    def game(masks: Tensor) -> Tensor:
        return torch.stack(
            [_worth(model, x, targets, torch.where(m.view(1, 1, 2, 2), a, fill)) for m in masks], 1
        )

    phi = cams.ShapCAM(model, "block3", exact=True, baseline=baseline)(x, targets)
    torch.testing.assert_close(phi.flatten(1), exact_shapley(game, 4), rtol=1e-5, atol=1e-7)


def test_generic_path_repeats_input_when_broadcasting_fails() -> None:
    class Concat(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 2, 3, padding=1)
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x: Tensor) -> Tensor:
            s = self.stem(x)
            return self.fc(torch.cat([self.conv(s), s], 1).mean((2, 3)))

    torch.manual_seed(0)
    model = Concat().eval()
    x = torch.randn(2, 3, 2, 2)
    cam = cams.ShapCAM(model, "conv", exact=True, relu=False)
    phi = cam(x)
    assert cam._expand_input  # cat with a batch-1 skip tensor cannot broadcast
    # the skip branch does not depend on the coalition: logits are additive in the positions
    additive = cams.ShapCAM(model, "conv", exact=True, relu=False, utility="logit")(x)
    assert phi.shape == additive.shape == (2, 2, 2)
    torch.testing.assert_close(additive.sum((1, 2)), torch.zeros(2), atol=1e-6, rtol=0)


def test_train_mode_records_only_the_statistics_reruns_use():
    """Reruns replace the target's output, so only BatchNorm calls after the target need their
    batch statistics; the body's BatchNorm (before the target) is not recorded, yet the map
    equals the generic rerun path's, which replays the recorded statistics."""
    torch.manual_seed(0)
    body_bn = nn.BatchNorm2d(4)
    head_bn = nn.BatchNorm2d(4)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        body_bn,
        nn.ReLU(),
        nn.Conv2d(4, 4, 3, padding=1),
        head_bn,
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    ).train()
    x, y = torch.randn(6, 3, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    cam = cams.ShapCAM(model, "3", n_permutations=64, seed=1)
    fwd = cam._forward(x, body_graph=False, create_graph=False)
    assert set(fwd.stats) == {head_bn}
    generic = cams.ShapCAM(model, "3", n_permutations=64, seed=1, fast_path=False)
    torch.testing.assert_close(cam(x, y), generic(x, y), rtol=1e-5, atol=1e-6)


def test_generic_path_runs_large_batches_in_chunks(model: nn.Module) -> None:
    """Eval mode, generic path: no model call sees more than ``batch_size`` samples (peak memory
    does not grow with the batch), and the maps equal the unchunked computation's."""
    torch.manual_seed(5)
    x, targets = torch.randn(7, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 5, 6])
    seen: list[int] = []
    handle = model.conv1.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    try:
        chunked = cams.ShapCAM(model, "block3", fast_path=False, n_permutations=4, batch_size=3)
        maps = chunked(x, targets)
    finally:
        handle.remove()
    assert max(seen) <= 3 and chunked.last_path == "generic"
    whole = cams.ShapCAM(model, "block3", fast_path=False, n_permutations=4, batch_size=64)
    torch.testing.assert_close(maps, whole(x, targets), rtol=1e-5, atol=1e-7)
    out = chunked.compute(x, 2)
    with torch.no_grad():
        torch.testing.assert_close(out.logits, model(x), rtol=1e-5, atol=1e-6)
