"""ShapleyCAM (Cai, 2025): gradient plus a second-order Shapley correction."""

from __future__ import annotations

from torch import Tensor

from cams._base import Forward
from cams.gradcam import GradCAM, combine
from cams.registry import register

__all__ = ["ShapleyCAM"]


@register("shapleycam")
class ShapleyCAM(GradCAM):
    r"""ShapleyCAM (Algorithm 1 of Cai, 2025) and its -H / -E variants.

    .. math::
        W = \frac{\partial U}{\partial A} - \tfrac12\, H A, \qquad
        H A = \frac{\partial}{\partial A}\Big(\frac{\partial U}{\partial A} \cdot v\Big)\Big|_{v=A}

    * ``"mean"`` (ShapleyCAM):    ``ReLU(Σ_k mean_hw(W_k) · A_k)``
    * ``"hires"`` (ShapleyCAM-H): ``ReLU(Σ_k W_k ⊙ A_k)``
    * ``"elementwise"`` (-E):     ``ReLU(Σ_k ReLU(W_k ⊙ A_k))``

    Default utility ``"rest"`` (``y_c + log softmax(y)_c`` per sample). With ``"logit"`` and only
    piecewise-linear ops, average pooling and a linear layer after ``A``, ``H·A = 0`` and the map
    equals Grad-CAM's. ``H·A`` comes from double backward w.r.t. ``A`` only, or in closed form on
    the fast path. Train-mode BatchNorm after the target is held at the batch's statistics (see
    :mod:`cams._base`); the rerun that does this runs BatchNorm through elementary ops, so a loss
    on the map can take the 3rd-order derivative.
    """

    default_utility = "rest"

    def _maps(self, x: Tensor, fwd: Forward, targets: Tensor, create_graph: bool) -> Tensor:
        g, hvp = self._grads(x, fwd, targets, create_graph, hvp=True)
        return combine(g - 0.5 * hvp, self._activation(fwd, create_graph), self.variant)
