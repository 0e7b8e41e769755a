"""``cams.upsample`` / ``overlay`` / ``to_uint8`` / ``save_png`` against independent references:
Pillow's resize and PNG reader, and the blend formula written out by hand."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cams


@pytest.mark.parametrize("size", [(32, 32), (20, 33)])
def test_upsample_equals_pillow_bilinear(size: tuple[int, int]) -> None:
    maps = torch.rand(2, 8, 6, generator=torch.Generator().manual_seed(0))
    ours = cams.upsample(maps, size).numpy()
    for m, o in zip(maps, ours, strict=True):
        pil = Image.fromarray(m.numpy()).resize(size[::-1], Image.Resampling.BILINEAR)
        np.testing.assert_allclose(o, np.asarray(pil), atol=1e-5)


def test_overlay_is_the_blend_formula_by_hand() -> None:
    # a map at the image's size (no resize): values 0, 1, 2, 4 -> min-max 0, 1/4, 1/2, 1
    maps = torch.tensor([[[0.0, 1.0], [2.0, 4.0]]])
    images = torch.tensor([0.2, 0.4, 0.6]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    jet = {0.0: (0, 0, 0.5), 0.25: (0, 0.5, 1), 0.5: (0.5, 1, 0.5), 1.0: (0.5, 0, 0)}
    alpha = 0.3
    out = cams.overlay(images, maps, alpha=alpha)
    for (i, j), t in zip([(0, 0), (0, 1), (1, 0), (1, 1)], jet, strict=True):
        want = [(1 - alpha) * v + alpha * c for v, c in zip((0.2, 0.4, 0.6), jet[t], strict=True)]
        torch.testing.assert_close(out[0, :, i, j], torch.tensor(want))


def test_to_uint8_and_save_png_round_trip(tmp_path: Path) -> None:
    images = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(1))
    images[0, 0, 0, 0], images[0, 1, 0, 0] = -0.5, 1.5  # clamped
    rgb = cams.to_uint8(images)
    by_hand = np.rint(np.clip(images.numpy(), 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    assert rgb.dtype == torch.uint8 and rgb.shape == (2, 4, 5, 3)
    np.testing.assert_array_equal(rgb.numpy(), by_hand)
    assert cams.to_uint8(images[1]).shape == (4, 5, 3)

    path = cams.save_png(images, tmp_path / "row.png", scale=3)
    read = np.asarray(Image.open(path).convert("RGB"))
    assert read.shape == (12, 30, 3)  # two images side by side, each 3x larger
    np.testing.assert_array_equal(read[::3, ::3], np.concatenate(list(by_hand), axis=1))
    np.testing.assert_array_equal(read[1::3, 2::3], read[::3, ::3])  # nearest neighbour
    single = np.asarray(Image.open(cams.save_png(images[0], tmp_path / "one.png")))
    np.testing.assert_array_equal(single, by_hand[0])


def test_bad_image_helper_input() -> None:
    with pytest.raises(ValueError, match=r"images must be a tensor \(B, 3, H, W\)"):
        cams.to_uint8(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="scale must be a positive int"):
        cams.save_png(torch.rand(3, 2, 2), "x.png", scale=0)
