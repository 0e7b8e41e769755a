"""Every preset gives the same loss terms and parameter gradients as the objective it always had.

The reference is written here independently of :class:`~distill.modules.student.StudentModule`:
the student and teacher networks and :mod:`cams` give logits and maps, and the formulas are
spelled out (``(1 - beta) CE + beta T^2 KL(p_t^T || p_s^T) + alpha mean_b ||N(s) - N(t)||^2``).
Everything runs in float64 on one fixed batch, so "the same" means equal to rounding.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import cams
from distill.data.augment import AugParams
from distill.modules.student import step_seed
from distill.presets import loss_presets
from tests.conftest import student

# the presets that existed before the objectives registry (CE, KD and the CAM term)
LEGACY = [p for p in loss_presets() if p.removesuffix("_kd") in ("ce", *cams.METHODS)]
FAST = {  # cheap settings of the sampled / per-channel methods (the formula is unchanged)
    "shapcam": [
        "loss.teacher_maps=online",
        "loss.teacher_cam.n_permutations=32",
        "loss.student_cam.n_permutations=8",
    ],
    "scorecam": ["++loss.student_cam.max_channels=4", "++loss.teacher_cam.max_channels=4"],
}


def _batch() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(6, 3, 32, 32, generator=gen, dtype=torch.float64),
        "label": torch.tensor([0, 3, 5, 9, 3, 1]),
        "index": torch.arange(6),
        "aug": AugParams.sample(6, generator=gen),
    }


def _l2(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(1)
    return flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-12)


def reference(module, cfg, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and its terms, from the networks and the published formulas."""
    loss_cfg = cfg.loss
    x, y = batch["image"], batch["label"]
    net, teacher_net = module.net, module.teacher.net
    terms: dict[str, torch.Tensor] = {}
    if loss_cfg.method:
        # null layers: the WRNs' declared cam_layer, the last conv output block3 (8x8 both)
        s_layer, t_layer = loss_cfg.student_layer or "block3", loss_cfg.teacher_layer or "block3"
        options = {**loss_cfg.cam, **loss_cfg.student_cam}
        cam = cams.build(loss_cfg.method, net, s_layer, **options)
        if isinstance(options.get("seed", 0), int) and loss_cfg.method == "shapcam":
            cam.seed = step_seed(options.get("seed", 0), torch.initial_seed(), 0)
        out = cam.compute(x, y, create_graph=True)
        logits, s_maps = out.logits, out.maps
        t_options = {**loss_cfg.cam, **loss_cfg.teacher_cam}
        t_cam = cams.build(loss_cfg.method, teacher_net, t_layer, **t_options)
        t_maps = t_cam(x, y).detach()
    else:
        logits = net(x)
    with torch.no_grad():
        t_logits = teacher_net(x)
    terms["ce"] = F.cross_entropy(logits, y)
    loss = terms["ce"]
    if loss_cfg.kd.enabled:
        temp, beta = loss_cfg.kd.temperature, loss_cfg.kd.beta
        p_t = torch.softmax(t_logits / temp, 1)
        log_p_s = torch.log_softmax(logits / temp, 1)
        terms["kd"] = temp**2 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()
        loss = (1 - beta) * terms["ce"] + beta * terms["kd"]
    if loss_cfg.method:
        assert loss_cfg.norm == "l2"
        terms["cam"] = (_l2(s_maps) - _l2(t_maps)).pow(2).sum(1).mean()
        loss = loss + loss_cfg.alpha * terms["cam"]
    return loss, terms


def _grads(module, loss: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in module.net.parameters()]
    return list(torch.autograd.grad(loss, params, allow_unused=True))


@pytest.mark.parametrize("preset", [p for p in LEGACY if p != "ce"])
def test_preset_terms_and_gradients_are_unchanged(preset, tiny_cfg):
    method = preset.removesuffix("_kd")
    cfg = tiny_cfg(f"loss={preset}", "loss.teacher_memo=false", *FAST.get(method, []))
    torch.manual_seed(0)
    module = student(cfg).double().train()
    batch = _batch()
    loss, _, terms = module.compute_loss(batch)
    got = _grads(module, loss)
    torch.manual_seed(0)
    want_loss, want_terms = reference(module, cfg, batch)
    want = _grads(module, want_loss)
    assert set(terms) == set(want_terms)
    for name, value in want_terms.items():
        torch.testing.assert_close(terms[name], value, rtol=1e-10, atol=1e-12, msg=name)
    torch.testing.assert_close(loss, want_loss, rtol=1e-10, atol=1e-12)
    assert any(float(g.abs().sum()) > 0 for g in got if g is not None)
    for g, w in zip(got, want, strict=True):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-8, atol=1e-12)
