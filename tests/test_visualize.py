"""The CAM figure of a student run: labels, size, colour scales, fixed images, files and loggers."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cams
from distill.data import CIFAR10DataModule, make_synthetic, normalize_images
from distill.models import WideResNet
from distill.train import train
from distill.visualize import (
    FigureImages,
    cam_figure,
    figure_images,
    last_figure,
    pick_images,
    save_figure,
    shared_scale,
)
from tests.conftest import tiny

CHECK, CROSS = "\u2713", "\u2717"


def texts(fig) -> list:
    """Every non-empty text artist drawn in ``fig`` (figure texts, axes titles, labels, ticks)."""
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]


def real_maps(per_class: int = 2):
    """Images of synthetic data and Grad-CAM maps/logits of two tiny random WRNs."""
    data = make_synthetic(64, 32, seed=0)
    pos = pick_images(data.test_labels, per_class, 10)
    images = FigureImages(data.test_images[pos], data.test_labels[pos], pos, "test", data.classes)
    x = normalize_images(images.images)
    out = {}
    for side, depth in (("teacher", 10), ("student", 16)):
        torch.manual_seed(depth)
        net = WideResNet(depth, 2).eval()
        with torch.no_grad():
            logits = net(x)
        out[side] = (cams.GradCAM(net, "block3")(x, images.labels), logits)
    return images, out


def test_cam_figure_is_labelled_readable_and_right(tmp_path: Path) -> None:
    images, out = real_maps()
    (t_maps, t_logits), (s_maps, s_logits) = out["teacher"], out["student"]
    fig = cam_figure(
        images, t_maps, s_maps, t_logits, s_logits, method="GradCAM", layer="block3",
        names=("wrn-10-2", "wrn-16-2"), epoch=4, blocks=2,
    )  # fmt: skip
    path = save_figure(fig, tmp_path / "fig.png")
    width, height = Image.open(path).size
    assert width >= 800 and height >= 800, (width, height)
    small_png = save_figure(fig, tmp_path / "palette.png", palette=True)
    with Image.open(small_png) as img:
        assert img.mode == "P" and img.size == (width, height)
    assert small_png.stat().st_size < 0.6 * path.stat().st_size
    drawn = texts(fig)
    small = [(t.get_text(), t.get_fontsize()) for t in drawn if t.get_fontsize() < 10]
    assert not small, small
    words = [t.get_text() for t in drawn]
    for header in ("input", "teacher\nwrn-10-2", "student\nwrn-16-2", "student \u2212 teacher"):
        assert words.count(header) == 2, header  # once per block of columns
    assert any("GradCAM" in w and "block3" in w and "epoch 4" in w for w in words)
    assert any("map / row maximum" in w for w in words)  # colour bar labels
    assert any("student \u2212 teacher / row maximum" in w for w in words)
    # rows: which image, its true class, both predictions (right or wrong) and the agreement
    n = len(images.labels)
    assert [w for w in words if w.startswith("test #")] == images.row_labels()
    for i in range(n):
        true = images.classes[images.labels[i]]
        assert true in words
        for prefix, logits in (("T: ", t_logits), ("S: ", s_logits)):
            pred = int(logits[i].argmax())
            mark = CHECK if pred == images.labels[i] else CROSS
            assert f"{prefix}{images.classes[pred]} {mark}" in words
    cos = [float(m[1]) for w in words if (m := re.fullmatch(r"cos (-?\d\.\d\d)", w))]
    expected = F.cosine_similarity(s_maps.flatten(1), t_maps.flatten(1), dim=1, eps=1e-12)
    assert cos == pytest.approx(expected.tolist(), abs=0.006)


def test_teacher_and_student_share_each_rows_colour_scale() -> None:
    peaked = torch.zeros(2, 8, 8)
    peaked[:, 3, 4] = 5.0
    flat = torch.full((2, 8, 8), 0.3)
    (t, s), scale = shared_scale([peaked, flat], (8, 8))
    assert t.abs().amax() == pytest.approx(1.0)  # the row's largest value is the peaked map's
    assert s.amax() == pytest.approx(1 / 8)  # a flat L2-normalized 8x8 map is 1/8 everywhere
    (t2, s2), _ = shared_scale([peaked * 100, flat * 0.01], (8, 8))  # scale-free per map
    torch.testing.assert_close(t2, t)
    torch.testing.assert_close(s2, s)
    up, _ = shared_scale([peaked], (32, 32))
    assert up[0].shape == (2, 32, 32)


def test_signed_maps_get_a_signed_colour_bar(tmp_path: Path) -> None:
    images, out = real_maps(per_class=1)
    t_maps, t_logits = out["teacher"]
    fig = cam_figure(images, t_maps - t_maps.mean(), t_maps, t_logits, t_logits)
    words = [t.get_text() for t in texts(fig)]
    assert any(w.startswith("signed map / row maximum") for w in words)
    assert Image.open(save_figure(fig, tmp_path / "s.png")).size[0] >= 800


def test_images_are_the_first_of_each_class_validation_else_test() -> None:
    labels = torch.tensor([3, 1, 1, 0, 3, 1, 0, 2])
    assert pick_images(labels, 2).tolist() == [3, 6, 1, 2, 7, 0, 4]
    assert pick_images(labels, 1, max_classes=2).tolist() == [3, 1]
    plain = CIFAR10DataModule(source="synthetic", synthetic_size=64, synthetic_test_size=32)
    plain.setup("fit")
    chosen = figure_images(plain, per_class=2)
    assert chosen.split == "test" and len(chosen.labels) == 20
    torch.testing.assert_close(chosen.images, plain.test_images[chosen.indices])
    for seed in (0, 1):  # other shuffling seeds: the same images
        with_val = CIFAR10DataModule(
            source="synthetic", synthetic_size=64, val_size=20, shuffle_seed=seed
        )
        with_val.setup("fit")
        val = figure_images(with_val, per_class=2)
        assert val.split == "validation" and set(val.indices.tolist()) <= set(
            with_val.val_indices.tolist()
        )
        torch.testing.assert_close(val.images, with_val.train_images[val.indices])
        assert val.row_labels()[0].startswith("val #")
        if seed == 0:
            first = val.indices
    assert torch.equal(first, val.indices)


@pytest.mark.slow
def test_student_run_writes_figures_of_the_same_images_to_files_and_loggers(
    tmp_path: Path, teacher_ckpt: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 2-epoch gradcam run with a figure every epoch, TensorBoard and offline wandb."""
    import distill.visualize as visualize

    saved: list[list[str]] = []
    real_save = visualize.save_figure

    def spy(fig, path, **kwargs):  # record what each saved figure says
        saved.append([t.get_text() for t in texts(fig)])
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(visualize, "save_figure", spy)
    cfg = tiny(
        tmp_path, teacher_ckpt, "loss=gradcam", "run_name=fig", "trainer.max_epochs=2",
        "loss.grid_every_n_epochs=1", "logger=[csv,tensorboard,wandb]",
        "logger.wandb.offline=true",
    )  # fmt: skip
    metrics = train(cfg)
    run = tmp_path / "train" / "fig"
    pngs = sorted((run / "cam_grids").glob("*.png"))
    assert [p.name for p in pngs] == ["epoch_000.png", "epoch_001.png"]
    assert last_figure(run) == pngs[-1]
    assert json.loads((run / "metrics.json").read_text())["cam_figure"] == str(pngs[-1])
    assert metrics["cam_figure"] == str(pngs[-1])
    sizes = {Image.open(p).size for p in pngs}
    assert len(sizes) == 1 and next(iter(sizes))[0] >= 800
    # the same images (row labels, true classes) every epoch; the maps moved
    rows = [[w for w in words if w.startswith("test #")] for words in saved]
    assert len(rows) == 2 and rows[0] == rows[1] and len(rows[0]) == 20
    cos = [[w for w in words if w.startswith("cos ")] for words in saved]
    assert cos[0] != cos[1]
    # TensorBoard holds both figures at full size
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logged = []  # a run may write several event files (fit, test)
    for event_file in sorted((run / "tensorboard").rglob("events.out.tfevents.*")):
        events = EventAccumulator(str(event_file), size_guidance={"images": 0})
        events.Reload()
        if "cam_figure" in events.Tags()["images"]:
            logged += events.Images("cam_figure")
    assert len(logged) == 2 and (logged[0].width, logged[0].height) == next(iter(sizes))
    # wandb (offline) keeps the image files
    media = list((run / "wandb").glob("offline-run-*/files/media/images/cam_figure_*.png"))
    assert len(media) == 2


def test_runs_without_a_cam_term_draw_no_figure(tmp_path: Path, teacher_ckpt: Path) -> None:
    assert (
        train(
            tiny(tmp_path, teacher_ckpt, "loss=ce_kd", "run_name=kd", "loss.grid_every_n_epochs=1")
        )["cam_figure"]
        is None
    )
    assert not (tmp_path / "train" / "kd" / "cam_grids").exists()
    assert last_figure(tmp_path / "train" / "kd") is None
