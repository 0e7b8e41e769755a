"""No side effects, batch independence, seeded determinism."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cams
from tests.cams._models import wrn

METHODS = [(cls, cls.quick_options) for cls in cams.METHODS.values()] + [
    (cams.ShapCAM, {**cams.ShapCAM.quick_options, "fast_path": False})
]
IDS = [f"{c.__name__}{'-generic' if 'fast_path' in o else ''}" for c, o in METHODS]


def _snapshot(model: nn.Module) -> tuple[list, list, list]:
    modes = [m.training for m in model.modules()]
    grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    return modes, grads, buffers


@pytest.mark.parametrize("cls,opts", METHODS, ids=IDS)
@pytest.mark.parametrize("create_graph", [False, True])
def test_call_leaves_model_as_found(cls: type, opts: dict, create_graph: bool) -> None:
    torch.manual_seed(0)
    model = wrn().train()
    model.block2.eval()  # mixed modes must survive too
    next(model.parameters()).grad = torch.ones_like(next(model.parameters()))
    before = _snapshot(model)
    cls(model, "block3", **opts)(torch.randn(3, 3, 16, 16), create_graph=create_graph)
    after = _snapshot(model)
    assert before[0] == after[0]
    for a, b in zip(before[1], after[1], strict=True):
        assert (a is None and b is None) or torch.equal(a, b)
    for a, b in zip(before[2], after[2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,opts", METHODS, ids=IDS)
def test_batch_independence(cls: type, opts: dict) -> None:
    torch.manual_seed(0)
    model = wrn().eval()
    x = torch.randn(3, 3, 16, 16)
    targets = torch.tensor([3, 1, 4])
    cam = cls(model, "block3", **opts)
    together = cam(x, targets)
    alone = torch.cat([cam(x[i : i + 1], targets[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-6)
    reordered = cam(x.flip(0), targets.flip(0)).flip(0)
    torch.testing.assert_close(together, reordered, rtol=1e-4, atol=1e-6)


def test_shapcam_seeding() -> None:
    torch.manual_seed(0)
    model = wrn().eval()
    x = torch.randn(2, 3, 16, 16)
    make = lambda **kw: cams.ShapCAM(model, "block3", n_permutations=5, relu=False, **kw)  # noqa: E731
    a = make(seed=7)
    assert torch.equal(a(x), a(x))
    assert torch.equal(a(x), make(seed=7)(x))
    assert not torch.equal(a(x), make(seed=8)(x))
    gen = make(seed=torch.Generator().manual_seed(7))
    first, second = gen(x), gen(x)  # a generator advances between calls
    torch.testing.assert_close(first, a(x))
    assert not torch.equal(first, second)
