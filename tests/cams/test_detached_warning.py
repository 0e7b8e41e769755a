"""The once-per-object warning for maps that silently carry no gradient: autograd on,
``create_graph=False``, a train-mode model with something to differentiate."""

from __future__ import annotations

import warnings

import pytest
import torch

import cams
from tests.cams._models import Tiny

MATCH = r"create_graph=False are detached and carry no gradient"


def _recorded(fn) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")  # Python's own once-per-location filter is not the gate
        fn()
    return [w for w in seen if "carry no gradient" in str(w.message)]


@pytest.mark.parametrize("method", ["gradcam", "scorecam"])
@pytest.mark.parametrize("entry", ["call", "compute"])
def test_warns_once_per_object_in_train_mode_with_grad(method: str, entry: str) -> None:
    torch.manual_seed(0)
    model, x = Tiny().train(), torch.randn(2, 2, 8, 8)
    cam = cams.build(method, model, "relu", **cams.METHODS[method].quick_options)
    run = (lambda: cam(x)) if entry == "call" else (lambda: cam.compute(x, [0, 1]))
    with pytest.warns(UserWarning, match=MATCH) as first:
        maps = run()
    assert not maps.requires_grad if entry == "call" else not maps.maps.requires_grad
    assert sum("carry no gradient" in str(w.message) for w in first) == 1
    assert f"{type(cam).__name__} at 'relu'" in str(first[0].message)
    assert first[0].filename == __file__  # points at the caller's line
    assert _recorded(run) == []  # the same object stays quiet
    other = cams.build(method, model, "relu", **cams.METHODS[method].quick_options)
    assert len(_recorded(lambda: other(x))) == 1  # a new object warns again


def test_silent_in_eval_no_grad_create_graph_and_frozen() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 2, 8, 8)
    model = Tiny()
    assert _recorded(lambda: cams.GradCAM(model.eval(), "relu")(x)) == []
    model.train()
    with torch.no_grad():
        assert _recorded(lambda: cams.GradCAM(model, "relu")(x)) == []
    cam = cams.GradCAM(model, "relu")
    assert _recorded(lambda: cam.compute(x, create_graph=True)) == []
    assert cam.compute(x, create_graph=True).maps.requires_grad
    frozen = Tiny().train().requires_grad_(False)
    assert _recorded(lambda: cams.GradCAM(frozen, "relu")(x)) == []
    # a frozen model but an input that requires grad: the map could have carried a gradient
    assert len(_recorded(lambda: cams.GradCAM(frozen, "relu")(x.requires_grad_()))) == 1
