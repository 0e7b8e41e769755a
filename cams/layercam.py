"""LayerCAM (Jiang et al., IEEE TIP 2021): element-wise positive-gradient weighting."""

from __future__ import annotations

import torch
from torch import Tensor

from cams._base import BaseCAM, Forward
from cams.registry import register

__all__ = ["LayerCAM"]


@register("layercam")
class LayerCAM(BaseCAM):
    r"""LayerCAM: every position keeps its own weight, the positive part of the gradient.

    .. math::
        L = \mathrm{ReLU}\Big(\sum_k \mathrm{ReLU}\Big(\frac{\partial U}{\partial A_k}\Big)
            \odot A_k\Big)

    As pytorch-grad-cam's ``LayerCAM`` (default utility ``"logit"``). Uses the closed-form head
    when detected, like Grad-CAM.
    """

    def _maps(self, x: Tensor, fwd: Forward, targets: Tensor, create_graph: bool) -> Tensor:
        g, _ = self._grads(x, fwd, targets, create_graph, hvp=False)
        return (torch.relu(g) * self._activation(fwd, create_graph)).sum(1)
