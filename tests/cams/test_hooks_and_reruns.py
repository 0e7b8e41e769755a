"""The fast path refuses hooked heads; Shap-CAM's reruns evaluate the forward's own function."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cams
from tests.cams._models import Tiny, randomize_bn

METHODS = [
    (cams.GradCAM, {}),
    (cams.ShapleyCAM, {}),
    (cams.ShapCAM, {"exact": True, "relu": False}),
]
IDS = ["GradCAM", "ShapleyCAM", "ShapCAM"]


def _scale_logits(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    return output / 0.3  # temperature scaling


def _channel_mask(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=output.dtype)
    return output * mask.view(1, -1, 1, 1)


def _pre_scale(module: nn.Module, inputs: tuple) -> tuple[Tensor]:
    return (inputs[0] * 2.0,)


HOOKS = {
    "fc-forward-scale": lambda m: m.fc.register_forward_hook(_scale_logits),
    "relu-forward-mask": lambda m: m.relu.register_forward_hook(_channel_mask),
    "fc-pre-hook": lambda m: m.fc.register_forward_pre_hook(_pre_scale),
    "model-forward-scale": lambda m: m.register_forward_hook(_scale_logits),
    "global-linear-scale": lambda m: nn.modules.module.register_module_forward_hook(
        lambda mod, i, o: o / 0.3 if isinstance(mod, nn.Linear) else None
    ),
}


@pytest.mark.parametrize("hook", list(HOOKS))
@pytest.mark.parametrize("cls,opts", METHODS, ids=IDS)
def test_hooked_head_falls_back_to_the_generic_path(cls: type, opts: dict, hook: str) -> None:
    """With a hook on the head, the map equals the generic (autograd / rerun) path's, which runs
    the hooked modules; the closed form would read ``fc.weight`` past the hook."""
    torch.manual_seed(0)
    model = randomize_bn(Tiny(c_in=2, c=3, k=4)).eval()
    x, y = torch.randn(3, 2, 2, 2) * 2, torch.tensor([0, 1, 3])
    plain = cls(model, "conv", **opts)(x, y)
    handle = HOOKS[hook](model)
    try:
        cam = cls(model, "conv", **opts)
        hooked = cam(x, y)
        reference = cls(model, "conv", fast_path=False, **opts)(x, y)
    finally:
        handle.remove()
    torch.testing.assert_close(hooked, reference, rtol=1e-5, atol=1e-6)
    assert cam.last_path == "generic"
    assert not torch.allclose(hooked, plain, rtol=1e-3, atol=1e-5)  # the hook matters
    cams.GradCAM(model, "conv")(x, y)
    assert cams.GradCAM(model, "conv").head() is not None  # hooks removed: fast path again


class SkipTrain(nn.Module):
    """A pre-target BatchNorm output is added after the target (train mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_s = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn_h = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: Tensor) -> Tensor:
        s = F.relu(self.bn_s(self.stem(x)))
        return self.fc((F.relu(self.bn_h(self.conv(s))) + s).mean((2, 3)))


def test_generic_reruns_evaluate_the_forward_function_with_a_skip_around_the_target() -> None:
    """v(N) of the reruns equals the utility of the actual train-mode forward, and the exact
    Shapley values add up to v(N) - v(∅) of that forward."""
    torch.manual_seed(0)
    model = randomize_bn(SkipTrain()).train()
    x, y = torch.randn(4, 3, 2, 2) * 2, torch.tensor([0, 1, 2, 3])
    cam = cams.ShapCAM(model, "conv", exact=True, relu=False)
    assert cam.head() is None
    with torch.no_grad():
        actual = torch.softmax(model(x), 1)[torch.arange(4), y]
    game = cam.value_function(x, y)
    full = game(torch.ones(1, 4, dtype=torch.bool))
    empty = game(torch.zeros(1, 4, dtype=torch.bool))
    torch.testing.assert_close(full[:, 0], actual, rtol=0, atol=1e-6)
    phi = cam(x, y)
    torch.testing.assert_close(phi.sum((1, 2)), actual - empty[:, 0], rtol=0, atol=1e-6)


def _sync_bn_worker(rank: int, port: int, errors: Any) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.SyncBatchNorm(4),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(4, 2),
        ).train()
        try:
            cams.GradCAM(model, "0")(torch.randn(3, 3, 6, 6), 0)
            errors.put("accepted")
        except ValueError as err:
            errors.put(str(err))
    finally:
        dist.destroy_process_group()


def test_synchronized_batchnorm_across_processes_is_refused() -> None:
    """Two gloo processes: SyncBatchNorm's statistics are global, which the per-sample maps do
    not record, so the call is refused with the way out (one process alone is plain BN)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    mp.start_processes(_sync_bn_worker, args=(port, errors), nprocs=2, start_method="spawn")
    messages = [errors.get(timeout=60) for _ in range(2)]
    assert all("sync_batchnorm=false" in m for m in messages), messages
