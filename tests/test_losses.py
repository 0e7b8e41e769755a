"""Loss terms against hand-written references."""

from __future__ import annotations

import math

import pytest
import torch

from distill.losses import check_alpha, explanation_loss, kd_loss, map_agreement


def test_explanation_loss_l2_matches_reference():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.rand(4, 8, 8, generator=gen), torch.rand(4, 8, 8, generator=gen)
    expected = 0.0
    for i in range(4):
        a = s[i].flatten() / s[i].flatten().norm()
        b = t[i].flatten() / t[i].flatten().norm()
        expected += float(((a - b) ** 2).sum()) / 4
    assert explanation_loss(s, t, "l2").item() == pytest.approx(expected, rel=1e-5)


def test_explanation_loss_none_and_minmax():
    s = torch.tensor([[[0.0, 2.0], [4.0, 2.0]]])
    t = torch.tensor([[[1.0, 1.0], [1.0, 3.0]]])
    assert explanation_loss(s, t, "none").item() == pytest.approx(1 + 1 + 9 + 1)
    # minmax: s -> [0, .5, 1, .5]; t -> [0, 0, 0, 1]
    assert explanation_loss(s, t, "minmax").item() == pytest.approx(0 + 0.25 + 1 + 0.25)


def test_explanation_loss_is_zero_for_scaled_maps_and_grads_only_reach_student():
    s = (torch.rand(3, 8, 8) + 0.1).requires_grad_()
    t = (3 * s.detach()).requires_grad_()
    loss = explanation_loss(s, t, "l2")
    assert loss.item() == pytest.approx(0.0, abs=1e-10)
    explanation_loss(s, torch.rand(3, 8, 8).requires_grad_(), "l2").backward()
    assert s.grad is not None and t.grad is None


def test_explanation_loss_all_zero_map_is_finite():
    s, t = torch.zeros(2, 8, 8, requires_grad=True), torch.rand(2, 8, 8)
    loss = explanation_loss(s, t, "l2")
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(s.grad).all()
    assert loss.item() == pytest.approx(1.0, rel=1e-5)  # ||0 - unit||^2


def test_explanation_loss_shape_mismatch_names_the_fix():
    with pytest.raises(ValueError, match="student_layer"):
        explanation_loss(torch.rand(2, 8, 8), torch.rand(2, 4, 4))
    with pytest.raises(ValueError, match="normalization"):
        explanation_loss(torch.rand(2, 8, 8), torch.rand(2, 8, 8), "softmax")


def test_kd_loss_matches_reference_formula():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(5, 10, generator=gen), torch.randn(5, 10, generator=gen)
    temp = 4.0
    p_t = torch.softmax(t / temp, 1)
    p_s = torch.softmax(s / temp, 1)
    kl = (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert kd_loss(s, t, temp).item() == pytest.approx(temp**2 * kl.item(), rel=1e-5)
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_alpha_must_be_finite_and_non_negative(bad):
    with pytest.raises(ValueError, match="loss.alpha"):
        check_alpha(bad)
    assert check_alpha(0) == 0.0


def test_map_agreement_is_cosine():
    a = torch.tensor([[[1.0, 0.0]], [[1.0, 1.0]]])
    b = torch.tensor([[[0.0, 1.0]], [[2.0, 2.0]]])
    torch.testing.assert_close(map_agreement(a, b), torch.tensor([0.0, 1.0]))
