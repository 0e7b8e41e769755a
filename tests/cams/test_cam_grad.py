"""Differentiability: gradcheck (float64, train and eval mode), losses on maps, BN statistics."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cams
from tests.cams._models import Tiny, randomize_bn, swap_parameter, wrn

TARGETS = torch.tensor([0, 1, 3])
METHODS = [(cls, cls.quick_options) for cls in cams.METHODS.values()] + [
    (cams.GradCAM, {"variant": "hires"}),
    (cams.ShapleyCAM, {"variant": "elementwise", "utility": "prob"}),
]
IDS = [f"{c.__name__}-{'-'.join(map(str, o.values()))}" for c, o in METHODS]


def _tiny(train: bool) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Tiny()).double().train(train)


@pytest.mark.parametrize("cls,opts", METHODS, ids=IDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fast", [True, False], ids=["fast", "generic"])
def test_gradcheck(cls: type, opts: dict, train: bool, fast: bool) -> None:
    """d maps / d (conv weight, fc weight) by autograd equals finite differences."""
    if cls is cams.ScoreCAM and not fast:
        pytest.skip("ScoreCAM has no fast path")
    model = _tiny(train)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    kw = {} if cls is cams.ScoreCAM else {"fast_path": fast}
    cam = cls(model, "conv", relu=False, **opts, **kw)
    conv_w, fc_w = model.conv.weight.detach().clone(), model.fc.weight.detach().clone()
    if cls is cams.ScoreCAM:  # documented: the softmax weights are constants inside a loss
        fixed = cam.scores(x, model.conv(x).detach(), TARGETS)
        cam.scores = lambda *_: fixed

    def maps(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
        swap_parameter(model.conv, "weight", w1)
        swap_parameter(model.fc, "weight", w2)
        return cam(x, TARGETS, create_graph=True)

    inputs = (conv_w.requires_grad_(), fc_w.requires_grad_())
    assert torch.autograd.gradcheck(maps, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)
    # a train-mode BN head runs with the forward's batch statistics held (per-sample maps)
    fast_ok = fast and cls is not cams.ScoreCAM
    expected = "fast" if fast_ok else "generic"
    assert cam.last_path == expected


@pytest.mark.parametrize("cls,opts", METHODS, ids=IDS)
@pytest.mark.parametrize("layer", ["block3", "relu"])
def test_loss_on_maps_trains_a_train_mode_wrn(cls: type, opts: dict, layer: str) -> None:
    """compute(create_graph=True) in train mode: one forward, finite nonzero parameter grads,
    BN running statistics updated exactly as by an ordinary forward."""
    torch.manual_seed(0)
    model = wrn().train()
    reference = copy.deepcopy(model)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    out = cls(model, layer, **opts).compute(x, y, create_graph=True)
    logits = reference(x)
    torch.testing.assert_close(out.logits, logits)
    for (name, a), b in zip(model.named_buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert out.maps.requires_grad
    target_maps = torch.rand_like(out.maps)
    loss = F.mse_loss(cams.normalize(out.maps, "l2"), cams.normalize(target_maps, "l2"))
    grads = torch.autograd.grad(
        loss, list(model.parameters()), allow_unused=True, retain_graph=True
    )
    body = model.conv1.weight
    g = dict(zip([id(p) for p in model.parameters()], grads, strict=True))
    assert g[id(body)] is not None and torch.isfinite(g[id(body)]).all()
    assert g[id(body)].abs().sum() > 0
    assert all(gi is None or torch.isfinite(gi).all() for gi in grads)
    F.cross_entropy(out.logits, y).backward()  # the logits' graph is still usable
    assert model.conv1.weight.grad is not None


def test_elementary_batchnorm_matches_native_in_train_mode() -> None:
    """ShapleyCAM with create_graph=True gives the same maps and BN statistics as without."""
    torch.manual_seed(0)
    model = wrn().train()
    other = copy.deepcopy(model)
    x = torch.randn(4, 3, 16, 16)
    a = cams.ShapleyCAM(model, "block3").compute(x, create_graph=True)
    b = cams.ShapleyCAM(other, "block3").compute(x)
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(a.logits, b.logits)
    for p, q in zip(model.buffers(), other.buffers(), strict=True):
        torch.testing.assert_close(p, q)


def test_momentum_none_batchnorm_statistics() -> None:
    torch.manual_seed(0)
    model = randomize_bn(Tiny()).train()
    model.bn.momentum = None
    model.bn.num_batches_tracked.fill_(3)
    reference = copy.deepcopy(model)
    x = torch.randn(4, 2, 5, 5)
    cams.ShapleyCAM(model, "conv").compute(x, create_graph=True)
    reference(x)
    for p, q in zip(model.buffers(), reference.buffers(), strict=True):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("cls,opts", METHODS, ids=IDS)
def test_no_graph_without_create_graph(cls: type, opts: dict) -> None:
    torch.manual_seed(0)
    model = wrn().train()
    cam = cls(model, "block3", **opts)
    maps = cam(torch.randn(2, 3, 16, 16), create_graph=False)
    assert not maps.requires_grad and maps.grad_fn is None

    def tensors(v: object) -> bool:
        if isinstance(v, dict):
            return any(tensors(k) or tensors(w) for k, w in v.items())
        if isinstance(v, (list, tuple)):
            return any(tensors(w) for w in v)
        return isinstance(v, torch.Tensor)

    assert not tensors(vars(cam))  # no references kept
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_full_gradcheck_shapleycam_train_mode_bn_parameters() -> None:
    """Full (not randomized) gradcheck of the 3rd-order case: train-mode BN after the target."""
    model = _tiny(True)
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    cam = cams.ShapleyCAM(model, "conv", relu=False)

    def maps(w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        swap_parameter(model.bn, "weight", w)
        swap_parameter(model.bn, "bias", b)
        return cam(x, TARGETS, create_graph=True)

    inputs = (
        model.bn.weight.detach().clone().requires_grad_(),
        model.bn.bias.detach().clone().requires_grad_(),
    )
    assert torch.autograd.gradcheck(maps, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
