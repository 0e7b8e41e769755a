"""Differentiable, batched class activation maps (torch only).

``from cams import GradCAM, GradCAMPlusPlus, ScoreCAM, ShapleyCAM, ShapCAM``;
see ``cams/README.md``.
"""

from cams._base import BaseCAM, CAMOutput
from cams.gradcam import GradCAM
from cams.gradcampp import GradCAMPlusPlus
from cams.scorecam import ScoreCAM
from cams.shapcam import ShapCAM
from cams.shapleycam import ShapleyCAM
from cams.utility import UTILITIES, Utility, get_utility
from cams.utils import normalize, overlay, upsample

__all__ = [
    "UTILITIES", "BaseCAM", "CAMOutput", "GradCAM", "GradCAMPlusPlus", "ScoreCAM", "ShapCAM",
    "ShapleyCAM", "Utility", "get_utility", "normalize", "overlay", "upsample",
]
