"""Every registered architecture family through the real config path (issue 22, item 5).

For one small model per family (the smallest named one: resnet8, wrn16_1, vgg8, mobilenetv2,
shufflenetv2) a student is composed from ``train.yaml`` with a teacher of *another* family
(each family is once a student and once a teacher), and one training step of every loss preset
(each CAM method, with or without KD, and every baseline) must give a finite loss whose
gradient reaches the student's parameters. Then the per-sample train-mode CAM maps of each
family are checked against the hand-written per-sample head of tests/cams (the fast path is
taken exactly when ``cams._head.detect_head`` finds the head; both paths give the reference).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

from cams._head import detect_head
from distill.data.augment import AugParams
from distill.models import build_model
from distill.presets import baseline_presets, table_methods
from tests.cams._models import randomize_bn
from tests.cams.test_per_sample_train_mode import (
    GRADIENT_METHODS,
    IDS,
    _bn,
    _capture,
    _reference,
    _rel,
    _stats,
)
from tests.conftest import QUIET, TINY, compose_cfg, student

FAMILIES = ("resnet8", "wrn16_1", "vgg8", "mobilenetv2", "shufflenetv2")
# student -> teacher: every family is once a student and once a teacher, never of its own family
PAIRS = [(s, FAMILIES[(i + 1) % len(FAMILIES)]) for i, s in enumerate(FAMILIES)]
METHODS = table_methods()[1:]  # every CAM method (without "ce")
BASELINES = baseline_presets()
CHEAP = {  # keep Score-CAM and SHAP-CAM to a few forwards per image
    "scorecam": ["++loss.student_cam.max_channels=4", "++loss.teacher_cam.max_channels=4"],
    "shapcam": [
        "loss.teacher_maps=online",
        "loss.teacher_cam.n_permutations=4",
        "loss.student_cam.n_permutations=4",
    ],
}
BATCH = 8


def _model_overrides(name: str, key: str) -> list[str]:
    """Select ``name`` as the config node ``key`` (``model`` or ``teacher.model``)."""
    return [f"model={name}"] if key == "model" else [f"model@{key}={name}"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One random checkpoint per family (``net.*`` keys, like Lightning), BN statistics set."""
    root = tmp_path_factory.mktemp("teachers")
    paths = {}
    for i, name in enumerate(FAMILIES):
        torch.manual_seed(i)
        net = randomize_bn(build_model(name, num_classes=10), seed=i)
        paths[name] = root / f"{name}.ckpt"
        state = {f"net.{k}": v for k, v in net.state_dict().items()}
        torch.save({"state_dict": state, "hyper_parameters": {"arch": net.arch}}, paths[name])
    return paths


def _cfg(tmp_path: Path, pair: tuple[str, str], ckpt: Path, *extra: str):
    tiny = [o for o in TINY if not o.startswith("teacher.model.")]  # TINY's teacher is a WRN
    return compose_cfg(
        *tiny,
        *QUIET,
        *_model_overrides(pair[0], "model"),
        *_model_overrides(pair[1], "teacher.model"),
        f"paths.log_dir={tmp_path}",
        f"teacher.checkpoint={ckpt}",
        f"module.cache_root={tmp_path}/cache",
        f"module.memo_root={tmp_path}/memo",
        *extra,
    )


def _stages(name: str) -> tuple[str, ...]:
    return tuple(build_model(name).feature_layers)


def _batch() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(BATCH, 3, 32, 32, generator=gen),
        "label": torch.arange(BATCH) % 10,
        "index": torch.arange(BATCH),
        "aug": AugParams.sample(BATCH, generator=gen),
    }


def _presets() -> list[tuple[str, str, str]]:
    """(student, teacher, preset): every CAM method on every pair, KD on for every other pair
    (so each method runs with and without KD), and every baseline on every pair."""
    cases = []
    for i, pair in enumerate(PAIRS):
        for j, method in enumerate(METHODS):
            cases.append((*pair, f"{method}_kd" if (i + j) % 2 else method))
        cases += [(*pair, b) for b in BASELINES]
    return cases


EXPECTED_TERMS = {"at": {"at"}, "catkd": {"catkd"}, "dkd": {"tckd", "nckd"}, "ce_kd": {"kd"}}


@pytest.mark.parametrize("student_name,teacher_name,preset", _presets())
def test_one_training_step_on_every_family(
    student_name: str, teacher_name: str, preset: str, tmp_path: Path, teachers: dict[str, Path]
) -> None:
    method = preset.removesuffix("_kd")
    cfg = _cfg(
        tmp_path, (student_name, teacher_name), teachers[teacher_name], f"loss={preset}",
        *CHEAP.get(method, []),
    )  # fmt: skip
    module = student(cfg).train()
    if method == "at":  # null layer keys: each network's last n declared stages, paired
        n = min(len(_stages(student_name)), len(_stages(teacher_name)))
        (at,) = [o for o in module.objectives if o.name == "at"]
        assert at.student_layers == tuple(_stages(student_name)[-n:])
        assert at.teacher_layers == tuple(_stages(teacher_name)[-n:])
    assert module.net.arch.replace("-", "").startswith(student_name.split("_")[0])
    assert not module.teacher.training
    loss, logits, terms = module.compute_loss(_batch())
    expected = {"ce"} | EXPECTED_TERMS.get(method, {"cam"})
    expected |= {"kd"} if preset.endswith("_kd") else set()
    assert set(terms) == expected
    assert logits.shape == (BATCH, 10) and torch.isfinite(loss)
    assert all(torch.isfinite(v) for v in terms.values()), terms
    loss.backward()
    grads = [p.grad for p in module.net.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in module.teacher.parameters())
    if method in METHODS or method in ("at", "catkd"):
        # the distillation term alone reaches the student
        module.net.zero_grad()
        _, _, terms = module.compute_loss(_batch())
        terms["cam" if method in METHODS else method].backward()
        total = sum(
            float(p.grad.abs().sum()) for p in module.net.parameters() if p.grad is not None
        )
        assert total > 0


def _head(net: nn.Module, a: Tensor):
    """The head after ``cam_layer`` of sample i (its activation ``a_i`` alone, the batch's BN
    statistics held): WRN ``fc(GAP(relu(BN(a_i))))``, the other families ``fc(GAP(a_i))``
    (tests/test_model_registry.py checks these heads against the networks' forward)."""
    if net.arch.startswith("wrn"):
        mean, var = _stats(a)
        return lambda ai, i: net.fc(torch.relu(_bn(ai, net.bn, mean, var)).mean((2, 3)))
    return lambda ai, i: net.fc(ai.mean((2, 3)))


@pytest.mark.filterwarnings("ignore:.*create_graph=False are detached")
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "generic"])
@pytest.mark.parametrize("name,cls,opts", GRADIENT_METHODS, ids=IDS)
@pytest.mark.parametrize("family", FAMILIES)
def test_train_mode_maps_are_per_sample_on_every_family(
    family: str, name: str, cls: type, opts: dict, fast_path: bool
) -> None:
    torch.manual_seed(0)
    net = randomize_bn(build_model(family, num_classes=10)).train()
    reference = copy.deepcopy(net)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 3, 7, 3])
    cam = cls(net, net.cam_layer, fast_path=fast_path, **opts)
    maps = cam(x, y)
    detected = detect_head(net, net.cam_layer) is not None
    assert detected, f"{family}: the fast path should find the head after {net.cam_layer}"
    assert cam.last_path == ("fast" if fast_path else "generic")
    layer = dict(reference.named_modules())[reference.cam_layer]
    a, _ = _capture(reference, layer, x)
    ref = _reference(name, opts.get("variant", "mean"), _head(reference, a), a, y, False)
    assert maps.shape == ref.shape and _rel(maps, ref) <= 1e-5


def test_every_family_is_covered() -> None:
    from distill.models.registry import model_names

    prefixes = {n.rstrip("0123456789x_") for n in model_names()}
    assert prefixes == {f.rstrip("0123456789x_") for f in FAMILIES}, prefixes


def test_train_runs_one_step_across_families(tmp_path: Path, teachers: dict[str, Path]) -> None:
    """``train()`` end to end (one batch of fit, validation and test) for a MobileNetV2 student
    (2x2 CAM) of a ShuffleNetV2 teacher (4x4 CAM, pooled to 2x2) with the Grad-CAM + KD loss."""
    from distill.train import train

    cfg = _cfg(
        tmp_path, ("mobilenetv2", "shufflenetv2"), teachers["shufflenetv2"], "loss=gradcam_kd",
        "data.synthetic_size=16", "data.synthetic_test_size=8", f"data.batch_size={BATCH}",
        "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    )  # fmt: skip
    metrics = train(cfg)
    finite = [k for k, v in metrics.items() if isinstance(v, float) and not math.isfinite(v)]
    assert metrics.get("epochs") == 1 and not finite, metrics
