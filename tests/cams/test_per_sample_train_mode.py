"""Per-sample maps in train mode (issue: BatchNorm after the target couples the samples).

Sample i's map is defined from ``∂U_i/∂A_i`` (and ``H·A`` of ``U_i``) with the batch statistics
of the BatchNorm layers after the target held as constants. The references below compute that
independently: capture ``A`` and the statistics from the train-mode forward, then differentiate
a hand-written per-sample head, one sample at a time.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import cams
from tests.cams._models import LocalWRN, randomize_bn

EPS = 1e-5
GRADIENT_METHODS = [
    ("gradcam", cams.GradCAM, {}),
    ("gradcampp", cams.GradCAMPlusPlus, {}),
    ("shapleycam", cams.ShapleyCAM, {"variant": "mean"}),
    ("shapleycam-H", cams.ShapleyCAM, {"variant": "hires"}),
    ("shapleycam-E", cams.ShapleyCAM, {"variant": "elementwise"}),
]
IDS = [m[0] for m in GRADIENT_METHODS]


class SkipNet(nn.Module):
    """A pre-target BatchNorm output skips past the target and is added after it; the head is
    not a chain, so every method takes its generic path."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.bn_s = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)  # the target
        self.bn_h = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 5)

    def skip(self, x: Tensor) -> Tensor:
        return F.relu(self.bn_s(self.stem(x)))

    def forward(self, x: Tensor) -> Tensor:
        s = self.skip(x)
        return self.fc((F.relu(self.bn_h(self.conv(s))) + s).mean((2, 3)))


def _bn(a: Tensor, bn: nn.BatchNorm2d, mean: Tensor, var: Tensor) -> Tensor:
    shape = (1, -1, 1, 1)
    return (a - mean.view(shape)) * torch.rsqrt(var.view(shape) + bn.eps) * bn.weight.view(
        shape
    ) + bn.bias.view(shape)


def _stats(t: Tensor) -> tuple[Tensor, Tensor]:
    return t.mean((0, 2, 3)), t.var((0, 2, 3), unbiased=False)


def _capture(model: nn.Module, layer: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(A, logits)`` of the ordinary train-mode forward (graph kept)."""
    box = {}
    handle = layer.register_forward_hook(lambda m, i, o: box.setdefault("a", o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return box["a"], logits


def _rest(logits: Tensor, c: int) -> Tensor:
    return logits[0, c] + torch.log_softmax(logits, 1)[0, c]


def _map(name: str, g: Tensor, h: Tensor | None, a: Tensor, variant: str) -> Tensor:
    """The method's formula on one sample's (1, K, h, w) tensors."""
    if name == "gradcampp":
        g2 = g * g
        alpha = torch.where(
            g != 0, g2 / (2 * g2 + a.sum((2, 3), keepdim=True) * g2 * g + 1e-6), torch.zeros_like(g)
        )
        return torch.relu(((alpha * torch.relu(g)).sum((2, 3))[:, :, None, None] * a).sum(1))
    w = g if h is None else g - 0.5 * h
    if variant == "hires":
        return torch.relu((w * a).sum(1))
    if variant == "elementwise":
        return torch.relu(torch.relu(w * a).sum(1))
    return torch.relu((w.mean((2, 3), keepdim=True) * a).sum(1))


def _reference(
    name: str, variant: str, head, a: Tensor, targets: Tensor, create_graph: bool
) -> Tensor:
    """Per-sample maps: ``head(a_i, i)`` are the logits (1, K) of sample i as a function of its
    activation alone (every other quantity held)."""
    rest = name.startswith("shapley")
    maps = []
    for i, c in enumerate(targets.tolist()):
        ai = a[i : i + 1]
        var = ai if create_graph else ai.detach().requires_grad_()
        logits = head(var, i)
        u = _rest(logits, c) if rest else logits[0, c]
        (g,) = torch.autograd.grad(u, var, create_graph=True)
        h = None
        if rest:
            (h,) = torch.autograd.grad(g, var, grad_outputs=ai, create_graph=create_graph)
        maps.append(_map(name, g, h, ai, variant))
    return torch.cat(maps)


def _wrn_head(model: LocalWRN, a: Tensor):
    mean, var = _stats(a)
    return lambda ai, i: model.fc(torch.relu(_bn(ai, model.bn, mean, var)).mean((2, 3)))


def _skip_head(model: SkipNet, x: Tensor, a: Tensor):
    mean, var = _stats(a)
    s = model.skip(x)  # train mode: the batch's statistics, as in the forward
    return lambda ai, i: model.fc(
        (torch.relu(_bn(ai, model.bn_h, mean, var)) + s[i : i + 1]).mean((2, 3))
    )


def _rel(a: Tensor, b: Tensor) -> float:
    return float(((a - b).norm() / b.norm().clamp_min(1e-12)).detach())


def _setup(kind: str) -> tuple[nn.Module, nn.Module, Tensor, Tensor]:
    torch.manual_seed(0)
    if kind == "wrn":
        model, layer = randomize_bn(LocalWRN(width=4)).train(), "block3"
    else:
        model, layer = randomize_bn(SkipNet()).train(), "conv"
    x = torch.randn(6, 3, 16, 16) if kind == "wrn" else torch.randn(6, 3, 6, 6)
    return model, dict(model.named_modules())[layer], x, torch.tensor([0, 1, 2, 3, 4, 0])


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast", "generic"])
@pytest.mark.parametrize("name,cls,opts", GRADIENT_METHODS, ids=IDS)
def test_train_mode_maps_are_per_sample_on_a_preactivation_resnet(
    name: str, cls: type, opts: dict, fast_path: bool
) -> None:
    model, layer, x, y = _setup("wrn")
    reference_model = copy.deepcopy(model)
    cam = cls(model, "block3", fast_path=fast_path, **opts)
    maps = cam(x, y)
    assert cam.last_path == ("fast" if fast_path else "generic")
    a, _ = _capture(reference_model, reference_model.block3, x)
    ref = _reference(
        name, opts.get("variant", "mean"), _wrn_head(reference_model, a), a, y, create_graph=False
    )
    assert _rel(maps, ref) <= 1e-5


@pytest.mark.parametrize("name,cls,opts", GRADIENT_METHODS, ids=IDS)
def test_train_mode_maps_are_per_sample_with_a_skip_around_the_target(
    name: str, cls: type, opts: dict
) -> None:
    model, layer, x, y = _setup("skip")
    reference_model = copy.deepcopy(model)
    cam = cls(model, "conv", **opts)
    maps = cam(x, y)
    assert cam.last_path == "generic"
    a, _ = _capture(reference_model, reference_model.conv, x)
    ref = _reference(
        name,
        opts.get("variant", "mean"),
        _skip_head(reference_model, x, a),
        a,
        y,
        create_graph=False,
    )
    assert _rel(maps, ref) <= 1e-5


@pytest.mark.parametrize("kind", ["wrn-fast", "wrn-generic", "skip"])
@pytest.mark.parametrize(
    "name,cls,opts", [GRADIENT_METHODS[0], GRADIENT_METHODS[2]], ids=["gradcam", "shapleycam"]
)
def test_loss_gradients_match_the_per_sample_reference(
    name: str, cls: type, opts: dict, kind: str
) -> None:
    """Inside a loss (create_graph=True) the parameters receive the gradient of the per-sample
    maps, including the paths through the batch statistics; the logits stay the ordinary
    train-mode forward's."""
    model, layer, x, y = _setup("skip" if kind == "skip" else "wrn")
    model = model.double()
    x = x.double()
    reference_model = copy.deepcopy(model)
    name_of_layer = "conv" if kind == "skip" else "block3"
    out = cls(model, name_of_layer, fast_path=kind != "wrn-generic", **opts).compute(
        x, y, create_graph=True
    )
    target = torch.rand_like(out.maps)
    loss = (cams.normalize(out.maps, "l2") - target).pow(2).sum() + F.cross_entropy(out.logits, y)
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)

    ref_layer = dict(reference_model.named_modules())[name_of_layer]
    a, logits = _capture(reference_model, ref_layer, x)
    head = _skip_head(reference_model, x, a) if kind == "skip" else _wrn_head(reference_model, a)
    ref_maps = _reference(name, "mean", head, a, y, create_graph=True)
    ref_loss = (cams.normalize(ref_maps, "l2") - target).pow(2).sum() + F.cross_entropy(logits, y)
    ref_grads = torch.autograd.grad(ref_loss, list(reference_model.parameters()), allow_unused=True)
    torch.testing.assert_close(out.maps, ref_maps, rtol=1e-7, atol=1e-9)
    for (pname, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        assert (g is None) == (r is None), pname
        if g is not None:
            torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-9, msg=pname)


def test_train_mode_maps_do_not_depend_on_the_rest_of_the_batch() -> None:
    """With the statistics held, sample 0's map is a function of A_0 and the statistics: the
    other samples' targets do not change it (under the old summed-utility definition they did)."""
    model, _, x, y = _setup("wrn")
    cam = cams.GradCAM(model, "block3")
    other = y.clone()
    other[1:] = (other[1:] + 3) % 10
    torch.testing.assert_close(cam(x, y)[0], cam(x, other)[0], rtol=1e-6, atol=1e-7)


class DropoutHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


def test_generic_rerun_replays_the_forward_dropout_masks() -> None:
    """A train-mode dropout after the target disables the fast path; the rerun that holds the
    statistics sees the forward's dropout masks (same function), and leaves the caller's RNG
    stream where the forward left it."""
    torch.manual_seed(0)
    model = DropoutHead().train()
    x = torch.randn(4, 3, 5, 5)
    masks = []
    model.drop.register_forward_hook(lambda m, i, o: masks.append(o != 0))
    cam = cams.GradCAM(model, "conv", relu=False)
    state = torch.get_rng_state()
    fwd = cam._forward(x, body_graph=False, create_graph=False)
    logits, _ = cam._held_stats_rerun(x, fwd, create_graph=False)
    after_cam = torch.rand(3)
    torch.testing.assert_close(logits, fwd.logits)
    assert torch.equal(masks[0], masks[1])
    torch.set_rng_state(state)
    model(x)
    assert torch.equal(torch.rand(3), after_cam)
    maps = cams.GradCAM(model, "conv")(x, torch.tensor([0, 1, 2, 0]))
    assert torch.isfinite(maps).all()


def _eval_copy_with_batch_statistics(model: nn.Module, x: Tensor) -> nn.Module:
    """An eval-mode copy whose every BatchNorm uses this batch's statistics as its running
    statistics: the train-mode function of the batch, evaluated one sample at a time."""
    other = copy.deepcopy(model).train()
    seen = {}

    def record(m: nn.Module, inp: tuple) -> None:
        seen[m] = _stats(inp[0])

    hooks = [
        m.register_forward_pre_hook(record)
        for m in other.modules()
        if isinstance(m, nn.BatchNorm2d)
    ]
    with torch.no_grad():
        other(x)
    for h in hooks:
        h.remove()
    for m, (mean, var) in seen.items():
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
    return other.eval()


@pytest.mark.parametrize("cls", list(cams.METHODS.values()), ids=list(cams.METHODS))
def test_every_registered_method_is_per_sample_in_train_mode(cls: type) -> None:
    """Generic form of the property for every method in the registry: the train-mode map equals
    that of an eval-mode copy with every BatchNorm at the batch's statistics."""
    model, _, x, y = _setup("wrn")
    reference = _eval_copy_with_batch_statistics(model, x)
    maps = cls(model, "block3", **cls.quick_options)(x, y)
    expected = cls(reference, "block3", **cls.quick_options)(x, y)
    assert _rel(maps, expected) <= 1e-5
