"""Score-CAM (Wang et al., 2020): channel weights from the scores of masked inputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cams._base import BaseCAM, Forward, weighted_sum
from cams._checks import check_positive_int
from cams._precision import upcast
from cams.registry import register

__all__ = ["ScoreCAM"]


@register("scorecam")
class ScoreCAM(BaseCAM):
    r"""Score-CAM, batched over (sample, channel) pairs in chunks of ``batch_size``.

    .. math::
        M_k = \frac{\mathrm{up}(A_k) - \min \mathrm{up}(A_k)}
                   {\max \mathrm{up}(A_k) - \min \mathrm{up}(A_k) + 10^{-8}}, \quad
        s_k = U\big(f(x \odot M_k), c\big), \quad
        w = \mathrm{softmax}_k(s), \quad
        L = \mathrm{ReLU}\Big(\sum_k w_k A_k\Big)

    ``up`` is bilinear with ``align_corners=True`` to the input size (as pytorch-grad-cam).
    Masks are built per chunk, so at most ``batch_size`` masked inputs exist at a time (peak
    memory is one forward of ``batch_size`` images, never ``B·K`` inputs).

    The scores are computed under ``no_grad`` with the model in eval mode and, for a train-mode
    model, with every BatchNorm using the batch statistics of the main forward (the function the
    model applied to this batch); BN running statistics are not touched by these evaluations.
    Inside a loss (``create_graph=True``) the weights ``w`` are constants: the map is
    differentiable through ``A`` only.

    Default utility ``"prob"`` (the softmax score of the original Score-CAM code); pytorch-grad-cam
    scores with the raw logit (``utility="logit"``).

    Args:
        batch_size: masked inputs per forward (default 64).
        max_channels: if set, score only the ``max_channels`` channels with the largest spatial
            mean activation per sample (the others get weight 0); the cost drops from ``K`` to
            ``max_channels`` forwards per image. ``None`` (default) is exact Score-CAM.
    """

    default_utility = "prob"
    quick_options = {"batch_size": 16}
    _needs_grad = False
    _reruns = True

    def __init__(
        self,
        model: nn.Module,
        target_layer: nn.Module | str,
        *,
        utility: str | None = None,
        relu: bool = True,
        batch_size: int = 64,
        max_channels: int | None = None,
    ) -> None:
        super().__init__(model, target_layer, utility=utility, relu=relu, fast_path=False)
        self.batch_size = check_positive_int("batch_size", batch_size)
        self.max_channels = check_positive_int("max_channels", max_channels, optional=True)

    def _maps(self, x: Tensor, fwd: Forward, targets: Tensor, create_graph: bool) -> Tensor:
        a = self._activation(fwd, create_graph)
        with torch.no_grad():
            with self._rerun(fwd):  # the masked inputs run in the caller's autocast dtype
                scores = self.selected_scores(x, a.detach(), targets)
            weights = torch.softmax(upcast(scores), 1)
        return weighted_sum(weights.to(a.dtype), a)

    def selected_scores(self, x: Tensor, a: Tensor, targets: Tensor) -> Tensor:
        """Scores (B, K); with ``max_channels``, unscored channels get ``-inf`` (weight 0)."""
        k = a.shape[1]
        if self.max_channels is None or self.max_channels >= k:
            return self.scores(x, a, targets)
        top = a.mean((2, 3)).topk(self.max_channels, dim=1).indices  # (B, m)
        picked = a.gather(1, top[:, :, None, None].expand(-1, -1, *a.shape[2:]))
        dtype = torch.promote_types(a.dtype, torch.float32)
        out = torch.full(a.shape[:2], float("-inf"), dtype=dtype, device=x.device)
        return out.scatter(1, top, self.scores(x, picked, targets))

    def scores(self, x: Tensor, a: Tensor, targets: Tensor) -> Tensor:
        """``s`` (B, K): the utility of every masked input ``x_i ⊙ M_ik``."""
        b, k, h, w = a.shape
        flat = a.reshape(b * k, 1, h, w)
        out = torch.empty(b * k, dtype=torch.promote_types(a.dtype, torch.float32), device=x.device)
        for start in range(0, b * k, self.batch_size):
            stop = min(start + self.batch_size, b * k)
            rows = torch.arange(start, stop, device=x.device) // k
            m = F.interpolate(
                flat[start:stop], size=x.shape[-2:], mode="bilinear", align_corners=True
            )
            lo, hi = m.amin((2, 3), keepdim=True), m.amax((2, 3), keepdim=True)
            m = (m - lo) / (hi - lo + 1e-8)
            logits = upcast(self.model(x[rows] * m))
            out[start:stop] = self.utility.value(logits, targets[rows])
        return out.view(b, k)
