"""Student module: presets, teacher handling, cached vs online teacher maps, resume, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from distill.data.augment import AugParams
from distill.precompute import precompute
from distill.presets import loss_presets, table_methods
from distill.teacher import CacheError, TeacherError
from distill.train import train
from tests.conftest import TINY, compose_cfg, student, tiny

PRESETS = [p for p in loss_presets() if p != "ce"]  # every preset of configs/loss
METHODS = table_methods()[1:]  # every registered CAM method with its two presets


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_composes_into_a_student(preset, tmp_path, teacher_ckpt):
    cfg = tiny(tmp_path, teacher_ckpt, f"loss={preset}")
    assert cfg.module._target_ == "distill.modules.student.StudentModule"
    assert cfg.loss.name == preset and cfg.loss.kd.enabled == preset.endswith("_kd")
    method = preset.removesuffix("_kd")
    assert cfg.loss.method == (method if method in METHODS else None)
    assert cfg.loss.teacher_maps == ("cache" if method == "shapcam" else "online")


@pytest.mark.parametrize("preset", [f"{m}_kd" if i % 2 == 0 else m for i, m in enumerate(METHODS)])
def test_one_training_step_uses_every_term(preset, tmp_path, teacher_ckpt):
    cfg = tiny(
        tmp_path,
        teacher_ckpt,
        f"loss={preset}",
        "++loss.student_cam.max_channels=4" if preset.startswith("scorecam") else "loss.alpha=1.0",
        *(
            [
                "loss.teacher_maps=online",
                "loss.teacher_cam.n_permutations=32",
                "loss.student_cam.n_permutations=8",
            ]
            if preset.startswith("shapcam")
            else []
        ),
    )
    module = student(cfg).train()
    assert not module.teacher.training
    gen = torch.Generator().manual_seed(0)
    batch = {
        "image": torch.randn(6, 3, 32, 32, generator=gen),
        "label": torch.arange(6),
        "index": torch.arange(6),
        "aug": AugParams.sample(6, generator=gen),
    }
    loss, logits, terms = module.compute_loss(batch)
    assert set(terms) == {"ce", "cam"} | ({"kd"} if preset.endswith("_kd") else set())
    assert logits.shape == (6, 10) and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in module.net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in module.teacher.parameters())
    # the explanation term alone reaches the student's parameters
    module.net.zero_grad()
    _, _, terms = module.compute_loss(batch)
    terms["cam"].backward()
    assert sum(float(p.grad.abs().sum()) for p in module.net.parameters() if p.grad is not None) > 0


def test_cached_teacher_maps_equal_online_maps(tmp_path, teacher_ckpt):
    """Precomputed maps, looked up by index with identity augmentation, match online maps."""
    cfg = tiny(tmp_path, teacher_ckpt, "loss=gradcam", "data.train_subset=40")
    cached = tiny(
        tmp_path, teacher_ckpt, "loss=gradcam", "loss.teacher_maps=cache", "data.train_subset=40"
    )
    directory = precompute(cached)
    assert Path(directory).parent == tmp_path / "cache"
    module = student(cached)
    import hydra

    dm = hydra.utils.instantiate(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    module.teacher.load_cache(dm)
    from distill.data.augment import normalize_images

    assert len(module.teacher.cached_maps) == 40  # only the training split is precomputed
    idx = dm.train_indices[torch.tensor([3, 0, 17, 39])]
    batch = {
        "image": normalize_images(dm.train_images[idx]),
        "label": dm.train_labels[idx],
        "index": idx,
        "aug": AugParams.identity(4),
    }
    _, from_cache = module.teacher.outputs(batch, need_logits=False)
    online = student(cfg)
    _, live = online.teacher.outputs(batch, need_logits=False)
    torch.testing.assert_close(from_cache, live, rtol=1e-4, atol=1e-5)
    outside = torch.tensor(sorted(set(range(64)) - set(dm.train_indices.tolist()))[:2])
    with pytest.raises(CacheError, match="another training split"):
        module.teacher.cached(outside, None)


def test_missing_cache_names_the_precompute_command(tmp_path, teacher_ckpt):
    cfg = tiny(tmp_path, teacher_ckpt, "loss=shapcam")
    with pytest.raises(CacheError, match="python -m distill.precompute"):
        train(cfg)


def test_missing_teacher_gives_the_training_command(tmp_path):
    cfg = compose_cfg(*TINY, f"paths.log_dir={tmp_path}", "loss=gradcam_kd")
    with pytest.raises(TeacherError, match="python train.py experiment=teacher"):
        student(cfg)
    with pytest.raises(TeacherError, match="does not exist"):
        student(compose_cfg(*TINY, "loss=ce_kd", f"teacher.checkpoint={tmp_path}/none.ckpt"))


def test_teacher_of_another_architecture_is_refused(tmp_path, teacher_ckpt):
    cfg = tiny(tmp_path, teacher_ckpt, "loss=ce_kd", "teacher.model.depth=16")
    with pytest.raises(TeacherError, match="does not fit teacher.model"):
        student(cfg)


def test_map_shape_mismatch_stops_before_training(tmp_path, teacher_ckpt):
    """16x16 student maps against 8x8 teacher maps are pooled to 8x8 (tests/test_map_alignment.py);
    a size that divides neither cannot be reached by pooling and stops the run at construction."""
    cfg = tiny(tmp_path, teacher_ckpt, "loss=gradcam", "loss.student_layer=block2")
    assert student(cfg).objectives[-1].size == (8, 8)
    cfg = tiny(
        tmp_path, teacher_ckpt, "loss=gradcam", "loss.student_layer=block2", "loss.map_size=3"
    )
    with pytest.raises(ValueError, match=r"cannot be aligned .* set loss\.map_size=8"):
        student(cfg)


@pytest.mark.parametrize("alpha", ["-1", "nan", "inf"])
def test_bad_alpha_is_refused(tmp_path, teacher_ckpt, alpha):
    with pytest.raises(ValueError, match="loss.alpha"):
        student(tiny(tmp_path, teacher_ckpt, "loss=gradcam", f"loss.alpha={alpha}"))


def test_the_finished_teacher_run_is_found_without_a_path(tmp_path, teacher_ckpt):
    cfg = compose_cfg(*TINY, f"paths.log_dir={tmp_path}", "loss=ce_kd", "teacher.epochs=1")
    run_dir = Path(cfg.teacher.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(teacher_ckpt.read_bytes())
    with pytest.raises(TeacherError):  # not finished yet: no metrics.json
        student(cfg)
    (run_dir / "metrics.json").write_text("{}")
    assert student(cfg).teacher_checkpoint == str(run_dir / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_interrupted_run_resumes_with_the_same_losses(tmp_path, teacher_ckpt):
    """2 epochs straight == 1 epoch, stop, resume to 2 epochs (same seed, same run dir)."""
    common = ["loss=gradcam_kd", "trainer.deterministic=true", "module.scheduler.milestones=[1]"]

    def run(name: str, epochs: int) -> dict:
        cfg = tiny(
            tmp_path, teacher_ckpt, *common, f"run_name={name}", f"trainer.max_epochs={epochs}"
        )
        OmegaConf.set_struct(cfg, False)
        return train(cfg)

    straight = run("straight", 2)
    run("resumed", 1)
    resumed = run("resumed", 2)
    assert resumed["test_error"] == pytest.approx(straight["test_error"], abs=1e-9)
    logs = {}
    for name in ("straight", "resumed"):
        metrics = sorted((tmp_path / "train" / name).rglob("metrics.csv"))
        rows = [line.split(",") for p in metrics for line in p.read_text().splitlines()]
        logs[name] = rows
    a = json.loads((tmp_path / "train" / "straight" / "metrics.json").read_text())
    b = json.loads((tmp_path / "train" / "resumed" / "metrics.json").read_text())
    assert a["test_error"] == b["test_error"]
    sa = torch.load(
        tmp_path / "train" / "straight" / "checkpoints" / "last.ckpt", weights_only=False
    )["state_dict"]
    sb = torch.load(
        tmp_path / "train" / "resumed" / "checkpoints" / "last.ckpt", weights_only=False
    )["state_dict"]
    assert sa.keys() == sb.keys() and not any(k.startswith("teacher.") for k in sa)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-6)


def test_run_logs_terms_agreement_and_cam_grid(tmp_path, teacher_ckpt):
    cfg = tiny(
        tmp_path, teacher_ckpt, "loss=gradcam_kd", "run_name=grid", "loss.grid_every_n_epochs=10"
    )
    metrics = train(cfg)
    run_dir = tmp_path / "train" / "grid"
    assert metrics["test_error"] is not None
    grid = run_dir / "cam_grids" / "epoch_000.png"
    assert grid.exists() and grid.stat().st_size > 500
    header = next(run_dir.rglob("metrics.csv")).read_text().splitlines()[0].split(",")
    for key in ("train/ce", "train/kd", "train/cam", "train/map_agreement"):
        assert key in header, header


def test_unknown_loss_preset_lists_the_options():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="shapleycam_kd"):
        compose_cfg("loss=shapleycam_kdd")
