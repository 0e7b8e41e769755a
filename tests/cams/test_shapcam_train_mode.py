"""Shap-CAM on a train-mode model: the additive fast path with the forward's batch statistics
equals the network-rerun path (which freezes the same statistics), and stays differentiable."""

from __future__ import annotations

import torch

import cams
from distill.models import WideResNet


def test_train_mode_fast_path_equals_rerun_path():
    torch.manual_seed(0)
    model = WideResNet(10, 1).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([1, 2, 3, 4])
    fast = cams.ShapCAM(model, "block3", n_permutations=8, seed=0)
    rerun = cams.ShapCAM(model, "block3", n_permutations=8, seed=0, fast_path=False)
    a, b = fast(x, y), rerun(x, y)
    assert fast.last_path == "fast" and rerun.last_path == "generic"
    assert float((a - b).norm() / b.norm()) < 1e-5
    out = fast.compute(x, y, create_graph=True)
    out.maps.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
