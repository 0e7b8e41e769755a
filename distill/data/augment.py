"""Batched tensor augmentation (reflect-pad crop + horizontal flip) and CIFAR-10 normalization.

The augmentation is described by :class:`AugParams` (one crop offset and one flip flag per
sample), so exactly the same geometric transform can be applied to a second tensor of any
channel count (for example cached 32x32 explanation maps) with :meth:`AugParams.apply`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "AugParams", "denormalize_images", "normalize_images"]

# attention-transfer's CIFAR-10 statistics (0..1 scale)
CIFAR10_MEAN: tuple[float, float, float] = (125.3 / 255, 123.0 / 255, 113.9 / 255)
CIFAR10_STD: tuple[float, float, float] = (63.0 / 255, 62.1 / 255, 66.7 / 255)


def _channel_stats(x: Tensor) -> tuple[Tensor, Tensor]:
    mean = torch.tensor(CIFAR10_MEAN, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=x.device, dtype=torch.float32).view(1, 3, 1, 1)
    return mean, std


def normalize_images(images: Tensor) -> Tensor:
    """uint8 (B, 3, H, W) in 0..255 (or float in 0..1) -> float32 ``(x/255 - mean) / std``."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean, std = _channel_stats(x)
    return (x - mean) / std


def denormalize_images(x: Tensor) -> Tensor:
    """Inverse of :func:`normalize_images`: float (B, 3, H, W) -> float in 0..1."""
    mean, std = _channel_stats(x)
    return x * std + mean


def _reflect(pos: Tensor, size: int) -> Tensor:
    """Map positions in ``[-size+1, 2*size-2]`` into ``[0, size-1]`` by reflection (no edge)."""
    pos = pos.abs()
    return torch.where(pos > size - 1, 2 * (size - 1) - pos, pos)


@dataclass
class AugParams:
    """Per-sample parameters of "reflect-pad by ``pad``, random crop back to HxW, random h-flip".

    ``dy``, ``dx``: long (B,) crop offsets in ``[0, 2*pad]`` into the padded image (``pad`` = no
    shift); ``flip``: bool (B,), applied after the crop. For an input ``t`` the output is
    ``out[b, :, i, j] = padded[b, :, dy[b] + i, dx[b] + j']`` with ``j' = W-1-j`` when ``flip[b]``,
    where ``padded`` is ``t`` reflect-padded by ``pad`` pixels on every side.
    """

    dy: Tensor
    dx: Tensor
    flip: Tensor
    pad: int = 4

    @classmethod
    def sample(
        cls,
        batch_size: int,
        pad: int = 4,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> AugParams:
        """Draw uniform offsets in ``[0, 2*pad]`` and fair flips (on the generator's device)."""
        dev = generator.device if generator is not None else torch.device("cpu")
        dy = torch.randint(0, 2 * pad + 1, (batch_size,), generator=generator, device=dev)
        dx = torch.randint(0, 2 * pad + 1, (batch_size,), generator=generator, device=dev)
        flip = torch.rand(batch_size, generator=generator, device=dev) < 0.5
        params = cls(dy, dx, flip, pad)
        return params.to(device) if device is not None else params

    @classmethod
    def identity(
        cls, batch_size: int, pad: int = 4, device: torch.device | str | None = None
    ) -> AugParams:
        """Parameters that leave every sample unchanged."""
        offs = torch.full((batch_size,), pad, dtype=torch.long, device=device)
        return cls(
            offs, offs.clone(), torch.zeros(batch_size, dtype=torch.bool, device=device), pad
        )

    def __len__(self) -> int:
        return int(self.dy.shape[0])

    def __getitem__(self, idx: Tensor | slice | int) -> AugParams:
        """The parameters of a subset of the samples."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1)
        return AugParams(self.dy[idx], self.dx[idx], self.flip[idx], self.pad)

    def to(self, device: torch.device | str, **kwargs: object) -> AugParams:
        """Move to ``device`` (extra keywords such as ``non_blocking`` are accepted and ignored)."""
        return AugParams(self.dy.to(device), self.dx.to(device), self.flip.to(device), self.pad)

    def source_index(self, height: int, width: int) -> Tensor:
        """long (B, H, W): flat index ``r * W + c`` of the input pixel each output pixel copies."""
        if self.pad >= min(height, width):
            raise ValueError(
                f"reflect padding {self.pad} needs spatial size > {self.pad}, got {height}x{width}"
            )
        dev = self.dy.device
        ii = torch.arange(height, device=dev)
        jj = torch.arange(width, device=dev)
        jj = torch.where(self.flip[:, None], width - 1 - jj[None, :], jj[None, :])
        rows = _reflect(self.dy[:, None] + ii[None, :] - self.pad, height)
        cols = _reflect(self.dx[:, None] + jj - self.pad, width)
        return rows[:, :, None] * width + cols[:, None, :]

    def apply(self, t: Tensor) -> Tensor:
        """Apply the same crop/flip to ``t`` of shape (B, C, H, W) or (B, H, W), any dtype."""
        squeeze = t.dim() == 3
        if squeeze:
            t = t.unsqueeze(1)
        if t.dim() != 4 or t.shape[0] != len(self):
            raise ValueError(
                f"expected (B, C, H, W) or (B, H, W) with B={len(self)}, got {tuple(t.shape)}"
            )
        b, c, h, w = t.shape
        idx = self.source_index(h, w).to(t.device).reshape(b, 1, h * w).expand(b, c, h * w)
        out = t.reshape(b, c, h * w).gather(2, idx).reshape(b, c, h, w)
        return out.squeeze(1) if squeeze else out
