"""Agreement with pytorch-grad-cam 1.5.7 at batch size 1.

Method: pytorch-grad-cam min-max normalizes each map and resizes it to the input size with cv2.
We subclass each of its methods and override ``get_target_width_height`` to return the target
layer's own resolution, so its cv2 resize is the identity and its output is the raw low-res map
after its min-max normalization (``(m - min) / (max + 1e-7)``, applied twice). Ours are compared
after :func:`cams.normalize` ``"minmax"``: max abs difference < 1e-4 at the target resolution.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import cams
from tests.cams._models import resnet18, wrn

pgc = pytest.importorskip("pytorch_grad_cam")
targets_mod = pytest.importorskip("pytorch_grad_cam.utils.model_targets")

PAIRS = [
    (cams.GradCAM, "GradCAM", "logit", "ClassifierOutputTarget"),
    (cams.GradCAMPlusPlus, "GradCAMPlusPlus", "logit", "ClassifierOutputTarget"),
    (cams.ScoreCAM, "ScoreCAM", "logit", "ClassifierOutputTarget"),
    (cams.ShapleyCAM, "ShapleyCAM", "rest", "ClassifierOutputReST"),
    (cams.GradCAM, "HiResCAM", "logit", "ClassifierOutputTarget"),
    (cams.GradCAM, "GradCAMElementWise", "logit", "ClassifierOutputTarget"),
    (cams.LayerCAM, "LayerCAM", "logit", "ClassifierOutputTarget"),
]
VARIANT = {"HiResCAM": "hires", "GradCAMElementWise": "elementwise"}


def _theirs(
    name: str,
    model: nn.Module,
    layer: nn.Module,
    x: torch.Tensor,
    target: object,
    size: tuple[int, int],
) -> torch.Tensor:
    base = getattr(pgc, name)

    class LowRes(base):  # type: ignore[misc, valid-type]
        def get_target_width_height(self, input_tensor: torch.Tensor) -> tuple[int, int]:
            return size[1], size[0]  # cv2's (width, height): resize becomes the identity

    cam = LowRes(model, [layer])
    if name == "ScoreCAM":
        cam.batch_size = 64
    return torch.from_numpy(cam(x, [target]))


def _compare(model: nn.Module, layer: str, x: torch.Tensor, pairs: list) -> None:
    model.eval()
    with torch.no_grad():
        c = int(model(x).argmax())
    for ours_cls, name, utility, target_name in pairs:
        opts = {"variant": VARIANT[name]} if name in VARIANT else {}
        ours = cams.normalize(ours_cls(model, layer, utility=utility, **opts)(x, [c]), "minmax")
        theirs_model = copy.deepcopy(model)  # grad-cam writes .grad and switches to eval
        target = getattr(targets_mod, target_name)(c)
        theirs = _theirs(
            name,
            theirs_model,
            dict(theirs_model.named_modules())[layer],
            x,
            target,
            tuple(ours.shape[-2:]),
        )
        assert theirs.shape == ours.shape, name
        diff = float((ours - theirs).abs().max())
        assert diff < 1e-4, (name, diff)


def test_resnet18_layer4() -> None:
    model = resnet18()
    torch.manual_seed(1)
    _compare(model, "layer4", torch.randn(1, 3, 96, 96), [p for p in PAIRS if p[1] != "ScoreCAM"])
    _compare(model, "layer4", torch.randn(1, 3, 64, 64), [p for p in PAIRS if p[1] == "ScoreCAM"])


@pytest.mark.parametrize("layer", ["block3", "relu"])
def test_wrn(layer: str) -> None:
    torch.manual_seed(0)
    model = wrn()
    torch.manual_seed(1)
    _compare(model, layer, torch.randn(1, 3, 32, 32), PAIRS)
