"""Student extras: fresh Shap-CAM orderings every step, the printed precompute command."""

from __future__ import annotations

import pytest
import torch

from distill.modules.student import StudentModule
from tests.conftest import student


@pytest.fixture
def steppable(monkeypatch):
    """``module.step = n`` stands in for the trainer's global step."""
    monkeypatch.setattr(StudentModule, "global_step", property(lambda self: self.step))


def _seeds(module: StudentModule, steps: list[int], training: bool = True) -> list[int]:
    module.train(training)
    seen = []
    for step in steps:
        module.step = step
        module._seed_student_cam()
        seen.append(module.student_cam.seed)
    return seen


def _module(tiny_cfg, *extra: str) -> StudentModule:
    return student(tiny_cfg("loss=shapcam", "loss.teacher_maps=online", *extra))


def test_shapcam_student_orderings_change_every_step_and_repeat_on_rerun(tiny_cfg, steppable):
    torch.manual_seed(7)
    module = _module(tiny_cfg)
    first = _seeds(module, [0, 1, 2, 1])
    assert len(set(first[:3])) == 3 and first[1] == first[3]
    torch.manual_seed(7)
    assert _seeds(_module(tiny_cfg), [0, 1, 2, 1]) == first  # same run: same draws
    torch.manual_seed(8)
    assert not set(_seeds(_module(tiny_cfg), [0, 1, 2])) & set(first)  # other run
    assert _seeds(module, [0, 5], training=False) == [0, 0]  # validation: the configured seed
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    maps = []
    for step in (3, 4):
        _seeds(module, [step])
        maps.append(module.student_cam(x, y))
    assert not torch.allclose(maps[0], maps[1])  # other orderings, other estimates


def test_fixed_orderings_stay_available(tiny_cfg, steppable):
    module = _module(tiny_cfg, "loss.fresh_orderings=false")
    assert _seeds(module, [0, 1, 2]) == [0, 0, 0]


def test_precompute_command_drops_a_foreign_cache_dir(monkeypatch):
    """The fix printed for a cache directory holding another configuration's maps must not repeat
    that directory (running it would fail the same way)."""
    from types import SimpleNamespace

    from hydra.core.hydra_config import HydraConfig

    from distill.teacher import precompute_command

    task = ["loss=shapcam_kd", "loss.cache_dir=/data/other", "seed=1"]
    fake = SimpleNamespace(overrides=SimpleNamespace(task=task))
    monkeypatch.setattr(HydraConfig, "get", staticmethod(lambda: fake))
    assert precompute_command() == f"python -m distill.precompute {' '.join(task)}"
    assert precompute_command(drop_cache_dir=True) == (
        "python -m distill.precompute loss=shapcam_kd seed=1"
    )
