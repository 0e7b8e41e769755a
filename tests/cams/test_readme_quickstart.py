"""cams/README.md's quick start, run exactly as written (a subprocess in a folder holding a
random WRN-10-2 checkpoint and a synthetic 32x32 ``cat.png``), and its PNG checked against an
independent load of the same weights and image."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import cams
from tests.conftest import REPO_ROOT, run_python


def quickstart_code() -> str:
    text = (REPO_ROOT / "cams" / "README.md").read_text()
    head = text.split("\n## ", 2)[1]  # the first section after the title
    assert head.startswith("Quick start"), "the README must open with its quick start"
    (code,) = re.findall(r"```python\n(.*?)```", head, flags=re.S)
    assert len(code.strip().splitlines()) <= 16
    return code


def test_readme_quickstart_writes_the_overlay_png(tmp_path: Path) -> None:
    from distill.models import WideResNet

    torch.manual_seed(0)
    net = WideResNet(10, 2).eval()
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save(
        {"state_dict": state, "hyper_parameters": {"arch": "wrn10_2"}}, tmp_path / "teacher.ckpt"
    )
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "cat.png")
    (tmp_path / "quickstart.py").write_text(quickstart_code())

    res = run_python(["-W", "error", "quickstart.py"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]

    png = np.asarray(Image.open(tmp_path / "cat_gradcam.png"))
    assert png.shape == (256, 256, 3) and png.dtype == np.uint8
    # independent: the weights as saved, the CIFAR-10 normalization written out, no load_network
    mean = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1)
    std = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1)
    img = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
    x = (img - mean) / std
    maps = cams.GradCAM(net, net.block3)(x, [3])
    assert maps.shape == (1, 8, 8) and maps.max() > 0
    expected = cams.to_uint8(cams.overlay(img / 255, maps))[0].numpy()
    diff = np.abs(png[::8, ::8].astype(int) - expected.astype(int))
    assert diff.max() <= 1  # float rounding of the normalization
    assert (png == np.kron(png[::8, ::8], np.ones((8, 8, 1), dtype=np.uint8))).all()
