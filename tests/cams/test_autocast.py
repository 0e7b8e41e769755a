"""CAM maps under mixed precision (``torch.autocast``): bf16 on CPU, fp16 (+ GradScaler) on CPU
and CUDA. The network runs in the autocast dtype, the map's own arithmetic in float32
(:mod:`cams._precision`).

Thresholds are measured on this module's model (random-weight WRN-10-1 with random BatchNorm
statistics, 32x32 Gaussian inputs, batch 8, seeds 0-4) with margin; see ``COSINE_MIN``. Maps
are compared signed (``relu=False``): the final ReLU turns a map that is <= 0 everywhere into
the zero map, so a rounding-sized change can flip between it and a tiny positive map (cosine 0
on one of these samples with the ReLU) -- a property of the definition, not of the arithmetic.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cams
from cams._precision import Autocast, fp32_parts, upcast
from tests.cams._models import Tiny, randomize_bn, wrn

# Every registered method with its quick options, and the generic (autograd) path of the ones
# that have a fast path on the WRN.
CASES = [(name, {}) for name in cams.METHODS] + [
    (name, {"fast_path": False}) for name in cams.METHODS if name != "scorecam"
]
IDS = [f"{n}-{'generic' if o else 'default'}" for n, o in CASES]

# Smallest per-sample cosine (bf16 autocast vs fp32, signed maps) measured over seeds 0-4 on this
# model: eval 0.9960 (GradCAM++, generic path), train 0.9964 (LayerCAM); most cases > 0.999. The
# rounding of the network's own activations (A, logits in bf16) sets this floor. GradCAM++ has
# the heaviest tail: its weight has a pole where 2 + ΣA·g = 0, near which any rounding of A moves
# it arbitrarily (worst of 160 samples at batch 32: 0.972); the tests use seed 0.
COSINE_MIN = 0.99


def _model(train: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return wrn(10, 1).train(train)


def _inputs(seed: int = 0, batch: int = 8) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, 32, 32, generator=gen), torch.randint(
        0, 10, (batch,), generator=gen
    )


def _cam(name: str, model: nn.Module, options: dict) -> cams.BaseCAM:
    cls = cams.METHODS[name]
    fast = {"max_channels": 16} if name == "scorecam" else {}  # 16 of 64 masked inputs per image
    return cls(model, "block3", **{**cls.quick_options, **fast, **options})


def _cosine(a: Tensor, b: Tensor) -> Tensor:
    return F.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1, eps=1e-30)


def _bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_bf16_maps_match_fp32(name: str, options: dict, mode: str) -> None:
    """Under CPU bf16 autocast the maps are float32 and per-sample close to the fp32 maps."""
    model = _model(mode == "train")
    x, y = _inputs()
    cam = _cam(name, model, {**options, "relu": False})
    ref = cam(x, y)
    with _bf16():
        low = cam(x, y)
    assert ref.dtype == low.dtype == torch.float32
    assert cam.last_path == ("generic" if options or name == "scorecam" else "fast")
    assert _cosine(low, ref).min() > COSINE_MIN


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_bf16_student_loss_gradients(name: str, options: dict) -> None:
    """compute(create_graph=True) under bf16 autocast in train mode, backward outside it (as
    Lightning does): float32 maps, finite parameter gradients close to the fp32 ones."""
    x, y = _inputs(batch=8)
    target = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(1))
    grads = {}
    for precision in ("fp32", "bf16"):
        model = _model(True)
        cam = _cam(name, model, options)
        with _bf16() if precision == "bf16" else torch.autocast("cpu", enabled=False):
            out = cam.compute(x, y, create_graph=True)
            loss = F.cross_entropy(out.logits, y)
            term = (cams.normalize(out.maps, "l2") - cams.normalize(target, "l2")).square().sum()
        assert out.maps.dtype == torch.float32 and out.maps.requires_grad
        params = [p for p in model.parameters() if p.requires_grad]
        g_term = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        assert sum(g.abs().sum() for g in g_term if g is not None) > 0  # the map term trains
        (loss + term).backward()
        grads[precision] = torch.cat([p.grad.flatten() for p in params])
        assert torch.isfinite(grads[precision]).all()
    # measured >= 0.976 over the cases, seeds 0-1 (bf16 rounding of every backward op)
    assert F.cosine_similarity(grads["bf16"].double(), grads["fp32"].double(), dim=0) > 0.95


def test_fp32_parts_matter_for_gradcampp() -> None:
    """Without the float32 parts Grad-CAM++'s ``g²/(2g² + ΣA·g³)`` and the weighted sum run in
    bf16: measurably worse maps (seed 0, 32 samples: min cosine -0.97 instead of 0.993)."""
    model = _model(False)
    x, y = _inputs(batch=32)
    cam = _cam("gradcampp", model, {"relu": False})
    ref = cam(x, y)
    with _bf16():
        ours = cam(x, y)
        with fp32_parts(False):
            naive = cam(x, y)
    assert naive.dtype == torch.bfloat16  # the map arithmetic stayed under autocast
    assert _cosine(ours, ref).min() > 0.98
    assert _cosine(naive.float(), ref).min() < 0.5


def test_fp16_generic_path_does_not_underflow() -> None:
    """A confident sample's ``prob`` gradient (``p_c (1 - p_c) ~ 1e-8``) underflows float16 on
    its way back to ``A`` (the smallest fp16 number is 6e-8); the per-sample utility scaling of
    the autograd path keeps the map (without it the maps are all zero)."""
    torch.manual_seed(0)
    model = randomize_bn(Tiny(c_in=3, c=8, k=10)).eval()
    with torch.no_grad():
        model.fc.bias[0] += 20.0  # every sample predicts class 0 with p ~ 1 - 1e-8
    x = torch.randn(6, 3, 8, 8)
    with torch.no_grad():
        assert (1 - torch.softmax(model(x), 1)[:, 0]).max() < 1e-6
    cam = cams.GradCAM(model, "conv", utility="prob", fast_path=False, relu=False)
    ref = cam(x)
    with torch.autocast("cpu", dtype=torch.float16):
        low = cam(x)
        with mock.patch("cams._base._fp16_scale", lambda *args: None):
            unscaled = cam(x)
    assert low.dtype == torch.float32 and ref.abs().amax((1, 2)).min() > 0
    assert _cosine(low, ref).min() > 0.99
    assert not unscaled.any()


def _device_params() -> list:
    cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
    return ["cpu", pytest.param("cuda", marks=cuda)]


def _step_grads(
    model: nn.Module, cam: cams.BaseCAM, x: Tensor, y: Tensor, target: Tensor, scaler, dtype
) -> tuple[Tensor, Tensor, bool]:
    """One training step of the ``16-mixed`` recipe: (maps, unscaled gradients, step taken)."""
    device = x.device.type
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # steps leave the weights as they are
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=dtype, enabled=scaler.is_enabled()):
        out = cam.compute(x, y, create_graph=True)
        term = (cams.normalize(out.maps, "l2") - cams.normalize(target, "l2")).square().sum()
        loss = F.cross_entropy(out.logits, y) + term
    scaler.scale(loss).backward()
    scaler.unscale_(opt)
    grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
    before = scaler.get_scale() if scaler.is_enabled() else 1.0
    scaler.step(opt)
    scaler.update()
    taken = not scaler.is_enabled() or scaler.get_scale() >= before
    return out.maps.detach(), grad, taken


@pytest.mark.parametrize("device", _device_params())
@pytest.mark.parametrize("name", list(cams.METHODS))
def test_fp16_grad_scaler_double_backward(device: str, name: str) -> None:
    """The ``16-mixed`` recipe: fp16 autocast + GradScaler, maps with ``create_graph=True`` (a
    ShapleyCAM map holds ``H·A``, so the loss needs 3rd-order terms) and the scaled backward.

    With the initial scale 2^16 the scaled gradient of the map term can exceed the float16 range
    where it enters the network (the cast back to ``A``'s dtype): GradScaler then skips the step
    and halves the scale, as for any fp16 loss. Here a step is taken after at most 4 skips
    (measured: 0-1 on this model), and its unscaled gradients and maps match fp32."""
    x, y = (t.to(device) for t in _inputs(batch=8))
    target = torch.rand(8, 8, 8, generator=torch.Generator().manual_seed(1)).to(device)
    model = _model(True).to(device)
    m32, g32, _ = _step_grads(
        model, _cam(name, model, {}), x, y, target, torch.amp.GradScaler(device, enabled=False),
        torch.float16,
    )  # fmt: skip
    model = _model(True).to(device)
    cam, scaler = _cam(name, model, {}), torch.amp.GradScaler(device)
    for _ in range(5):
        m16, g16, taken = _step_grads(model, cam, x, y, target, scaler, torch.float16)
        if taken:
            break
    assert taken and torch.isfinite(g16).all()
    assert m16.dtype == torch.float32
    assert _cosine(m16, m32).min() > COSINE_MIN
    assert F.cosine_similarity(g16.double(), g32.double(), dim=0) > 0.95


def test_autocast_state_is_restored_and_reruns_use_it() -> None:
    """Reruns of the network (Score-CAM's masked inputs) run in the caller's autocast dtype; the
    caller's state is unchanged after the call."""
    model = _model(False)
    x, y = _inputs(batch=2)
    seen: list[torch.dtype] = []
    handle = model.fc.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    try:
        with _bf16():
            cams.ScoreCAM(model, "block3", batch_size=64)(x, y)
            assert torch.is_autocast_enabled("cpu")
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    finally:
        handle.remove()
    assert len(seen) > 1 and set(seen) == {torch.bfloat16}
    assert not torch.is_autocast_enabled("cpu")


def test_upcast_and_capture() -> None:
    assert upcast(torch.ones(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert upcast(torch.ones(1, dtype=torch.float64)).dtype == torch.float64
    assert upcast(torch.ones(1, dtype=torch.long)).dtype == torch.long
    assert not Autocast.capture(torch.device("cpu")).enabled
    with _bf16():
        amp = Autocast.capture(torch.device("cpu"))
        assert amp.low_precision and amp.dtype == torch.bfloat16
        with amp.exact():
            assert not torch.is_autocast_enabled("cpu")
            with amp.network():
                assert torch.is_autocast_enabled("cpu")
