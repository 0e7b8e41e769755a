"""Explanation fidelity on the test set (distill.fidelity): prediction fidelity, map cosine and
faithfulness against independent computations, the metrics.json keys of real runs, the switch."""

from __future__ import annotations

import csv as csv_module
import json
import math
from pathlib import Path
from typing import Any

import hydra
import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

import cams
from cams.metrics import ADCC, AverageDrop, Coherency, Complexity, IncreaseInConfidence
from distill.config_checks import ConfigError
from distill.fidelity import FidelityCallback, kl_teacher_student, top1_agreement
from distill.models import WideResNet
from distill.modules.classifier import ClassifierModule
from distill.teacher import TeacherError, load_teacher
from distill.train import build_callbacks, train
from tests.conftest import FIDELITY_ON, TINY, compose_cfg, run_python, student
from tests.conftest import tiny as tiny_quiet


def tiny(tmp_path: Path, ckpt: Path, *extra: str) -> Any:
    """conftest's tiny run with the fidelity pass on, as by default."""
    return tiny_quiet(tmp_path, ckpt, FIDELITY_ON, *extra)


FAITHFULNESS = {
    "average_drop": AverageDrop,
    "increase_in_confidence": IncreaseInConfidence,
    "coherency": Coherency,
    "complexity": Complexity,
    "adcc": ADCC,
}
STUDENT_KEYS = {
    *(f"faithfulness_{k}" for k in FAITHFULNESS),
    "fidelity_images",
    "fidelity_seconds",
    "fidelity_top1_agreement",
    "fidelity_kl_teacher_student",
    "fidelity_map_cosine_gradcam",
    "fidelity_map_cosine_own",
}
SMALL = ["model.depth=10", "model.widen_factor=1"]  # a faster student for the direct comparisons
TEACHER_KEYS = {*(f"faithfulness_{k}" for k in FAITHFULNESS), "fidelity_images", "fidelity_seconds"}


# ----------------------------------------------------------------------------- by hand


def test_agreement_and_kl_by_hand() -> None:
    teacher = [[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.5, 5.0], [0.2, 0.0, -1.0]]
    student = [[1.0, 2.0, 0.0], [0.0, 2.0, 1.5], [0.0, -1.0, 4.0], [3.0, 0.0, 0.0]]

    def softmax(row: list[float]) -> list[float]:
        z = sum(math.exp(v) for v in row)
        return [math.exp(v) / z for v in row]

    kl = [
        sum(p * math.log(p / q) for p, q in zip(softmax(t), softmax(s), strict=True))
        for t, s in zip(teacher, student, strict=True)
    ]
    t, s = torch.tensor(teacher), torch.tensor(student)
    assert top1_agreement(t, s).tolist() == [0.0, 1.0, 1.0, 1.0]
    torch.testing.assert_close(kl_teacher_student(t, s), torch.tensor(kl), rtol=1e-5, atol=1e-6)
    assert float(kl_teacher_student(t, t).abs().max()) < 1e-6
    bf16 = kl_teacher_student(t.bfloat16(), s.bfloat16())  # computed in float32
    assert bf16.dtype == torch.float32


# ----------------------------------------------------------------------------- trainer.test


def _test_run(module: pl.LightningModule, data: Any, **options: Any) -> dict[str, float]:
    """``trainer.test`` with the callback; ``data``: a datamodule or a dataloader."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[FidelityCallback(**options)],
    )
    source = {"dataloaders": data} if isinstance(data, DataLoader) else {"datamodule": data}
    return trainer.test(module, verbose=False, **source)[0]


def _test_set(cfg: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The datamodule of ``cfg`` and its whole test set as the test loop sees it (normalized)."""
    dm = hydra.utils.instantiate(cfg.data)
    arrays = dm.load()
    batch = dm.transform_batch({"image": arrays.test_images.clone(), "aug": None})
    return dm, batch["image"], arrays.test_labels


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean per-image cosine of flattened maps; 0 for a pair with an all-zero map."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    norms = a.norm(dim=1) * b.norm(dim=1)
    cos = torch.where(norms > 0, (a * b).sum(1) / norms.clamp_min(1e-300), torch.zeros_like(norms))
    return cos.mean()


def _faithfulness(net: torch.nn.Module, x: torch.Tensor) -> dict[str, float]:
    """cams.metrics applied directly to the net's Grad-CAM at block3 (predicted class)."""
    out = {}
    for name, metric_cls in FAITHFULNESS.items():
        metric = metric_cls()
        metric.update(net, cams.build("gradcam", net, "block3"), x)
        out[name] = float(metric.compute())
    return out


def _expected(s_net: Any, t_net: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Every number of a run with a teacher, computed directly (own method: see the callers)."""
    with torch.no_grad():
        s_logits, t_logits = s_net(x).double(), t_net(x).double()
    p_t, p_s = t_logits.softmax(1), s_logits.softmax(1)
    maps = [cams.build("gradcam", net, "block3")(x, y) for net in (s_net, t_net)]
    return {
        "fidelity/images": float(len(y)),
        "fidelity/top1_agreement": float(
            (t_logits.argmax(1) == s_logits.argmax(1)).double().mean()
        ),
        "fidelity/kl_teacher_student": float((p_t * (p_t.log() - p_s.log())).sum(1).mean()),
        "fidelity/map_cosine_gradcam": float(_cosine(*maps)),
        **{f"faithfulness/{k}": v for k, v in _faithfulness(s_net, x).items()},
    }


def _check(result: dict[str, float], expected: dict[str, float]) -> None:
    assert set(result) == {"test/err", "test/loss", "fidelity/seconds", *expected}
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
    assert result["fidelity/seconds"] > 0


def test_student_numbers_equal_direct_computations(tmp_path, teacher_ckpt) -> None:
    """Every key against references computed here on the selected images (every 4th of 32,
    batches of 10: the selection follows the test-set index, not the position in a batch)."""
    cfg = tiny(tmp_path, teacher_ckpt, *SMALL, "loss=gradcampp", "data.eval_batch_size=10")
    module = student(cfg).eval()
    dm, x, y = _test_set(cfg)
    result = _test_run(module, dm, max_images=10)
    x, y = x[::4], y[::4]  # stride ceil(32 / 10) = 4
    s_net, t_net = module.net, module.teacher.net
    own = [cams.build("gradcampp", net, "block3")(x, y) for net in (s_net, t_net)]
    expected = {**_expected(s_net, t_net, x, y), "fidelity/map_cosine_own": float(_cosine(*own))}
    assert expected["fidelity/images"] == 8
    _check(result, expected)
    # the own method is not the yardstick
    assert expected["fidelity/map_cosine_own"] != pytest.approx(
        expected["fidelity/map_cosine_gradcam"]
    )


def test_ce_baseline_is_compared_with_the_given_teacher(tmp_path, teacher_ckpt) -> None:
    """A run without a teacher of its own (the CE cell) loads teacher.checkpoint."""
    cfg = compose_cfg(*TINY, *SMALL, f"paths.log_dir={tmp_path}")
    torch.manual_seed(1)
    module = ClassifierModule(hydra.utils.instantiate(cfg.model)).eval()
    dm, x, y = _test_set(cfg)
    result = _test_run(
        module, dm, teacher_net=WideResNet(10, 2), teacher_checkpoint=str(teacher_ckpt)
    )
    teacher = load_teacher(WideResNet(10, 2), teacher_ckpt)
    _check(result, _expected(module.net, teacher, x, y))  # no own method: no own cosine


def test_own_shapcam_maps_use_the_loss_options_with_the_override(tmp_path, teacher_ckpt) -> None:
    cfg = tiny(tmp_path, teacher_ckpt, *SMALL, "loss=shapcam", "data.synthetic_test_size=8")
    module = student(cfg).eval()
    dm, x, y = _test_set(cfg)
    # baseline "zero" (the preset: "mean") makes the override visible in the maps: on these random
    # nets the game is nearly additive, so 6 permutations already give the 10^4-permutation maps
    override = {"n_permutations": 6, "antithetic": True, "baseline": "zero"}
    result = _test_run(module, dm, own_cam={"shapcam": override})
    # configs/loss/shapcam.yaml: cam {utility: prob, baseline: mean, relu: false}; the teacher's
    # seed 0 (10^4 permutations in training), the student's 256 antithetic: both replaced here
    options = {"utility": "prob", "relu": False, "seed": 0, **override}
    maps = [
        cams.build("shapcam", net, "block3", **options)(x, y)
        for net in (module.net, module.teacher.net)
    ]
    assert result["fidelity/map_cosine_own"] == pytest.approx(float(_cosine(*maps)), abs=1e-5)


def test_a_run_without_teacher_gets_only_faithfulness(tmp_path) -> None:
    cfg = compose_cfg(*TINY, *SMALL, f"paths.log_dir={tmp_path}")
    torch.manual_seed(1)
    module = ClassifierModule(hydra.utils.instantiate(cfg.model)).eval()
    dm, x, _ = _test_set(cfg)
    result = _test_run(module, dm, teacher_net=WideResNet(10, 2))  # no checkpoint: no teacher
    assert {k for k in result if k.startswith("fidelity/")} == {
        "fidelity/images",
        "fidelity/seconds",
    }
    for key, value in _faithfulness(module.net, x).items():
        assert result[f"faithfulness/{key}"] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_images_are_measured_in_test_sized_batches_to_the_last_one() -> None:
    """Batches of 10, 4, 10 images: measured as 10, 10 (4 + 6 of the third batch) and the 4
    left at the end; every image counts once."""
    torch.manual_seed(2)
    module = ClassifierModule(WideResNet(10, 1)).eval()
    x, y = torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,))
    bounds = [(0, 10), (10, 14), (14, 24)]
    batches = [{"image": x[a:b], "label": y[a:b], "index": torch.arange(a, b)} for a, b in bounds]
    result = _test_run(module, DataLoader(batches, batch_size=None))
    assert result["fidelity/images"] == 24
    for key, value in _faithfulness(module.net, x).items():
        assert result[f"faithfulness/{key}"] == pytest.approx(value, rel=1e-4, abs=1e-5), key


# ----------------------------------------------------------------------------- real runs


def _keys(metrics: dict[str, Any]) -> set[str]:
    return {k for k in metrics if k.startswith(("fidelity_", "faithfulness_"))}


def _check_ranges(metrics: dict[str, Any]) -> None:
    for key in _keys(metrics) - {
        "fidelity_images",
        "fidelity_seconds",
        "fidelity_kl_teacher_student",
    }:
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics.get("fidelity_kl_teacher_student", 0.0) >= 0.0


def test_student_run_writes_the_keys_and_the_switch_turns_them_off(tmp_path, teacher_ckpt) -> None:
    """A real train() run (bf16 where it is the default) writes every key to metrics.json;
    ``callbacks.fidelity.enabled=false`` writes none and the same test error and loss (4 test
    batches: a side effect of the measurement on the net would change the later batches)."""
    batches = "data.eval_batch_size=8"
    on = train(tiny(tmp_path, teacher_ckpt, "loss=gradcampp_kd", "run_name=on", batches))
    saved = json.loads((tmp_path / "train" / "on" / "metrics.json").read_text())
    assert _keys(saved) == STUDENT_KEYS and saved["fidelity_images"] == 32
    _check_ranges(saved)
    off = train(
        tiny(
            tmp_path,
            teacher_ckpt,
            "loss=gradcampp_kd",
            "run_name=off",
            "callbacks.fidelity.enabled=false",
            batches,
        )
    )
    assert _keys(off) == set() and off["test_error"] == on["test_error"]
    assert json.loads((tmp_path / "train" / "off" / "metrics.json").read_text()) == off
    assert _test_loss(tmp_path / "train" / "off") == _test_loss(tmp_path / "train" / "on")


def _test_loss(run_dir: Path) -> float:
    """``test/loss`` from the run's CSV log."""
    (csv,) = run_dir.glob("csv/version_*/metrics.csv")
    rows = [r for r in csv_module.DictReader(csv.open()) if r.get("test/loss")]
    return float(rows[-1]["test/loss"])


def test_teacher_and_ce_baseline_runs_write_their_keys(tmp_path, teacher_ckpt) -> None:
    """A teacher run (no teacher.checkpoint): its faithfulness; the CE baseline cell (the
    harness gives it teacher.checkpoint): everything but the own-method cosine."""
    metrics = train(compose_cfg(*TINY, f"paths.log_dir={tmp_path}", "run_name=t"))
    saved = json.loads((tmp_path / "train" / "t" / "metrics.json").read_text())
    assert _keys(saved) == TEACHER_KEYS == _keys(metrics)
    _check_ranges(saved)
    ce = train(
        compose_cfg(
            *TINY, f"paths.log_dir={tmp_path}", "run_name=ce", f"teacher.checkpoint={teacher_ckpt}"
        )
    )
    assert _keys(ce) == STUDENT_KEYS - {"fidelity_map_cosine_own"}
    _check_ranges(ce)


def test_ce_run_without_its_teacher_file_warns_and_trains(tmp_path) -> None:
    """No teacher trained yet: the CE baseline still trains, with its faithfulness only."""
    missing = tmp_path / "nope.ckpt"
    cfg = compose_cfg(*TINY, f"paths.log_dir={tmp_path}", f"teacher.checkpoint={missing}")
    with pytest.warns(UserWarning, match=f"teacher checkpoint {missing} does not exist"):
        metrics = train(cfg)
    assert _keys(metrics) == TEACHER_KEYS


def test_damaged_teacher_of_a_ce_run_stops_before_training(tmp_path) -> None:
    damaged = tmp_path / "teacher.ckpt"
    damaged.write_bytes(b"not a checkpoint")
    cfg = compose_cfg(*TINY, f"paths.log_dir={tmp_path}", f"teacher.checkpoint={damaged}")
    with pytest.raises(TeacherError, match=f"teacher checkpoint {damaged} is not a readable"):
        train(cfg)
    assert not list(tmp_path.rglob("last.ckpt"))


def test_removing_the_callback(tmp_path) -> None:
    names = [type(c).__name__ for c in build_callbacks(compose_cfg(*TINY), has_logger=True)]
    assert "FidelityCallback" in names
    cfg = compose_cfg(*TINY, "~callbacks.fidelity")
    assert "FidelityCallback" not in [type(c).__name__ for c in build_callbacks(cfg, True)]


# ----------------------------------------------------------------------------- bad input


def test_bad_max_images_is_refused_before_training(tmp_path, teacher_ckpt) -> None:
    cfg = tiny(tmp_path, teacher_ckpt, "loss=gradcam", "callbacks.fidelity.max_images=0")
    with pytest.raises(ConfigError, match=r"callbacks\.fidelity\.max_images must be .* got 0"):
        train(cfg)
    assert not list(tmp_path.rglob("last.ckpt"))


def test_bad_layer_is_one_line_before_training(tmp_path: Path) -> None:
    res = run_python(
        [
            "train.py",
            *TINY,
            f"paths.log_dir={tmp_path}",
            "run_name=bad",
            "callbacks.fidelity.layer=block9",
        ]
    )
    assert res.returncode == 2, res.stderr[-2000:]
    assert "error: callbacks.fidelity.layer='block9' is not a module" in res.stderr
    assert "Traceback" not in res.stderr and not list(tmp_path.rglob("last.ckpt"))


@pytest.mark.slow
def test_two_ddp_processes_give_the_single_process_numbers(tmp_path, teacher_ckpt) -> None:
    """The same weights tested by one process and by two gloo ranks (each half of the test
    set): the metrics are synced sums, so the numbers agree and every image counts once. (A CE
    run with a teacher: ``train=false`` cannot load a student's teacher-less checkpoint.)"""
    common = [
        *TINY,
        f"teacher.checkpoint={teacher_ckpt}",
        f"paths.log_dir={tmp_path}",
        "trainer.precision=32-true",
    ]
    trained = train(compose_cfg(*common, "run_name=fit"))
    test_only = [*common, "train=false", f"ckpt_path={trained['checkpoint']}"]
    single = train(compose_cfg(*test_only, "run_name=single"))
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "run_name=ddp"]
    res = run_python(["train.py", *test_only, *ddp])
    assert res.returncode == 0, res.stderr[-3000:]
    both = json.loads((tmp_path / "train" / "ddp" / "metrics.json").read_text())
    assert _keys(both) == _keys(single) == STUDENT_KEYS - {"fidelity_map_cosine_own"}
    assert both["fidelity_images"] == single["fidelity_images"] == 32
    for key in _keys(single) - {"fidelity_seconds"}:
        assert both[key] == pytest.approx(single[key], rel=1e-4, abs=1e-5), key
