"""Fast-path detection and agreement of the closed-form head with the generic autograd path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cams
from tests.cams._models import randomize_bn, resnet18, wrn


class ActHead(nn.Module):
    """conv → [BN → activation → dropout] → mean over (2, 3) → linear; smooth activations too."""

    def __init__(self, act: nn.Module) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn, self.act, self.drop = nn.BatchNorm2d(6), act, nn.Dropout(0.3)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(self.act(self.bn(self.conv(x)))).mean((2, 3)))


class FunctionalHead(nn.Module):
    """conv → F.relu → F.avg_pool2d(·, 4) → view(size(0), -1) → linear."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        y = F.avg_pool2d(F.relu(self.conv(x)), 4)
        return self.fc(y.view(y.size(0), -1))


class NotFast(nn.Module):
    """Heads the fast path must reject: a skip around the target, two linear layers, max pool."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.conv = nn.Conv2d(6, 6, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(6, 6), nn.Linear(6, 5)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stem(x)
        a = self.conv(s)
        if self.kind == "skip":
            return self.fc2(F.relu(a + s).mean((2, 3)))
        if self.kind == "mlp":
            return self.fc2(F.relu(self.fc1(a.mean((2, 3)))))
        return self.fc2(F.adaptive_max_pool2d(a, 1).flatten(1))


ACTS = [nn.ReLU(), nn.LeakyReLU(0.1), nn.ELU(0.7), nn.Sigmoid(), nn.Tanh(), nn.SiLU(), nn.ReLU6()]


def _cases() -> list[tuple[str, nn.Module, str, tuple[int, ...]]]:
    torch.manual_seed(0)
    out = [
        ("wrn-block3", wrn(), "block3", (2, 3, 16, 16)),
        ("wrn-relu", wrn(), "relu", (2, 3, 16, 16)),
        ("functional", FunctionalHead(), "conv", (2, 3, 4, 4)),
    ]
    out += [
        (f"act-{type(a).__name__}", randomize_bn(ActHead(a)), "conv", (2, 3, 4, 4)) for a in ACTS
    ]
    return out


CASES = _cases()


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("name,model,layer,shape", CASES, ids=[c[0] for c in CASES])
def test_fast_equals_generic(
    name: str, model: nn.Module, layer: str, shape: tuple[int, ...]
) -> None:
    model.eval()
    torch.manual_seed(1)
    x = torch.randn(*shape) * 2
    targets = torch.arange(shape[0]) + 1
    methods = [(cams.GradCAM, {"variant": v}) for v in ("mean", "hires", "elementwise")]
    methods += [(cams.GradCAMPlusPlus, {})]
    methods += [(cams.ShapleyCAM, {"variant": v}) for v in ("mean", "hires", "elementwise")]
    methods += [(cams.ShapCAM, {"n_permutations": 6, "antithetic": True})]
    for cls, opts in methods:
        for utility in cams.UTILITIES:
            fast = cls(model, layer, utility=utility, relu=False, **opts)
            slow = cls(model, layer, utility=utility, relu=False, fast_path=False, **opts)
            a, b = fast(x, targets), slow(x, targets)
            assert fast.last_path == "fast" and slow.last_path == "generic"
            assert _rel(a, b) < 1e-5, (cls.__name__, opts, utility, _rel(a, b))


def test_resnet18_layer4_fast_path() -> None:
    model = resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    head = cams.ShapleyCAM(model, "layer4").head()
    assert head is not None and head.ops == () and head.linear is model.fc
    for utility in ("logit", "rest"):
        fast = cams.ShapleyCAM(model, "layer4", utility=utility, relu=False)
        slow = cams.ShapleyCAM(model, "layer4", utility=utility, relu=False, fast_path=False)
        assert _rel(fast(x), slow(x)) < 1e-5
        assert fast.last_path == "fast"


def test_wrn_head_structure() -> None:
    model = wrn()
    head = cams.GradCAM(model, "block3").head()
    assert head is not None and [op.kind for op in head.ops] == ["bn", "relu"]
    assert head.ops[0].module is model.bn and head.linear is model.fc
    assert cams.GradCAM(model, "relu").head().ops == ()
    assert cams.GradCAM(model, "block2").head() is None  # block3 follows


@pytest.mark.parametrize("kind", ["skip", "mlp", "maxpool"])
def test_rejected_heads_use_generic_path(kind: str) -> None:
    model = NotFast(kind).eval()
    cam = cams.ShapleyCAM(model, "conv", utility="prob")
    assert cam.head() is None
    cam(torch.randn(2, 3, 4, 4))
    assert cam.last_path == "generic"


def test_mode_dependent_heads_fall_back() -> None:
    torch.manual_seed(0)
    model = randomize_bn(ActHead(nn.ReLU()))
    cam = cams.GradCAM(model, "conv", utility="prob", relu=False)
    x = torch.randn(3, 3, 4, 4)
    model.train()  # train-mode BN couples positions and samples; dropout is random
    cam(x)
    assert cam.last_path == "generic"
    model.eval()
    model.drop.train()  # BN eval but dropout active
    cam(x)
    assert cam.last_path == "generic"
    model.drop.p = 0.0
    cam(x)
    assert cam.last_path == "fast"


def test_untraceable_model_falls_back() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 2)

        def forward(self, x: Tensor) -> Tensor:
            a = self.conv(x)
            if a.sum() > 1e9:  # data-dependent control flow: fx cannot trace it
                a = a * 2
            return self.fc(a.mean((2, 3)))

    cam = cams.GradCAM(Dynamic(), "conv")
    assert cam.head() is None
    assert cam(torch.randn(1, 3, 4, 4)).shape == (1, 4, 4)
