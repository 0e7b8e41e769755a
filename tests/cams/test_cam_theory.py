"""Theory from the ShapleyCAM paper and closed forms, checked numerically."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import cams
from cams.utility import get_utility
from tests.cams._models import randomize_bn, wrn


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return wrn().eval().double()


def _x(b: int = 3) -> torch.Tensor:
    torch.manual_seed(2)
    return torch.randn(b, 3, 16, 16, dtype=torch.float64)


def test_gradcam_equals_cam_before_gap(model: nn.Module) -> None:
    """At the pool's input with the logit utility, w_k = W_ck / hw: Grad-CAM is CAM scaled."""
    x, targets = _x(), torch.tensor([0, 3, 7])
    acts = {}
    handle = model.relu.register_forward_hook(lambda m, i, o: acts.setdefault("a", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    a = acts["a"]
    cam = torch.einsum("bk,bkhw->bhw", model.fc.weight[targets].detach(), a)
    for fast in (True, False):
        grad = cams.GradCAM(model, "relu", relu=False, fast_path=fast)(x, targets)
        torch.testing.assert_close(grad * a.shape[-1] * a.shape[-2], cam, rtol=1e-10, atol=1e-12)


def test_shapleycam_equals_gradcam_for_logit_before_gap(model: nn.Module) -> None:
    """H·A = 0 for a raw logit with only pooling and a linear layer after A."""
    x = _x()
    for fast in (True, False):
        for variant in ("mean", "hires", "elementwise"):
            shap = cams.ShapleyCAM(model, "relu", utility="logit", variant=variant, fast_path=fast)
            grad = cams.GradCAM(model, "relu", utility="logit", variant=variant, fast_path=fast)
            torch.testing.assert_close(shap(x), grad(x), rtol=1e-12, atol=1e-14)
    # ... and it differs with a softmax-based utility or a nonlinearity after A.
    assert not torch.allclose(
        cams.ShapleyCAM(model, "relu", utility="rest")(x),
        cams.GradCAM(model, "relu", utility="rest")(x),
    )
    assert not torch.allclose(
        cams.ShapleyCAM(model, "block3", utility="prob")(x),
        cams.GradCAM(model, "block3", utility="prob")(x),
    )


@pytest.mark.parametrize("layer", ["relu", "block3"])
def test_rest_gradcam_decomposition(model: nn.Module, layer: str) -> None:
    """∂log p_c = (1 - p_c) ∂y_c - Σ_{k≠c} p_k ∂y_k and ReST = y_c + log p_c (Eq. 17).

    Grad-CAM's signed map is linear in the utility's gradient, so the maps decompose the same way;
    the per-class logit maps are computed independently on the generic (autograd) path.
    """
    x = _x(2)
    with torch.no_grad():
        p = torch.softmax(model(x), 1)
    c = torch.tensor([1, 4])
    per_class = torch.stack(
        [
            cams.GradCAM(model, layer, relu=False, fast_path=False)(x, torch.full((2,), k))
            for k in range(10)
        ],
        1,
    )  # (B, K, h, w)
    own = per_class[torch.arange(2), c]
    logprob = own - torch.einsum("bk,bkhw->bhw", p, per_class)  # = (1-p_c) ∂y_c - Σ_{k≠c} p_k ∂y_k
    for fast in (True, False):
        got = cams.GradCAM(model, layer, utility="logprob", relu=False, fast_path=fast)(x, c)
        torch.testing.assert_close(got, logprob, rtol=1e-9, atol=1e-12)
        got = cams.GradCAM(model, layer, utility="rest", relu=False, fast_path=fast)(x, c)
        torch.testing.assert_close(got, own + logprob, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name", cams.UTILITIES)
def test_utility_closed_forms_match_autograd(name: str) -> None:
    torch.manual_seed(0)
    y = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 6, dtype=torch.float64)
    c = torch.tensor([0, 5, 2, 2])
    u = get_utility(name)
    (g,) = torch.autograd.grad(u.value(y, c).sum(), y, create_graph=True)
    hv = torch.zeros_like(t)
    if g.requires_grad:
        (hv,) = torch.autograd.grad(g, y, grad_outputs=t)
    torch.testing.assert_close(u.grad(y, c), g)
    got = u.hvp(y, c, t)
    torch.testing.assert_close(torch.zeros_like(hv) if got is None else got, hv)
    with torch.no_grad():
        expected = {
            "logit": y[range(4), c],
            "prob": torch.softmax(y, 1)[range(4), c],
            "logprob": torch.log_softmax(y, 1)[range(4), c],
            "rest": y[range(4), c] + torch.log_softmax(y, 1)[range(4), c],
        }[name]
        torch.testing.assert_close(u.value(y, c), expected)


def test_shapleycam_hvp_matches_explicit_hessian() -> None:
    """W = g - ½ H·A with the Hessian of U w.r.t. A built explicitly (tiny model)."""
    torch.manual_seed(0)
    conv = nn.Conv2d(2, 3, 3, padding=1)
    layers = [
        conv,
        nn.BatchNorm2d(3),
        nn.Tanh(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(3, 4),
    ]
    model = randomize_bn(nn.Sequential(*layers)).double().eval()
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    a = conv(x).detach()
    head = nn.Sequential(*list(model)[1:])
    u = lambda v: get_utility("rest").value(head(v.view_as(a)), torch.tensor([2]))[0]  # noqa: E731
    g = torch.autograd.functional.jacobian(u, a.flatten())
    hess = torch.autograd.functional.hessian(u, a.flatten())
    w = (g - 0.5 * hess @ a.flatten()).view_as(a)
    expected = (w.mean((2, 3), keepdim=True) * a).sum(1)
    for fast in (True, False):
        cam = cams.ShapleyCAM(model, "0", relu=False, fast_path=fast)
        torch.testing.assert_close(cam(x, torch.tensor([2])), expected)
        assert cam.last_path == ("fast" if fast else "generic")
