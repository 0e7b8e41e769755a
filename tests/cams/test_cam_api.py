"""Public API: shapes, options, compute(), helpers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import cams
from tests.cams._models import Tiny, wrn

METHODS = list(cams.METHODS.values())  # every registered method
FAST_OPTS = {cls: cls.quick_options for cls in METHODS}


@pytest.fixture(scope="module")
def model() -> nn.Module:
    torch.manual_seed(0)
    return wrn().eval()


@pytest.mark.parametrize("cls", METHODS)
def test_shapes_targets_and_compute(cls: type, model: nn.Module) -> None:
    x = torch.randn(3, 3, 16, 16)
    cam = cls(model, "block3", **FAST_OPTS.get(cls, {}))
    maps = cam(x)
    assert maps.shape == (3, 4, 4) and maps.dtype == x.dtype and not maps.requires_grad
    clipped = cam.relu  # Shap-CAM's default map is the signed Shapley values (paper)
    assert clipped == (cls is not cams.ShapCAM)
    if clipped:
        assert (maps >= 0).all()
    with torch.no_grad():
        logits = model(x)
    assert torch.equal(maps, cam(x, logits.argmax(1)))  # None = predicted class
    out = cam.compute(x, torch.tensor([1, 2, 3]))
    assert isinstance(out, cams.CAMOutput)
    torch.testing.assert_close(out.logits, logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.maps, cam(x, torch.tensor([1, 2, 3])))
    signed = cls(model, "block3", relu=False, **FAST_OPTS.get(cls, {}))(x, [1, 2, 3])
    torch.testing.assert_close(torch.relu(signed) if clipped else signed, out.maps)
    one = cam(x, 4)  # an int target applies to every sample; so do numpy and 0-d tensor ints
    assert one.shape == (3, 4, 4)
    for same in (np.int64(4), torch.tensor(4), np.array([4, 4, 4])):
        torch.testing.assert_close(cam(x, same), one)


def test_module_target_and_utilities(model: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    by_name = cams.GradCAM(model, "block3", utility="prob")(x)
    by_module = cams.GradCAM(model, model.block3, utility="prob")(x)
    torch.testing.assert_close(by_name, by_module)
    maps = {u: cams.GradCAM(model, "relu", utility=u, relu=False)(x) for u in cams.UTILITIES}
    assert not torch.allclose(maps["logit"], maps["prob"])


def test_compute_keeps_logits_graph_for_training() -> None:
    torch.manual_seed(0)
    model = Tiny().train()
    x = torch.randn(4, 2, 5, 5)
    out = cams.GradCAM(model, "conv").compute(x, torch.tensor([0, 1, 2, 3]))
    assert out.logits.requires_grad and not out.maps.requires_grad
    nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0


def test_no_grad_and_frozen_teacher_give_detached_outputs() -> None:
    torch.manual_seed(0)
    model = wrn().eval()
    x = torch.randn(2, 3, 16, 16)
    cam = cams.ShapleyCAM(model, "block3")
    with torch.no_grad():
        out = cam.compute(x, create_graph=True)
    assert not out.maps.requires_grad and not out.logits.requires_grad
    for p in model.parameters():
        p.requires_grad_(False)
    out2 = cam.compute(x, create_graph=True)
    assert not out2.maps.requires_grad and not out2.logits.requires_grad
    torch.testing.assert_close(out.maps, out2.maps)


def test_normalize_upsample_overlay() -> None:
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]], [[0.0, 0.0], [0.0, 0.0]]])
    mm = cams.normalize(maps, "minmax")
    torch.testing.assert_close(mm[0], maps[0] / 3)
    assert torch.equal(mm[1], torch.zeros(2, 2))  # all-zero map: zeros, not NaN
    l2 = cams.normalize(maps, "l2")
    torch.testing.assert_close(l2[0].norm(), torch.tensor(1.0))
    assert torch.equal(l2[1], torch.zeros(2, 2))
    assert torch.equal(cams.normalize(maps, "none"), maps)
    for kind in ("l2", "minmax"):
        leaf = maps.clone().requires_grad_()
        loss = (cams.normalize(leaf, kind) * torch.rand(2, 2, 2)).sum()
        (grad,) = torch.autograd.grad(loss, leaf)
        assert torch.isfinite(grad).all() and grad[0].abs().sum() > 0
    up = cams.upsample(maps, (4, 6))
    assert up.shape == (2, 4, 6)
    torch.testing.assert_close(cams.upsample(maps, 2), maps)
    images = torch.rand(2, 3, 8, 8)
    over = cams.overlay(images, maps)
    assert over.shape == (2, 3, 8, 8) and over.min() >= 0 and over.max() <= 1
    torch.testing.assert_close(cams.overlay(images, maps, alpha=0.0), images)
    hot = cams.utils.jet(torch.tensor([0.0, 0.5, 1.0]))
    expected = torch.tensor([[0.0, 0.0, 0.5], [0.5, 1.0, 0.5], [0.5, 0.0, 0.0]])
    torch.testing.assert_close(hot, expected)
    with pytest.raises(ValueError, match="unknown normalization"):
        cams.normalize(maps, "max")


# ------------------------------------------------------------------------------ bad input
def test_unknown_layer_lists_candidates(model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"unknown target layer 'block4'.*block[123]"):
        cams.GradCAM(model, "block4")
    with pytest.raises(ValueError, match="not a submodule"):
        cams.GradCAM(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="module or a dotted name"):
        cams.GradCAM(model, 3)


@pytest.mark.parametrize("cls", METHODS)
def test_bad_inputs(cls: type, model: nn.Module) -> None:
    cam = cls(model, "block3", **FAST_OPTS.get(cls, {}))
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="4-D"):
        cam(x[0])
    with pytest.raises(ValueError, match="NaN or inf"):
        cam(torch.where(x > 2, torch.inf, x).index_fill(0, torch.tensor([0]), float("nan")))
    with pytest.raises(ValueError, match="floating"):
        cam(x.long())
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cam(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        cam(x, torch.tensor([[1], [2]]))
    with pytest.raises(TypeError, match="integer"):
        cam(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(TypeError, match="integer"):
        cam(x, torch.tensor([True, False]))
    with pytest.raises(TypeError, match="integer"):
        cam(x, np.float32(1))
    with pytest.raises(TypeError, match="class indices"):
        cam(x, "cat")
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        cam(x, torch.tensor([1, 10]))
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        cam(x, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="unknown utility 'softmax'"):
        cls(model, "block3", utility="softmax")


def test_bad_layer_output_and_options(model: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    with pytest.raises(ValueError, match="must output a 4-D tensor"):
        cams.GradCAM(model, "fc")(x)
    for cls in (cams.GradCAM, cams.ShapleyCAM):
        with pytest.raises(ValueError, match="unknown variant 'max'"):
            cls(model, "block3", variant="max")
    with pytest.raises(ValueError, match="unknown baseline 'blur'"):
        cams.ShapCAM(model, "block3", baseline="blur")
    for bad in (0, -3, 1.5, True):
        with pytest.raises(ValueError, match="n_permutations must be a positive int"):
            cams.ShapCAM(model, "block3", n_permutations=bad)
    with pytest.raises(ValueError, match="batch_size"):
        cams.ScoreCAM(model, "block3", batch_size=0)
    with pytest.raises(TypeError, match="seed"):
        cams.ShapCAM(model, "block3", seed="abc")


def test_layer_running_twice_is_rejected() -> None:
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)
            self.fc = nn.Linear(3, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(self.conv(x)).mean((2, 3)))

    with pytest.raises(ValueError, match="ran 2 times"):
        cams.GradCAM(Twice(), "conv")(torch.randn(1, 3, 4, 4))
