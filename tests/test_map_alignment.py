"""CAM layers read from the networks, and student/teacher maps of different sizes (issue 22).

References: closed forms on maps written out by hand (the CAM term and AT with one map pooled
2x2 -> 1), explicit block means (reshape, not pooling), and a per-sample Grad-CAM written here
from the train-mode forward's activation with the batch statistics held constant.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.loss_config import LossConfig, resolve_cam_layers
from distill.losses import LossConfigError, aligned_size, explanation_loss, map_agreement
from distill.models import WideResNet
from distill.modules.student import StudentModule
from distill.objectives import StudentOutputs, build_objectives
from distill.objectives.catkd import class_cams

# a 4x4 map whose 2x2 cell means are [[1, 4], [4, 0]]
T4 = torch.tensor([[0.0, 2, 4, 4], [2, 0, 0, 8], [6, 6, 0, 0], [2, 2, 0, 0]], dtype=torch.float64)
S2 = torch.tensor([[3.0, 0], [0, 4]], dtype=torch.float64)


class ToyNet(nn.Module):
    """Two stages whose outputs are ``n1`` x ``n1`` and ``n2`` x ``n2`` at any input size; the
    head after ``stage2`` is BN-ReLU-mean-linear (a WRN-like head)."""

    cam_layer: ClassVar[str] = "stage2"
    feature_layers: ClassVar[tuple[str, ...]] = ("stage1", "stage2")

    def __init__(self, n1: int = 8, n2: int = 4, width: int = 4, classes: int = 10) -> None:
        super().__init__()
        self.stage1 = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(n1)
        )
        self.stage2 = nn.Sequential(
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.AdaptiveAvgPool2d(n2)
        )
        self.bn = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(F.relu(self.bn(self.stage2(self.stage1(x)))).mean((2, 3)))


class Undeclared(nn.Module):
    """A network that declares neither ``cam_layer`` nor ``feature_layers``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.conv(x).mean((2, 3)))


def _loss(**keys: Any) -> LossConfig:
    return LossConfig.from_mapping(keys)


def _cam_term(student: nn.Module, teacher: nn.Module, **keys: Any):
    cfg = _loss(method="gradcam", alpha=1.0, **keys)
    return build_objectives(cfg, student, teacher)[-1]


def _block_mean(x: Tensor, n: int) -> Tensor:
    """Mean of ``x`` (..., H, W) over equal blocks down to (..., n, n), by reshaping."""
    *lead, h, w = x.shape
    return x.reshape(*lead, n, h // n, n, w // n).mean(dim=(-3, -1))


def _student_module(net: nn.Module, ckpt, **keys: Any) -> StudentModule:
    loss = {"method": "gradcam", "alpha": 1.0, **keys}
    return StudentModule(net, WideResNet(10, 2), loss=loss, teacher_checkpoint=str(ckpt))


# ----------------------------------------------------------------------------- the CAM term


def test_pooled_cam_term_matches_the_closed_form():
    """A 2x2 student map against a 4x4 teacher map: the raw teacher map is pooled to its cell
    means P(T) = [[1, 4], [4, 0]] and then normalized (pool, then N)."""
    term = _cam_term(ToyNet(8, 2), ToyNet(8, 4))
    assert term.size == (2, 2)
    s, t = S2[None], T4[None]
    (value,) = term.terms(StudentOutputs(s.sum(), s, {}), {"maps": t}, {}, 0)
    # l2: ||N(S) - N(P(T))||^2 = 2 - 2 cos(S, P(T)), cos = (3*1 + 4*0) / (5 sqrt(33))
    assert float(value.value) == pytest.approx(2 - 2 * 3 / (5 * math.sqrt(33)), rel=1e-12)
    # none: sum (S - P(T))^2 = 2^2 + 4^2 + 4^2 + 4^2
    assert float(explanation_loss(s, t, "none", term.size)) == pytest.approx(52.0)
    # minmax pins the order: minmax(P(T)) = [[1/4, 1], [1, 0]], not P(minmax(T)) = P(T) / 8
    # minmax(S) = [[3/4, 0], [0, 1]]: (1/2)^2 + 1 + 1 + 1
    assert float(explanation_loss(s, t, "minmax", term.size)) == pytest.approx(3.25)
    # the student side is pooled the same way when it is the larger one
    assert float(explanation_loss(t, s, "none", (2, 2))) == pytest.approx(52.0)


def test_map_size_pools_both_maps_8x8_and_4x4_to_2x2(teacher_ckpt):
    """``loss.map_size=2``: a 4x4 student against the 8x8 WRN teacher, both pooled to 2x2,
    through the student module's training step (teacher maps online, aligned after retrieval)."""
    torch.manual_seed(0)
    module = _student_module(ToyNet(8, 4), teacher_ckpt, map_size=2).double().train()
    assert module.objectives[-1].size == module.map_size == (2, 2)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    batch = {"image": x, "label": y, "index": torch.arange(4)}
    _, _, terms = module.compute_loss(batch)
    with torch.no_grad():  # the CAMs take their gradients themselves
        s = module.student_cam.compute(x, y).maps  # same weights, same batch statistics
        t = module.teacher.explain(x, y)
    assert s.shape[-2:] == (4, 4) and t.shape[-2:] == (8, 8)
    ps, pt = (
        F.normalize(_block_mean(s, 2).flatten(1), dim=1),
        F.normalize(_block_mean(t, 2).flatten(1), dim=1),
    )
    expected = (ps - pt).pow(2).sum(1).mean()
    assert terms["cam"].item() == pytest.approx(float(expected), rel=1e-9)
    # the logged agreement compares the same 2x2 maps
    agree = map_agreement(s, t, module.map_size)
    torch.testing.assert_close(agree, F.cosine_similarity(ps, pt, dim=1))


def test_default_size_is_the_smaller_map(teacher_ckpt):
    module = _student_module(ToyNet(8, 4), teacher_ckpt)
    assert module.objectives[-1].size == (4, 4)
    # equal sizes are compared as they are (no pooling: the WRN pairs)
    assert _cam_term(WideResNet(10, 1), WideResNet(16, 1)).size == (8, 8)


@pytest.mark.parametrize(
    ("student", "teacher", "map_size", "match"),
    [
        ((6, 6), (4, 4), None, r"6x6 is not a multiple of 4x4\); set loss\.map_size=2"),
        ((8, 8), (4, 4), 8, r"loss\.map_size=8 is larger than the teacher's 4x4 maps"),
        ((8, 8), (4, 4), 3, r"loss\.map_size=3 does not divide the student's 8x8 maps"),
        ((5, 5), (3, 3), None, r"5x5 is not a multiple of 3x3\); choose layers"),
    ],
)
def test_an_unalignable_pair_is_refused_with_the_reason_and_the_fix(
    student, teacher, map_size, match
):
    with pytest.raises(LossConfigError, match=match):
        _cam_term(ToyNet(8, student[0]), ToyNet(8, teacher[0]), map_size=map_size)


def test_unequal_non_square_maps_are_refused():
    with pytest.raises(LossConfigError, match="8x4 and 4x4 maps are not both square"):
        aligned_size((8, 4), (4, 4))
    assert aligned_size((8, 4), (8, 4)) == (8, 4)  # equal: compared as they are
    assert aligned_size((8, 4), (4, 4), 2) == (2, 2)


def test_an_unalignable_student_stops_before_training(teacher_ckpt):
    """6x6 student maps against the 8x8 teacher: refused when the module is built, before any
    trainer or step, naming the sizes, the reason and the fix."""
    with pytest.raises(LossConfigError) as err:
        _student_module(ToyNet(8, 6), teacher_ckpt)
    assert str(err.value) == (
        "student layer 'stage2' gives 6x6 maps and teacher layer 'block3' gives 8x8: they cannot "
        "be aligned by average pooling (8x8 is not a multiple of 6x6); set loss.map_size=2 or "
        "choose layers whose map sizes divide each other (loss.student_layer=..., "
        "loss.teacher_layer=...)"
    )
    _student_module(ToyNet(8, 6), teacher_ckpt, map_size=2)  # the fix it names works


@pytest.mark.parametrize("value", [0, -2])
def test_map_size_domain(value):
    with pytest.raises(LossConfigError, match="loss.map_size must be null or an integer >= 1, got"):
        _cam_term(ToyNet(), ToyNet(), map_size=value)


# ----------------------------------------------------------------------------- attention transfer


def _at(student: nn.Module, teacher: nn.Module, **keys: Any):
    return build_objectives(_loss(at={"enabled": True, **keys}), student, teacher)[-1]


def test_pooled_at_term_matches_the_closed_form():
    """AT of a 2x2 student feature against a 4x4 teacher feature (every channel the map written
    out): at = normalize(P(A)^2), the feature pooled before the square."""
    at = _at(ToyNet(8, 2), ToyNet(8, 4), student_layers=["stage2"], teacher_layers=["stage2"])
    assert at.sizes == [(2, 2)]
    channels = 8
    fs = S2.expand(1, channels, 2, 2)
    ft = T4.expand(1, channels, 4, 4)
    (output,) = at.teacher_outputs()
    teacher = {"at": output.compute([ft], torch.zeros(1, 10, dtype=torch.float64))}
    (term,) = at.terms(StudentOutputs(fs.sum(), None, {"stage2": fs}), teacher, {}, 0)
    # a_s = [9, 0, 0, 16] / sqrt(337), a_t = P(T)^2 / ||.|| = [1, 16, 16, 0] / sqrt(513):
    # mean over the 4 positions of (a_s - a_t)^2 = (2 - 2 cos) / 4, cos = 9 / sqrt(337 * 513)
    expected = (2 - 2 * 9 / math.sqrt(337 * 513)) / 4
    assert float(term.value) == pytest.approx(expected, rel=1e-12)
    assert term.weight == 500.0


def test_at_refuses_an_unalignable_pair_at_setup():
    with pytest.raises(LossConfigError, match=r"loss\.at pairs stage2 \(6x6\) with stage2 \(4x4\)"):
        _at(ToyNet(8, 6), ToyNet(8, 4))


def test_at_layers_default_to_the_declared_feature_layers():
    at = _at(ToyNet(16, 4), ToyNet(8, 8))
    assert at.student_layers == at.teacher_layers == ("stage1", "stage2")
    assert at.sizes == [(8, 8), (4, 4)]
    wrn = _at(WideResNet(10, 1), WideResNet(16, 1))
    assert wrn.student_layers == wrn.teacher_layers == ("block1", "block2", "block3")
    assert wrn.sizes == [(32, 32), (16, 16), (8, 8)]
    # 2 stages against 3 groups, both declared: the last two groups are paired
    mixed = _at(ToyNet(16, 8), WideResNet(10, 1))
    assert mixed.student_layers == ("stage1", "stage2")
    assert mixed.teacher_layers == ("block2", "block3") and mixed.sizes == [(16, 16), (8, 8)]
    with pytest.raises(LossConfigError, match=r"student_layers \['stage1', 'stage2'\] and .* pair"):
        _at(ToyNet(), WideResNet(10, 1), teacher_layers=["block3"])  # explicit: one to one
    with pytest.raises(LossConfigError, match="loss.at.student_layers is not set and Undeclared"):
        _at(Undeclared(), ToyNet())


# ----------------------------------------------------------------------------- layer defaults


def test_cam_layers_default_to_the_declared_cam_layer(teacher_ckpt):
    module = _student_module(ToyNet(8, 8), teacher_ckpt)
    assert (module.loss_cfg.student_layer, module.loss_cfg.teacher_layer) == ("stage2", "block3")
    assert module.student_cam.target_name == "stage2"
    assert module.teacher.layer == "block3" and module.teacher.map_size == (8, 8)
    # an explicit name still wins
    named = _student_module(ToyNet(8, 8), teacher_ckpt, student_layer="stage1")
    assert named.student_cam.target_name == "stage1"
    # WRN: the layers of before (block3 on both sides)
    wrn = resolve_cam_layers(_loss(method="gradcam"), WideResNet(10, 1), WideResNet(16, 1))
    assert (wrn.student_layer, wrn.teacher_layer) == ("block3", "block3")


def test_a_network_without_a_declared_layer_is_refused_naming_the_fix(teacher_ckpt):
    with pytest.raises(LossConfigError) as err:
        _student_module(Undeclared(), teacher_ckpt)
    assert str(err.value) == (
        "loss.student_layer is not set and Undeclared declares no cam_layer: set "
        "loss.student_layer=<module> (its top-level modules: conv, fc) or give the class a "
        "cam_layer attribute"
    )
    assert _student_module(Undeclared(), teacher_ckpt, student_layer="conv", map_size=8)


def _per_sample_gradcam(net: ToyNet, x: Tensor, y: Tensor) -> Tensor:
    """Grad-CAM of sample i from ``d logit_i / d A_i`` with the head's BN statistics of the
    train-mode batch held constant (the definition of per-sample maps in train mode)."""
    found = {}
    handle = net.stage2.register_forward_hook(lambda m, i, o: found.setdefault("a", o))
    try:
        net(x)
    finally:
        handle.remove()
    a = found["a"].detach()
    mean, var = a.mean((0, 2, 3)), a.var((0, 2, 3), unbiased=False)
    bn, shape = net.bn, (1, -1, 1, 1)
    maps = []
    for i, c in enumerate(y.tolist()):
        ai = a[i : i + 1].clone().requires_grad_()
        z = (ai - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps)
        z = z * bn.weight.view(shape) + bn.bias.view(shape)
        logit = net.fc(F.relu(z).mean((2, 3)))[0, c]
        (g,) = torch.autograd.grad(logit, ai)
        maps.append(torch.relu((g.mean((2, 3), keepdim=True) * ai).sum(1)).detach())
    return torch.cat(maps)


@pytest.mark.parametrize("fast_path", [True, False])
def test_the_default_layer_gives_the_per_sample_map_in_train_mode(teacher_ckpt, fast_path):
    """The student's maps at its declared layer, in train mode (BatchNorm after the target),
    equal the per-sample reference on either path (the fast path detected on the toy head, or
    the generic path)."""
    torch.manual_seed(1)
    net = ToyNet(8, 4).double()
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 2.0)
        net.bn.bias.uniform_(-0.5, 0.5)
    module = _student_module(net, teacher_ckpt, cam={"fast_path": fast_path}).double().train()
    x = torch.randn(6, 3, 32, 32, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    maps = module.student_outputs(x, y).maps
    assert module.student_cam.last_path == ("fast" if fast_path else "generic")
    torch.testing.assert_close(maps.detach(), _per_sample_gradcam(net, x, y), rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- CAT-KD


def test_catkd_pools_maps_of_any_size_to_its_resolution():
    """CAT-KD keeps its own pooling: 4x4 and 8x8 class CAMs both become 2x2 block means."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(3, 5, generator=gen, dtype=torch.float64)
    for side in (4, 8):
        feature = torch.randn(2, 5, side, side, generator=gen, dtype=torch.float64)
        hand = _block_mean(torch.einsum("bchw,kc->bkhw", feature, weight), 2)
        torch.testing.assert_close(class_cams(feature, weight, 2), hand)


# ----------------------------------------------------------------------------- reruns


def _saved_before_null_layers(cfg: Any, directory, student_layer: str = "block3") -> None:
    """Save ``cfg`` as a run saved before the layer keys defaulted to null would have it."""
    from omegaconf import OmegaConf

    old = OmegaConf.to_container(cfg, resolve=True)
    old["loss"]["student_layer"], old["loss"]["teacher_layer"] = student_layer, "block3"
    old["loss"]["at"]["student_layers"] = ["block1", "block2", "block3"]
    old["loss"]["at"]["teacher_layers"] = ["block1", "block2", "block3"]
    del old["loss"]["map_size"]
    OmegaConf.save(OmegaConf.create(old), directory / "config_resolved.yaml")


@pytest.mark.parametrize("preset", ["loss=gradcam", "loss=at", "experiment=teacher"])
def test_a_run_saved_with_the_old_layer_defaults_is_the_same_run(tmp_path, preset):
    """A rerun (resume) of a WRN run saved with ``block3`` / ``[block1, block2, block3]`` and no
    ``loss.map_size`` is not refused: the null keys resolve to the same layers."""
    from omegaconf import OmegaConf

    from distill.config_checks import ConfigError, check_saved_config
    from tests.conftest import compose_cfg

    cfg = compose_cfg("data=synthetic", preset)
    resolved = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    OmegaConf.save(resolved, tmp_path / "config_resolved.yaml")  # saved by this code: null layers
    assert check_saved_config(cfg, tmp_path) == []
    _saved_before_null_layers(cfg, tmp_path)
    assert check_saved_config(cfg, tmp_path) == []
    _saved_before_null_layers(cfg, tmp_path, student_layer="block2")  # a real change still counts
    with pytest.raises(ConfigError, match=r"differs in: loss\.student_layer\)"):
        check_saved_config(cfg, tmp_path)
