"""``python -m distill.explain``: teacher and student maps side by side, agreement, bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cams
from distill.data import CIFAR10DataModule, normalize_images
from distill.explain import explain_figure, main, parse_students
from distill.models import WideResNet
from distill.train import train
from distill.visualize import figure_images
from tests.conftest import run_python, tiny
from tests.test_visualize import texts


@pytest.fixture(scope="module")
def student_run(tmp_path_factory: pytest.TempPathFactory, teacher_ckpt: Path) -> Path:
    """A finished 1-epoch gradcam_kd student run (its config records the teacher)."""
    root = tmp_path_factory.mktemp("runs")
    train(tiny(root, teacher_ckpt, "loss=gradcam_kd", "run_name=gkd", "callbacks=none"))
    return root / "train" / "gkd"


def save_net(path: Path, depth: int, seed: int) -> Path:
    """A WRN checkpoint without a run directory (only its recorded architecture)."""
    torch.manual_seed(seed)
    net = WideResNet(depth, 2)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "arch": net.arch}, path)
    return path


def synthetic_images(per_class: int = 1):
    dm = CIFAR10DataModule(source="synthetic", synthetic_size=64, synthetic_test_size=32)
    return figure_images(dm, per_class=per_class, split="test")


def load(path: Path, depth: int) -> WideResNet:
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    net = WideResNet(depth, 2)
    net.load_state_dict({k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")})
    return net.eval()


def test_cli_renders_run_dirs_and_checkpoints_with_agreement(
    student_run: Path, teacher_ckpt: Path, tmp_path: Path
) -> None:
    """The real CLI: a run directory (teacher found in its config) and a bare checkpoint."""
    other = save_net(tmp_path / "other.ckpt", 16, seed=3)
    out = tmp_path / "fig" / "explain.png"
    res = run_python(
        ["-m", "distill.explain", str(student_run), f"bare={other}", "--out", str(out),
         "--device", "cpu"]
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    width, height = Image.open(out).size
    assert width >= 800 and height >= 800
    record = json.loads(out.with_suffix(".json").read_text())
    assert record["teacher"] == str(teacher_ckpt)
    assert record["methods"] == ["gradcam"]  # the run's loss.method
    assert list(record["students"]) == ["gkd", "bare"]
    assert record["images"]["split"] == "test" and len(record["images"]["indices"]) == 10
    # agreement recomputed here: Grad-CAM of the teacher and the bare student on the same images
    dm = CIFAR10DataModule(source="synthetic", synthetic_size=64, synthetic_test_size=32)
    dm.load()
    idx = torch.tensor(record["images"]["indices"])
    x, y = normalize_images(dm.test_images[idx]), dm.test_labels[idx]
    t_maps = cams.GradCAM(load(teacher_ckpt, 10), "block3")(x, y)
    s_maps = cams.GradCAM(load(other, 16), "block3")(x, y)
    cos = F.cosine_similarity(s_maps.flatten(1), t_maps.flatten(1), dim=1, eps=1e-12)
    assert record["per_image_agreement"]["bare"]["gradcam"] == pytest.approx(cos.tolist(), 1e-4)
    assert record["mean_agreement"]["bare"]["gradcam"] == pytest.approx(cos.mean().item(), 1e-4)
    table = out.with_suffix(".md").read_text()
    assert f"| bare | {cos.mean().item():.3f} |" in table
    assert "| gkd | " in table and "explain.png" in res.stdout


def test_figure_shows_every_method_and_student_labelled(
    teacher_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import distill.explain as explain

    drawn: list[list] = []
    real_save = explain.save_figure

    def spy(fig, path, **kwargs):
        drawn.append(texts(fig))
        return real_save(fig, path, **kwargs)

    monkeypatch.setattr(explain, "save_figure", spy)
    students = {
        "a": save_net(tmp_path / "a.ckpt", 16, 1),
        "b": save_net(tmp_path / "b.ckpt", 10, 2),
    }
    images = synthetic_images()
    path = explain_figure(
        teacher_ckpt, students, images, ["gradcam", "gradcampp"], tmp_path / "f.png", device="cpu"
    )
    assert Image.open(path).size[0] >= 800
    small = [(t.get_text(), t.get_fontsize()) for t in drawn[0] if t.get_fontsize() < 10]
    assert not small, small
    words = [t.get_text() for t in drawn[0]]
    record = json.loads(path.with_suffix(".json").read_text())
    for method, name in (("gradcam", "GradCAM"), ("gradcampp", "GradCAMPlusPlus")):
        assert f"{name}\nteacher\nwrn-10-2" in words
        for label in students:
            mean = record["mean_agreement"][label][method]
            assert f"{name}\n{label}\nmean cos {mean:.2f}" in words
    for label in images.labels.tolist():
        assert images.classes[label] in words
    cos = [w for w in words if re.fullmatch(r"cos -?\d\.\d\d", w)]
    assert len(cos) == 2 * 2 * len(images.labels)  # methods x students x images
    marks = [w for w in words if w.endswith(("\u2713", "\u2717"))]
    assert len(marks) == 2 * 3 * len(images.labels)  # a prediction under every map


def test_parse_students_labels_and_refuses_duplicates() -> None:
    got = parse_students(["runs/x/gradcam_kd-s0", "kd=runs/y/checkpoints/last.ckpt", "a/b.ckpt"])
    assert got == {
        "gradcam_kd-s0": "runs/x/gradcam_kd-s0",
        "kd": "runs/y/checkpoints/last.ckpt",
        "b": "a/b.ckpt",
    }
    assert parse_students(["runs/y/checkpoints/last.ckpt"]) == {"y": "runs/y/checkpoints/last.ckpt"}
    with pytest.raises(ValueError, match="labelled 'x'.*LABEL=PATH"):
        parse_students(["r1/x", "r2/x"])


def corrupt(tmp_path: Path, teacher_ckpt: Path) -> Path:
    """A copy of the teacher with a matching sidecar, then one byte flipped."""
    from distill.integrity import checksum_path, sha256_file

    bad = tmp_path / "bad.ckpt"
    data = bytearray(teacher_ckpt.read_bytes())
    bad.write_bytes(bytes(data))
    checksum_path(bad).write_text(sha256_file(bad) + "\n")
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    return bad


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "does not exist: pass a run directory or a .ckpt file"),
        ("empty_dir", "has no checkpoints/last.ckpt"),
        ("text_file", "is not a readable checkpoint"),
        ("corrupted", "corrupted"),
        ("method", "unknown CAM method nocam; choose from"),
        ("layer", "--layer 'blok3' is not a module"),
        ("no_data", "--data data=cifar10_folder"),
        ("per_class", "--per-class and --max-classes must be >= 1"),
    ],
)
def test_bad_input_is_one_line_error_exit_2(
    case: str, message: str, tmp_path: Path, teacher_ckpt: Path, capsys: pytest.CaptureFixture
) -> None:
    student = str(save_net(tmp_path / "s.ckpt", 16, 0))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.ckpt").write_text("not a checkpoint\n")
    teacher, extra = str(teacher_ckpt), ["--data", "data=synthetic"]
    args = {
        "missing": [str(tmp_path / "nope")],
        "empty_dir": [str(tmp_path / "empty")],
        "text_file": [str(tmp_path / "notes.ckpt")],
        "corrupted": [f"x={corrupt(tmp_path, teacher_ckpt)}"],
        "method": [student, "--methods", "gradcam,nocam"],
        "layer": [student, "--layer", "blok3"],
        "no_data": [student],
        "per_class": [student, "--per-class", "0"],
    }[case]
    if case == "no_data":
        extra = []
    code = main([*args, "--teacher", teacher, *extra, "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "o.png").exists()


def test_missing_recorded_teacher_names_the_fix(student_run: Path, tmp_path: Path) -> None:
    import shutil

    from omegaconf import OmegaConf

    run = tmp_path / "moved"
    shutil.copytree(student_run, run)
    cfg = OmegaConf.load(run / "config_resolved.yaml")
    cfg.module.teacher_checkpoint = str(tmp_path / "gone.ckpt")
    OmegaConf.save(cfg, run / "config_resolved.yaml")
    res = run_python(["-m", "distill.explain", str(run), "--out", str(tmp_path / "o.png")])
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"error: the teacher recorded by moved, {tmp_path / 'gone.ckpt'}, does not exist: "
        "pass --teacher PATH"
    ]
