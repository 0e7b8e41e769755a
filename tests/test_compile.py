"""torch.compile: the frozen teacher forward (distill.compile) equals eager; a student CAM step on a
compiled net gives the eager loss and gradients, and the autograd path is refused with a clear
error. Compiling takes seconds to tens of seconds on CPU (marked slow)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import cams
from distill.compile import compile_pays, maybe_compile_forward
from distill.losses import explanation_loss
from distill.models import WideResNet

pytestmark = pytest.mark.slow

needs_compiler = pytest.mark.skipif(not compile_pays("cpu"), reason="no Inductor C++ toolchain")


def _net(depth: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = WideResNet(depth, 1)
    with torch.no_grad():  # non-trivial BN statistics, so folding them into the convs matters
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def test_disabled_returns_the_module() -> None:
    net = _net()
    assert maybe_compile_forward(net, enabled=False) is net


@needs_compiler
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_frozen_forward_equals_eager(bf16: bool) -> None:
    """Same logits as the eager module (fp32: to float rounding; bf16 autocast: within bf16's
    rounding of the eager forward itself), in two calls; with grad enabled it runs eager."""
    net = _net()
    fwd = maybe_compile_forward(net, enabled=True, dynamic=False)
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        ref = net(x).float()
        for _ in range(2):
            out = fwd(x).float()
            scale = ref.abs().max()
            tol = 5e-2 if bf16 else 1e-4
            assert (out - ref).abs().max() <= tol * scale
    with torch.enable_grad():
        assert fwd(x).requires_grad  # the eager module, not the frozen graph


@needs_compiler
def test_weights_are_constants_of_the_frozen_graph() -> None:
    """Freezing is applied: a later change of the weights is not seen (the documented contract:
    a new ``maybe_compile_forward`` after loading other weights)."""
    net = _net()
    fwd = maybe_compile_forward(net, enabled=True, dynamic=False)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = fwd(x)
        net.block1[0].conv0.weight.mul_(2.0)
        assert torch.equal(fwd(x), before) and not torch.allclose(net(x), before)


def _cam_loss(net: torch.nn.Module, method: str, fast_path: bool = True) -> tuple[float, Tensor]:
    """CE + explanation term of one student step (train mode, ``create_graph=True``): the loss
    and the parameter gradients."""
    cam = cams.build(method, net, "block3", fast_path=fast_path)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen)
    target = torch.rand(8, 4, 4, generator=gen)
    out = cam.compute(x, y, create_graph=True)
    loss = F.cross_entropy(out.logits, y) + explanation_loss(out.maps, target, "l2")
    net.zero_grad()
    loss.backward()
    return float(loss), torch.cat([p.grad.flatten() for p in net.parameters()])


@pytest.mark.parametrize("method", ["gradcam", "shapleycam"])
def test_compiled_student_cam_step_equals_eager(method: str) -> None:
    """``module.compile=true`` with a CAM preset: on the closed-form head the derivatives w.r.t.
    ``A`` need no autograd through the network, so the loss's backward through the compiled
    graph is first order; loss and gradients equal eager (float rounding). Dynamo + AOTAutograd
    (``aot_eager``) make the graph and its backward, which is what decides this; Inductor's code
    generation on top (measured in BENCHMARKS.md) would only add minutes to the test."""
    eager = _net().train()
    net = copy.deepcopy(eager)
    net.compile(backend="aot_eager")
    loss_e, grad_e = _cam_loss(eager, method)
    loss_c, grad_c = _cam_loss(net, method)
    assert loss_c == pytest.approx(loss_e, rel=1e-5)
    assert (grad_c - grad_e).norm() <= 1e-3 * grad_e.norm()


def test_compiled_model_on_the_autograd_path_is_refused() -> None:
    """The generic path would need a double backward through the compiled graph (AOTAutograd:
    "does not currently support double backward"): a clear error instead."""
    net = _net().train()
    net.compile(backend="aot_eager")
    with pytest.raises(ValueError, match="double backward"):
        _cam_loss(net, "gradcam", fast_path=False)
