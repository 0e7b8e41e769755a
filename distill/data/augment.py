"""Batched tensor augmentation (reflect-pad crop + horizontal flip) and per-dataset normalization.

The augmentation is described by :class:`AugParams` (one crop offset and one flip flag per
sample), so exactly the same geometric transform can be applied to a second tensor of any
channel count (for example cached 32x32 explanation maps) with :meth:`AugParams.apply`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from distill.data.datasets import CIFAR10, DatasetSpec, get_dataset

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "AugParams", "denormalize_images", "normalize_images"]

CIFAR10_MEAN = CIFAR10.mean  # attention-transfer's CIFAR-10 statistics (0..1 scale)
CIFAR10_STD = CIFAR10.std


def normalize_images(images: Tensor, dataset: str | DatasetSpec | None = None) -> Tensor:
    """uint8 (B, 3, H, W) in 0..255 (or float in 0..1) -> float32 ``(x/255 - mean) / std`` with
    the ``mean``/``std`` of ``dataset`` (a :data:`~distill.data.datasets.DATASETS` name or
    entry; None: CIFAR-10)."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean, std = get_dataset(dataset).stats(x.device)
    return (x - mean) / std


def denormalize_images(x: Tensor, dataset: str | DatasetSpec | None = None) -> Tensor:
    """Inverse of :func:`normalize_images`: float (B, 3, H, W) -> float in 0..1."""
    mean, std = get_dataset(dataset).stats(x.device)
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
