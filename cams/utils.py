"""Helpers for maps (B, h, w): normalization, upsampling, colored overlays, 8-bit images and
PNG files (torch only; :func:`save_png` imports Pillow when called)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NORMALIZATIONS", "jet", "normalize", "overlay", "save_png", "to_uint8", "upsample"]

NORMALIZATIONS: tuple[str, ...] = ("l2", "minmax", "none")


def _check_maps(maps: Tensor) -> None:
    if not isinstance(maps, Tensor) or maps.dim() != 3:
        shape = tuple(maps.shape) if isinstance(maps, Tensor) else type(maps).__name__
        raise ValueError(f"maps must be a tensor (B, h, w), got {shape}")


def normalize(maps: Tensor, kind: str = "minmax", eps: float = 1e-12) -> Tensor:
    """Per-sample normalization of maps (B, h, w); differentiable and NaN-safe.

    * ``"l2"``:     ``m / ||m||_2`` (flattened map)
    * ``"minmax"``: ``(m - min m) / (max m - min m)``
    * ``"none"``:   ``m``

    A map whose norm (or range) is ``<= eps`` (e.g. all zeros) becomes all zeros, never NaN.
    """
    _check_maps(maps)
    if kind == "none":
        return maps
    flat = maps.flatten(1)
    if kind == "l2":
        scale = flat.norm(dim=1)
    elif kind == "minmax":
        low = flat.amin(1)
        flat = flat - low[:, None]
        scale = flat.amax(1)
    else:
        raise ValueError(
            f"unknown normalization {kind!r}; choose one of {', '.join(NORMALIZATIONS)}"
        )
    ok = scale > eps
    safe = torch.where(ok, scale, torch.ones_like(scale))
    return torch.where(ok[:, None], flat / safe[:, None], torch.zeros_like(flat)).view_as(maps)


def upsample(
    maps: Tensor,
    size: int | tuple[int, int],
    mode: str = "bilinear",
    align_corners: bool | None = False,
) -> Tensor:
    """Resize maps (B, h, w) to ``size`` (e.g. the input's (H, W)) with ``F.interpolate``.

    The default (bilinear, half-pixel centres) equals Pillow's ``Image.resize(..., BILINEAR)``
    when enlarging (to float32 rounding)."""
    _check_maps(maps)
    if isinstance(size, int):
        size = (size, size)
    kwargs = {"align_corners": align_corners} if mode in ("bilinear", "bicubic") else {}
    return F.interpolate(maps[:, None], size=tuple(size), mode=mode, **kwargs)[:, 0]


def jet(t: Tensor) -> Tensor:
    """The 'jet' colormap: values in [0, 1] (any shape S) to RGB (*S, 3) in [0, 1].

    Piecewise linear: ``channel_c(t) = clamp(1.5 - |4t - c|, 0, 1)``, ``c = 3, 2, 1`` for R, G, B.
    """
    t = t.clamp(0, 1)[..., None]
    centers = torch.tensor([3.0, 2.0, 1.0], dtype=t.dtype, device=t.device)
    return (1.5 - (4 * t - centers).abs()).clamp(0, 1)


def overlay(images: Tensor, maps: Tensor, alpha: float = 0.5) -> Tensor:
    """Blend a jet-colored heat map over images (B, 3, H, W) in [0, 1]; returns (B, 3, H, W).

    ``maps`` (B, h, w) are min-max normalized per sample and bilinearly resized to (H, W);
    ``out = (1 - alpha) · image + alpha · jet(map)``.
    """
    _check_maps(maps)
    if images.dim() != 4 or images.shape[1] != 3 or images.shape[0] != maps.shape[0]:
        raise ValueError(
            f"images must be (B, 3, H, W) with B = {maps.shape[0]}, got {tuple(images.shape)}"
        )
    heat = normalize(upsample(maps.to(images.dtype), images.shape[-2:]), "minmax")
    return ((1 - alpha) * images + alpha * jet(heat).permute(0, 3, 1, 2)).clamp(0, 1)


def to_uint8(images: Tensor) -> Tensor:
    """Images (B, 3, H, W) or (3, H, W) in [0, 1] (e.g. :func:`overlay`'s output) to RGB
    ``uint8`` arrays (B, H, W, 3) or (H, W, 3) on the CPU: ``round(255 · clamp(v, 0, 1))``.

    ``.numpy()`` of the result is what Pillow, matplotlib or cv2 (after ``[..., ::-1]``) take.
    """
    if not isinstance(images, Tensor) or images.dim() not in (3, 4) or images.shape[-3] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a tensor (B, 3, H, W) or (3, H, W), got {shape}")
    rgb = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return rgb.movedim(-3, -1).cpu()


def save_png(images: Tensor, path: str | Path, scale: int = 1) -> Path:
    """Write images (B, 3, H, W) or (3, H, W) in [0, 1] to one PNG, side by side in a row, each
    enlarged ``scale`` times (nearest neighbour, so a 32-pixel CIFAR image stays sharp).

    Returns the path; the file is ``B·W·scale`` pixels wide and ``H·scale`` high."""
    from PIL import Image

    if isinstance(scale, bool) or not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    rgb = to_uint8(images)
    row = rgb if rgb.dim() == 3 else torch.cat(list(rgb), dim=1)  # (H, B·W, 3)
    row = row.repeat_interleave(scale, 0).repeat_interleave(scale, 1)
    path = Path(path)
    Image.fromarray(row.numpy()).save(path, format="PNG")
    return path
