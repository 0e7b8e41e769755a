"""Every registered objective (distill.objectives.OBJECTIVES), run the same way: a finite loss whose
gradients reach only the student, a teacher left untouched, memo hits equal to the online teacher,
bf16 autocast, and (all objectives composed in one run) a resumed run equal to a straight one.
A new objective file is picked up by these tests without an edit."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from distill.config_checks import ConfigError
from distill.data.augment import AugParams
from distill.losses import LossConfigError
from distill.objectives import OBJECTIVES, active_objectives, teacher_needs
from distill.train import USER_ERRORS, train
from tests.conftest import student

NAMES = list(OBJECTIVES)
BASE = ("loss=ce_kd", "loss.kd.enabled=false")  # the student module with CE alone


class Data:
    """The datamodule facts the teacher memo reads."""

    dataset_id, num_train_total, view_pad = "objectives-test", 8, 4


def _overrides(name: str, *extra: str) -> list[str]:
    return [*BASE, *OBJECTIVES[name].quick_overrides, *extra]


IMAGES = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _batch(index: list[int], aug: AugParams | None = None) -> dict:
    idx = torch.tensor(index)
    aug = aug or AugParams.sample(len(idx), generator=torch.Generator().manual_seed(0))
    return {"image": aug.apply(IMAGES[idx]), "label": idx % 10, "index": idx, "aug": aug}


def _aug(dy: list[int], dx: list[int], flip: list[int]) -> AugParams:
    return AugParams(torch.tensor(dy), torch.tensor(dx), torch.tensor(flip).bool())


def _module(tiny_cfg, name: str, *extra: str):
    torch.manual_seed(0)
    return student(tiny_cfg(*_overrides(name, *extra))).train()


@pytest.mark.parametrize("name", NAMES)
def test_objective_is_switched_on_by_its_overrides(tiny_cfg, name):
    cfg = tiny_cfg(*_overrides(name))
    assert [o.name for o in active_objectives(cfg.loss)][-1] == name


@pytest.mark.parametrize("name", NAMES)
def test_objective_loss_is_finite_and_trains_only_the_student(tiny_cfg, name):
    module = _module(tiny_cfg, name)
    teacher_before = copy.deepcopy(module.teacher.state_dict())
    loss, logits, terms = module.compute_loss(_batch([0, 1, 2, 3, 4, 5]))
    assert torch.isfinite(loss) and all(torch.isfinite(v) for v in terms.values())
    own = [k for k in terms if k != "ce"] if name != "ce" else ["ce"]
    assert own, terms
    sum(terms[k] for k in own).backward(retain_graph=True)  # the objective's own terms
    grads = [p.grad for p in module.net.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in module.teacher.parameters())
    loss.backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert not module.teacher.training and not module.teacher.net.training
    after = module.teacher.state_dict()
    assert all(torch.equal(teacher_before[k], after[k]) for k in teacher_before)


@pytest.mark.parametrize("name", [n for n in NAMES if OBJECTIVES[n].teacher])
def test_objective_memo_hit_equals_the_online_teacher(tiny_cfg, name):
    first = _batch([0, 1, 2, 3], _aug([0, 4, 8, 2], [1, 4, 0, 7], [1, 0, 0, 1]))
    # the same (index, view) pairs in another order and batch, plus two new views
    second = _batch(
        [3, 5, 0, 1, 2, 6], _aug([2, 3, 0, 4, 8, 5], [7, 3, 1, 4, 0, 5], [1, 0, 1, 0, 0, 1])
    )
    filler = _module(tiny_cfg, name)
    filler.teacher.enable_memo(Data(), "32-true")
    filler.compute_loss(first)
    reader = _module(tiny_cfg, name)  # another run with the same teacher
    reader.teacher.enable_memo(Data(), "32-true")
    online = _module(tiny_cfg, name, "loss.teacher_memo=false")
    got = reader.teacher.collect(second, reader.teacher.needs)
    assert reader.teacher.memo_hit_rate() == pytest.approx(4 / 6)
    want = online.teacher.collect(second, online.teacher.needs)
    assert set(got) == set(want) >= set(teacher_needs(reader.loss_cfg))
    for key in want:
        torch.testing.assert_close(got[key], want[key].float(), rtol=1e-5, atol=1e-6)
    _, _, terms = reader.compute_loss(second)  # every view is in the memo now
    assert reader.teacher.memo_hit_rate() == 1.0
    _, _, want_terms = online.compute_loss(second)
    for key, value in want_terms.items():
        torch.testing.assert_close(terms[key], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_objective_runs_under_bf16_autocast(tiny_cfg, name):
    """Finite float32 terms and gradients with the networks in bf16 (the loss arithmetic is
    float32)."""
    module = _module(tiny_cfg, name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _, terms = module.compute_loss(_batch([0, 1, 2, 3, 4, 5]))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in terms.values())
    loss.backward()
    grads = [p.grad for p in module.net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_every_objective_composed_resumes_to_the_same_run(tiny_cfg, tmp_path):
    """All registered objectives in one run (DKD's warm-up spanning the two epochs): 2 epochs
    straight == 1 epoch, stop, rerun to 2 epochs."""
    every = [o for name in NAMES for o in OBJECTIVES[name].quick_overrides]
    common = [*BASE, *every, "loss.dkd.warmup=4", "trainer.deterministic=true"]

    def run(name: str, epochs: int) -> dict:
        cfg = tiny_cfg(*common, f"run_name={name}", f"trainer.max_epochs={epochs}")
        assert [o.name for o in active_objectives(cfg.loss)] == NAMES
        OmegaConf.set_struct(cfg, False)
        return train(cfg)

    straight = run("straight", 2)
    run("resumed", 1)
    resumed = run("resumed", 2)
    assert resumed["test_error"] == straight["test_error"]
    states = [
        torch.load(tmp_path / "train" / n / "checkpoints" / "last.ckpt", weights_only=False)
        for n in ("straight", "resumed")
    ]
    assert states[0]["epoch"] == states[1]["epoch"] == 1
    for key, value in states[0]["state_dict"].items():
        torch.testing.assert_close(states[1]["state_dict"][key], value, rtol=1e-5, atol=1e-6)
    header = next((tmp_path / "train" / "resumed").rglob("metrics.csv")).read_text()
    assert {"train/tckd", "train/nckd", "train/at", "train/catkd"} <= set(
        header.splitlines()[0].split(",")
    )
    assert json.loads((tmp_path / "train" / "resumed" / "metrics.json").read_text())


# ----------------------------------------------------------------------------- composition


def test_a_command_line_composition_adds_dkd_to_a_cam_preset(tiny_cfg):
    """``loss=shapleycam loss.dkd.enabled=true``: CE + alpha ShapleyCAM + w (TCKD + beta NCKD)."""
    cfg = tiny_cfg("loss=shapleycam", "loss.dkd.enabled=true", "loss.dkd.beta=8")
    assert [o.name for o in active_objectives(cfg.loss)] == ["ce", "cam", "dkd"]
    torch.manual_seed(0)
    module = student(cfg).train()
    loss, _, terms = module.compute_loss(_batch([0, 1, 2, 3]))
    assert set(terms) == {"ce", "cam", "tckd", "nckd"}
    w = 1 / 20  # first epoch of the 20-epoch warm-up
    want = terms["ce"] + cfg.loss.alpha * terms["cam"] + w * (terms["tckd"] + 8 * terms["nckd"])
    torch.testing.assert_close(loss, want)


def test_an_objective_reading_the_teacher_needs_the_student_module(tmp_path, teacher_ckpt):
    from tests.conftest import TINY, compose_cfg

    cfg = compose_cfg(*TINY, f"paths.log_dir={tmp_path}", "loss=ce", "loss.dkd.enabled=true")
    with pytest.raises(ConfigError, match=r"dkd read a frozen teacher.*module=student"):
        train(cfg)
    assert not any(tmp_path.iterdir())  # refused before anything is written


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["loss=dkd", "loss.dkd.warmup=-1"], r"loss\.dkd\.warmup must be an integer >= 0"),
        (["loss=dkd", "loss.dkd.temperature=0"], r"loss\.dkd\.temperature must be > 0"),
        (["loss=at", "loss.at.weight=-1"], r"loss\.at\.weight must be a number >= 0"),
        (["loss=at", "loss.at.student_layers=[block1]"], r"loss\.at\.student_layers .* pair"),
        (["loss=at", "loss.at.teacher_layers=[block1,block2,nope]"], r"no module nope"),
        (["loss=catkd", "loss.catkd.resolution=0"], r"loss\.catkd\.resolution must be"),
        (["loss=catkd", "loss.catkd.layer=fc"], r"loss\.catkd\.layer=fc .*feature maps"),
        (["loss=catkd", "module.compile=true"], r"module\.compile=true .*catkd"),
    ],
)
def test_bad_objective_options_stop_the_run_naming_the_key(tiny_cfg, overrides, match):
    with pytest.raises(USER_ERRORS, match=match) as info:
        train(tiny_cfg(*overrides))
    assert "\n" not in str(info.value)
    assert isinstance(info.value, (ConfigError, LossConfigError))


@pytest.mark.parametrize(
    ("preset", "needs", "forwards"),
    [("shapcam", ["maps"], 0), ("shapcam_kd", ["logits", "maps"], 1), ("at", ["at"], 1)],
)
def test_a_step_asks_the_teacher_only_for_what_its_objectives_read(
    tiny_cfg, preset, needs, forwards
):
    """Cached Shap-CAM maps without KD need no teacher pass at all; AT's maps and the logits
    come from one pass."""
    module = student(tiny_cfg(f"loss={preset}")).train()
    assert module.teacher.needs == needs
    module.teacher.cached_maps = torch.rand(8, 8, 8)
    module.teacher.cache_position = torch.arange(8)
    calls = []
    module.teacher.net.register_forward_hook(lambda m, i, o: calls.append(1))
    module.compute_loss(_batch([0, 1, 2, 3]))
    assert len(calls) == forwards
