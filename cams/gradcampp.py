"""Grad-CAM++ (Chattopadhay et al., 2018), closed form as in pytorch-grad-cam."""

from __future__ import annotations

import torch
from torch import Tensor

from cams._base import BaseCAM, Forward, weighted_sum
from cams.registry import register

__all__ = ["GradCAMPlusPlus"]


@register("gradcampp")
class GradCAMPlusPlus(BaseCAM):
    r"""Grad-CAM++ with the closed-form coefficients used by pytorch-grad-cam 1.5.7.

    With ``g = ∂U/∂A``:

    .. math::
        \alpha_{k,ij} = \frac{g_{k,ij}^2}{2 g_{k,ij}^2 + \big(\sum_{ab} A_{k,ab}\big)\, g_{k,ij}^3
                        + 10^{-6}}, \quad \alpha = 0 \text{ where } g = 0, \qquad
        w_k = \sum_{ij} \alpha_{k,ij}\, \mathrm{ReLU}(g_{k,ij}), \qquad
        L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    The ``1e-6`` matters when gradients are small (it dominates for random weights). The paper
    derives these coefficients for ``U = exp(S_c)``; like pytorch-grad-cam the raw utility's
    gradient is used (default ``"logit"``). Note: torchcam's denominator uses
    ``Σ_ab A_{k,ab} g_{k,ab}^3`` (a spatial sum of the product) instead of
    ``(Σ_ab A_{k,ab})·g_{k,ij}^3``, so its maps differ.
    """

    def _maps(self, x: Tensor, fwd: Forward, targets: Tensor, create_graph: bool) -> Tensor:
        g, _ = self._grads(x, fwd, targets, create_graph, hvp=False)
        a = self._activation(fwd, create_graph)
        g2 = g * g
        denom = 2 * g2 + a.sum((2, 3), keepdim=True) * g2 * g + 1e-6
        alpha = torch.where(g != 0, g2 / denom, torch.zeros_like(g))
        return weighted_sum((alpha * torch.relu(g)).sum((2, 3)), a)
