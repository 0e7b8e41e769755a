"""pytorch-grad-cam / torchcam spellings (cams/_compat.py), each against the native call's values
(pytorch-grad-cam 1.5.7): its array equals ``cams.metrics.scale_maps`` of ours, < 1e-4."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import cams
from cams.metrics import scale_maps
from tests.cams._models import wrn

pgc = pytest.importorskip("pytorch_grad_cam")
T = pytest.importorskip("pytorch_grad_cam.utils.model_targets")


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, torch.Tensor, list[int]]:
    torch.manual_seed(0)
    model = wrn().eval()
    x = torch.randn(3, 3, 32, 32)
    return model, x, [3, 0, 7]


def _native(name: str, model: torch.nn.Module, x: torch.Tensor, targets: list) -> torch.Tensor:
    theirs = copy.deepcopy(model)  # pytorch-grad-cam writes .grad and keeps hooks until exit
    with getattr(pgc, name)(model=theirs, target_layers=[theirs.block3]) as cam:
        return torch.from_numpy(cam(input_tensor=x, targets=targets))


@pytest.mark.parametrize(
    ("name", "target", "utility"),
    [
        ("GradCAM", "ClassifierOutputTarget", None),
        ("GradCAMPlusPlus", "ClassifierOutputTarget", None),
        ("ShapleyCAM", "ClassifierOutputReST", None),
        ("GradCAM", "ClassifierOutputSoftmaxTarget", "prob"),
    ],
)
def test_native_spelling_gives_the_native_values(setup, name, target, utility) -> None:
    model, x, classes = setup
    targets = [getattr(T, target)(c) for c in classes]
    opts = {"utility": utility} if utility else {}
    with getattr(cams, name)(model=model, target_layers=[model.block3], **opts) as cam:
        maps = cam(input_tensor=x, targets=targets, aug_smooth=False, eigen_smooth=False)
    plain = getattr(cams, name)(model, "block3", **opts)(x, classes)
    torch.testing.assert_close(maps, plain, rtol=0, atol=0)  # the same call underneath
    theirs = _native(name, model, x, targets)
    ours = scale_maps(maps, tuple(x.shape[-2:]))
    assert ours.shape == theirs.shape == (3, 32, 32)
    assert float((ours - theirs).abs().max()) < 1e-4


def test_torchcam_layer_spellings(setup) -> None:
    model, x, classes = setup
    ref = cams.LayerCAM(model, "block3")(x, classes)
    for layer in ("block3", model.block3, ["block3"], [model.block3]):
        torch.testing.assert_close(cams.LayerCAM(model, target_layer=layer)(x, classes), ref)
    torch.testing.assert_close(cams.build("layercam", model, [model.block3])(x, classes), ref)


def test_classes_keep_their_own_signature() -> None:
    params = list(inspect.signature(cams.GradCAM).parameters)
    assert params[:2] == ["model", "target_layer"] and "variant" in params
    assert "n_permutations" in inspect.signature(cams.ShapCAM).parameters


def test_what_is_not_offered_names_the_cams_way(setup) -> None:
    model, x, classes = setup
    with pytest.raises(ValueError, match=r"one target layer per CAM object, got 2.*upsample"):
        cams.GradCAM(model=model, target_layers=[model.block2, model.block3])
    with pytest.raises(TypeError, match="reshape_transform is not offered"):
        cams.GradCAM(model, [model.block3], reshape_transform=lambda t: t)
    cam = cams.GradCAM(model, "block3")
    prob = r"explains utility 'prob'.*utility='prob', or pass class indices to explain 'logit'"
    with pytest.raises(ValueError, match=prob):
        cam(x, [T.ClassifierOutputSoftmaxTarget(c) for c in classes])
    with pytest.raises(ValueError, match=r"explains utility 'logit'.*utility='logit'"):
        cams.ScoreCAM(model, "block3")(x, [T.ClassifierOutputTarget(c) for c in classes])
    with pytest.raises(TypeError, match="aug_smooth is not offered.*average cam"):
        cam(input_tensor=x, aug_smooth=True)
    with pytest.raises(TypeError, match=r"eigen_smooth is not offered"):
        cam(x, eigen_smooth=True)
    with pytest.raises(TypeError, match=r"class_idx is not offered.*cam\(x, targets=class_idx\)"):
        cam(class_idx=3, scores=model(x))
    with pytest.raises(TypeError, match="unexpected keyword argument.*'smooth'"):
        cam(x, smooth=True)
    with pytest.raises(TypeError, match="pass x or input_tensor, not both"):
        cam(x, input_tensor=x)
    with pytest.raises(TypeError, match="mix pytorch-grad-cam targets and int; pass one kind"):
        cam(x, [T.ClassifierOutputTarget(3), 1, 2])
    # the messages that were already clear stay as they were
    with pytest.raises(TypeError, match="targets must be class indices"):
        cam(x, [object()] * 3)
    with pytest.raises(TypeError, match="target_layer must be a module or a dotted name"):
        cams.GradCAM(model, 3)
