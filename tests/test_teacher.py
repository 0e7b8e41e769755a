"""The teacher component (issue 13): one object for the student and the precompute, cache
identity unchanged, only the teacher built by ``python -m distill.precompute``."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from distill.modules.student import StudentModule
from distill.precompute import precompute
from distill.teacher import Teacher, teacher_fingerprint
from distill.teacher.cache import MapCache
from tests.conftest import compose_cfg, student, tiny

# Computed by the code before the teacher component existed (distill/teacher_maps.py at
# 73f4fae) for the inputs of test_fingerprint_of_a_fixed_config_is_unchanged: caches written
# before the change keep their directory and stay valid.
OLD_KEY = "15a2d70429ca9187f231941aaac3e112c66a9cbc4031ee67c635e93f778e48d7"


def test_fingerprint_of_a_fixed_config_is_unchanged(tmp_path: Path) -> None:
    ckpt = tmp_path / "fixed.ckpt"
    ckpt.write_bytes(b"not really a checkpoint\n")
    options = {"n_permutations": 16, "seed": 0, "chunk_size": 8, "num_threads": 1, "batch_size": 4}
    indices = torch.tensor([1, 3, 5, 9])
    fp = teacher_fingerprint(ckpt, "shapcam", "block3", options, "synthetic:n=64", indices)
    assert MapCache(tmp_path, fp, 4).key == OLD_KEY
    assert fp["options"] == {"n_permutations": 16, "seed": 0}  # execution options left out


def test_student_and_precompute_share_the_teacher_cache(tmp_path, teacher_ckpt) -> None:
    cfg = tiny(tmp_path, teacher_ckpt, "loss=gradcam", "loss.teacher_maps=cache")
    teacher = Teacher.from_config(cfg)
    module = student(cfg)
    assert isinstance(module.teacher, Teacher) and module.teacher_cam is module.teacher.cam
    dm = SimpleNamespace(dataset_id="synthetic:n=64", train_indices=torch.tensor([4, 0, 2]))
    a, b = teacher.cache_for(dm), module.teacher.cache_for(dm)
    assert a.directory == b.directory == tmp_path / "cache" / a.key[:16]
    assert a.fingerprint == b.fingerprint and a.num_samples == 3


def test_precompute_builds_only_the_teacher(tmp_path, teacher_ckpt, monkeypatch) -> None:
    def no_student(*args, **kwargs):
        raise AssertionError("precompute must not build a student")

    monkeypatch.setattr(StudentModule, "__init__", no_student)
    cfg = tiny(tmp_path, teacher_ckpt, "loss=gradcam", "data.train_subset=20")
    cached = tiny(
        tmp_path, teacher_ckpt, "loss=gradcam", "loss.teacher_maps=cache", "data.train_subset=20"
    )
    assert (Path(precompute(cached)) / "manifest.json").is_file()
    assert (Path(precompute(cfg)) / "meta.json").is_file()  # an online preset: the memo


def test_teacher_stays_frozen_and_out_of_student_checkpoints(tmp_path, teacher_ckpt) -> None:
    module = student(tiny(tmp_path, teacher_ckpt, "loss=ce_kd")).train()
    assert not module.teacher.training and not module.teacher.net.training
    assert not any(p.requires_grad for p in module.teacher.parameters())
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    assert checkpoint["state_dict"] and not any(
        k.startswith("teacher.") for k in checkpoint["state_dict"]
    )
    checkpoint["state_dict"]["teacher.stale"] = torch.zeros(1)  # an older checkpoint's leftovers
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])  # strict: teacher keys are the current ones


def test_kd_settings_come_from_the_schema(tmp_path, teacher_ckpt) -> None:
    module = student(tiny(tmp_path, teacher_ckpt, "loss=ce_kd", "loss.kd.beta=0.5"))
    assert (module.loss_cfg.kd.beta, module.loss_cfg.kd.temperature) == (0.5, 4.0)
    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.arange(4), "index": torch.arange(4)}
    loss, _, terms = module.compute_loss(batch)
    torch.testing.assert_close(loss, 0.5 * terms["ce"] + 0.5 * terms["kd"])


def test_python_construction_refuses_unknown_loss_keys(teacher_ckpt) -> None:
    from distill.losses import LossConfigError
    from distill.models import WideResNet

    with pytest.raises(LossConfigError, match="alpah"):
        StudentModule(WideResNet(10, 1), WideResNet(10, 2), {"alpah": 1.0}, str(teacher_ckpt))
    assert compose_cfg("loss=ce").loss.kd.temperature == 4.0
