"""AT, CAT-KD and DKD against hand computations of the published formulas (float64), on fixed
tensors and through the student module (hooked layers, teacher outputs, memo, warm-up)."""

from __future__ import annotations

import math

import pytest
import torch

from distill.data.augment import AugParams
from distill.modules.student import StudentModule
from distill.objectives.at import at_loss, attention
from distill.objectives.catkd import class_cams
from distill.objectives.dkd import dkd_terms
from tests.conftest import student

GEN = torch.Generator().manual_seed(0)


def _block_mean(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Average ``x`` (..., H, W) over equal blocks down to (..., h, w), by explicit reshaping."""
    *lead, big_h, big_w = x.shape
    blocks = x.reshape(*lead, h, big_h // h, w, big_w // w)
    return blocks.mean(dim=(-3, -1))


def _hand_attention(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """at(A) for one sample's (C, h, w) feature map: mean over channels of |A|^p, flattened, L2
    normalized, written out element by element."""
    c, h, w = f.shape
    vec = [
        sum(abs(float(f[k, i, j])) ** p for k in range(c)) / c for i in range(h) for j in range(w)
    ]
    norm = math.sqrt(sum(v * v for v in vec))
    return torch.tensor([v / norm for v in vec], dtype=torch.float64)


def _hand_at_loss(students: list[torch.Tensor], teachers: list[torch.Tensor]) -> float:
    total = 0.0
    for fs, ft in zip(students, teachers, strict=True):
        h, w = min(fs.shape[-2], ft.shape[-2]), min(fs.shape[-1], ft.shape[-1])
        fs, ft = _block_mean(fs, h, w), _block_mean(ft, h, w)  # the larger one pooled
        diffs = [(_hand_attention(fs[b]) - _hand_attention(ft[b])).pow(2) for b in range(len(fs))]
        total += float(torch.cat(diffs).mean())
    return total


def test_at_loss_matches_the_published_formula_with_unequal_sizes():
    students = [
        torch.randn(3, 4, 8, 8, generator=GEN, dtype=torch.float64),  # larger than the teacher
        torch.randn(3, 5, 4, 4, generator=GEN, dtype=torch.float64),  # smaller than the teacher
        torch.randn(3, 2, 2, 2, generator=GEN, dtype=torch.float64),  # equal
    ]
    teachers = [
        torch.randn(3, 6, 4, 4, generator=GEN, dtype=torch.float64),
        torch.randn(3, 3, 8, 8, generator=GEN, dtype=torch.float64),
        torch.randn(3, 7, 2, 2, generator=GEN, dtype=torch.float64),
    ]
    sizes = [(4, 4), (4, 4), (2, 2)]
    s_maps = [attention(f, 2.0, size) for f, size in zip(students, sizes, strict=True)]
    t_maps = [attention(f, 2.0, size) for f, size in zip(teachers, sizes, strict=True)]
    got = at_loss(s_maps, t_maps)
    assert got.dtype == torch.float64
    assert float(got) == pytest.approx(_hand_at_loss(students, teachers), rel=1e-12)


def _hand_class_cams(feature: torch.Tensor, weight: torch.Tensor, r: int) -> torch.Tensor:
    b, c, h, w = feature.shape
    k = weight.shape[0]
    cams = torch.zeros(b, k, h, w, dtype=torch.float64)
    for cls in range(k):
        for ch in range(c):
            cams[:, cls] += weight[cls, ch] * feature[:, ch]
    return _block_mean(cams, r, r)


def test_catkd_loss_matches_the_published_formula():
    fs = torch.randn(4, 6, 8, 8, generator=GEN, dtype=torch.float64)
    ft = torch.randn(4, 9, 8, 8, generator=GEN, dtype=torch.float64)
    ws = torch.randn(10, 6, generator=GEN, dtype=torch.float64)
    wt = torch.randn(10, 9, generator=GEN, dtype=torch.float64)
    cs, ct = class_cams(fs, ws, 2), class_cams(ft, wt, 2)
    hand_s, hand_t = _hand_class_cams(fs, ws, 2), _hand_class_cams(ft, wt, 2)
    torch.testing.assert_close(cs, hand_s, rtol=1e-12, atol=1e-12)
    mse = sum(float((hand_s - hand_t).flatten()[i] ** 2) for i in range(hand_s.numel()))
    assert float(torch.nn.functional.mse_loss(cs, ct)) == pytest.approx(
        mse / hand_s.numel(), rel=1e-12
    )


def _hand_dkd(zs: torch.Tensor, zt: torch.Tensor, y: torch.Tensor, temp: float):
    """TCKD and NCKD per the DKD paper: binary target/rest KL and the KL of the distributions
    over the non-target classes (the target removed, not masked), times T^2, batch mean."""
    tckd = nckd = 0.0
    for b in range(len(y)):
        ps, pt = torch.softmax(zs[b] / temp, 0), torch.softmax(zt[b] / temp, 0)
        c = int(y[b])
        bs, bt = [float(ps[c]), 1 - float(ps[c])], [float(pt[c]), 1 - float(pt[c])]
        tckd += sum(bt[i] * math.log(bt[i] / bs[i]) for i in range(2))
        rest = [k for k in range(len(ps)) if k != c]
        qs, qt = torch.softmax(zs[b, rest] / temp, 0), torch.softmax(zt[b, rest] / temp, 0)
        nckd += sum(float(qt[i]) * math.log(float(qt[i]) / float(qs[i])) for i in range(len(rest)))
    n = len(y)
    return temp**2 * tckd / n, temp**2 * nckd / n


def test_dkd_terms_match_the_published_formula():
    zs = 3 * torch.randn(5, 10, generator=GEN, dtype=torch.float64)
    zt = 3 * torch.randn(5, 10, generator=GEN, dtype=torch.float64)
    y = torch.tensor([0, 9, 4, 4, 7])
    tckd, nckd = dkd_terms(zs, zt, y, 4.0)
    want_t, want_n = _hand_dkd(zs, zt, y, 4.0)
    assert float(tckd) == pytest.approx(want_t, rel=1e-9)
    assert float(nckd) == pytest.approx(want_n, rel=1e-9)
    zero_t, zero_n = dkd_terms(zt, zt, y, 4.0)
    assert abs(float(zero_t)) < 1e-12 and abs(float(zero_n)) < 1e-12


# ----------------------------------------------------------------------------- through the module


def _batch(n: int = 4) -> dict:
    gen = torch.Generator().manual_seed(3)
    return {
        "image": torch.randn(n, 3, 32, 32, generator=gen, dtype=torch.float64),
        "label": torch.arange(n) % 10,
        "index": torch.arange(n),
        "aug": AugParams.sample(n, generator=gen),
    }


def _features(net: torch.nn.Module, layers: list[str], x: torch.Tensor) -> list[torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    modules = dict(net.named_modules())
    handles = [
        modules[name].register_forward_hook(lambda m, i, o, name=name: found.setdefault(name, o))
        for name in layers
    ]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    return [found[name] for name in layers]


@pytest.fixture
def steppable(monkeypatch):
    """``module.epoch = e`` stands in for the trainer's current epoch."""
    monkeypatch.setattr(StudentModule, "current_epoch", property(lambda self: self.epoch))


def test_at_through_the_student_pools_the_larger_map(tiny_cfg):
    """Student groups (32, 16, 8) against teacher groups (16, 8, 8): the first two pairs are
    compared at the teacher's size, with the student's feature maps average-pooled."""
    layers_t = ["block2", "block3", "block3"]
    cfg = tiny_cfg("loss=at", f"loss.at.teacher_layers=[{','.join(layers_t)}]")
    module = student(cfg).double().train()
    assert module.objectives[-1].sizes == [(16, 16), (8, 8), (8, 8)]
    batch = _batch()
    loss, _, terms = module.compute_loss(batch)
    fs = _features(module.net.train(), ["block1", "block2", "block3"], batch["image"])
    ft = _features(module.teacher.net, layers_t, batch["image"])
    assert terms["at"].item() == pytest.approx(_hand_at_loss(fs, ft), rel=1e-9)
    torch.testing.assert_close(loss, terms["ce"] + 500.0 * terms["at"])


def test_catkd_through_the_student_uses_both_classifiers(tiny_cfg):
    module = student(tiny_cfg("loss=catkd")).double().train()
    batch = _batch()
    loss, _, terms = module.compute_loss(batch)
    (fs,) = _features(module.net.train(), ["relu"], batch["image"])
    (ft,) = _features(module.teacher.net, ["relu"], batch["image"])
    hand_s = _hand_class_cams(fs, module.net.fc.weight.detach(), 2)
    hand_t = _hand_class_cams(ft, module.teacher.net.fc.weight, 2)
    assert terms["catkd"].item() == pytest.approx(float((hand_s - hand_t).pow(2).mean()), rel=1e-9)
    torch.testing.assert_close(loss, terms["ce"] + 12.0 * terms["catkd"])
    terms["catkd"].backward()
    assert float(module.net.fc.weight.grad.abs().sum()) > 0  # the student's CAMs use its fc


@pytest.mark.parametrize(
    ("epoch", "w"), [(0, 1 / 20), (9, 10 / 20), (18, 19 / 20), (19, 1.0), (40, 1.0)]
)
def test_dkd_warm_up_follows_the_epoch(tiny_cfg, steppable, epoch, w):
    module = student(tiny_cfg("loss=dkd")).double().train()
    module.epoch = epoch
    batch = _batch()
    loss, logits, terms = module.compute_loss(batch)
    with torch.no_grad():
        t_logits = module.teacher.net(batch["image"])
    want_t, want_n = _hand_dkd(logits.detach(), t_logits, batch["label"], 4.0)
    assert terms["tckd"].item() == pytest.approx(want_t, rel=1e-9)
    assert terms["nckd"].item() == pytest.approx(want_n, rel=1e-9)
    torch.testing.assert_close(loss, terms["ce"] + w * (1.0 * terms["tckd"] + 6.0 * terms["nckd"]))


@pytest.mark.parametrize("p", [2.0, 3.0])
def test_attention_gradient_is_the_formulas(p):
    """AT's channel mean of squares has a hand-written backward: check it numerically."""
    f = torch.randn(2, 3, 4, 4, generator=GEN, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: attention(x, p, (2, 2)), (f,))
    assert torch.autograd.gradcheck(lambda x: attention(x, p, (4, 4)), (f,))
