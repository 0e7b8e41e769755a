"""Differentiable, batched class activation maps (torch only).

``from cams import GradCAM, GradCAMPlusPlus, LayerCAM, ScoreCAM, ShapleyCAM, ShapCAM``, or by name
through the registry: ``cams.build("gradcam", model, "layer4")``, ``cams.METHODS``;
see ``cams/README.md``.
"""

from cams._base import BaseCAM, CAMOutput
from cams.gradcam import GradCAM
from cams.gradcampp import GradCAMPlusPlus
from cams.layercam import LayerCAM
from cams.registry import METHODS, build, get_method, method_options, register
from cams.scorecam import ScoreCAM
from cams.shapcam import ShapCAM
from cams.shapleycam import ShapleyCAM
from cams.utility import UTILITIES, Utility, get_utility
from cams.utils import normalize, overlay, save_png, to_uint8, upsample

__all__ = [
    "METHODS",
    "UTILITIES",
    "BaseCAM",
    "CAMOutput",
    "GradCAM",
    "GradCAMPlusPlus",
    "LayerCAM",
    "ScoreCAM",
    "ShapCAM",
    "ShapleyCAM",
    "Utility",
    "build",
    "get_method",
    "get_utility",
    "method_options",
    "normalize",
    "overlay",
    "register",
    "save_png",
    "to_uint8",
    "upsample",
]
