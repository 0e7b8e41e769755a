"""Grad-CAM (Selvaraju et al., 2017) and its HiResCAM / element-wise variants."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from cams._base import BaseCAM, Forward, weighted_sum
from cams._checks import check_choice
from cams.registry import register

__all__ = ["VARIANTS", "GradCAM", "combine"]

VARIANTS: tuple[str, ...] = ("mean", "hires", "elementwise")


def combine(weights: Tensor, a: Tensor, variant: str) -> Tensor:
    """Signed map from element-wise weights ``W`` (B, K, h, w) and activations ``A``.

    * ``"mean"``:        ``Σ_k mean_hw(W_k) · A_k``
    * ``"hires"``:       ``Σ_k W_k ⊙ A_k``
    * ``"elementwise"``: ``Σ_k ReLU(W_k ⊙ A_k)``
    """
    if variant == "mean":
        return weighted_sum(weights.mean((2, 3)), a)
    if variant == "hires":
        return (weights * a).sum(1)
    return torch.relu(weights * a).sum(1)


@register("gradcam")
class GradCAM(BaseCAM):
    r"""Grad-CAM: channel weights are the spatially averaged gradients of the utility.

    .. math::
        w_k = \frac{1}{hw} \sum_{ij} \frac{\partial U}{\partial A_{k,ij}}, \qquad
        L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    ``variant="hires"`` gives HiResCAM (``ReLU(Σ_k g_k ⊙ A_k)``) and ``"elementwise"``
    ``ReLU(Σ_k ReLU(g_k ⊙ A_k))`` (pytorch-grad-cam's GradCAMElementWise).

    Args:
        model, target_layer, utility, relu, fast_path: see :class:`cams.BaseCAM`
            (default utility ``"logit"``).
        variant: "mean" (default), "hires" or "elementwise".
    """

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str,
        *,
        utility: str | None = None,
        relu: bool = True,
        variant: str = "mean",
        fast_path: bool = True,
    ) -> None:
        super().__init__(model, target_layer, utility=utility, relu=relu, fast_path=fast_path)
        self.variant = check_choice("variant", variant, VARIANTS)

    def _maps(self, x: Tensor, fwd: Forward, targets: Tensor, create_graph: bool) -> Tensor:
        g, _ = self._grads(x, fwd, targets, create_graph, hvp=False)
        return combine(g, self._activation(fwd, create_graph), self.variant)
