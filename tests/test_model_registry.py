"""The architecture registry: exact parameter counts against closed forms of the published
definitions (RepDistiller's CIFAR models) and against the published rounded figures, 32x32
forward shapes, the CAM/feature-layer contract (4-D maps of the documented sizes, a
``GAP -> Linear`` head after ``cam_layer``), configs, run names and the teacher lookup."""

from __future__ import annotations

import math
import re
from pathlib import Path

import hydra
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from cams._head import detect_head
from distill.models import build_model, canonical_name, model_name, model_names
from distill.teacher.loading import TeacherError, other_teacher_runs, resolve_teacher_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- closed-form parameter counts
# Counted from the architecture definitions (see each distill.models module docstring), not from
# the code: conv k*k*in*out (/groups) (+out for a bias), BN 2*c (weight, bias), Linear in*out+out.


def _conv(cin: int, cout: int, k: int, groups: int = 1, bias: bool = False) -> int:
    return k * k * cin * cout // groups + (cout if bias else 0)


def _bn(c: int) -> int:
    return 2 * c


def resnet_params(depth: int, widths: tuple[int, int, int, int], classes: int) -> int:
    n = (depth - 2) // 6
    total = _conv(3, widths[0], 3) + _bn(widths[0])
    cin = widths[0]
    for cout in widths[1:]:
        for i in range(n):
            c = cin if i == 0 else cout
            total += _conv(c, cout, 3) + _bn(cout) + _conv(cout, cout, 3) + _bn(cout)
            if c != cout:  # projection shortcut (stride 2 and/or more channels)
                total += _conv(c, cout, 1) + _bn(cout)
        cin = cout
    return total + widths[3] * classes + classes


def vgg_params(stages: list[list[int]], classes: int) -> int:
    total, cin = 0, 3
    for stage in stages:
        for c in stage:
            total += _conv(cin, c, 3, bias=True) + _bn(c)
            cin = c
    return total + 512 * classes + classes


def mobilenetv2_params(classes: int, width: float = 0.5, t: int = 6) -> int:
    settings = [
        (1, 16, 1),
        (t, 24, 2),
        (t, 32, 3),
        (t, 64, 4),
        (t, 96, 3),
        (t, 160, 3),
        (t, 320, 1),
    ]
    cin = int(32 * width)
    total = _conv(3, cin, 3) + _bn(cin)
    for e, c, n in settings:
        cout = int(c * width)
        for _ in range(n):
            mid = cin * e
            total += _conv(cin, mid, 1) + _bn(mid) + _conv(mid, mid, 3, groups=mid) + _bn(mid)
            total += _conv(mid, cout, 1) + _bn(cout)
            cin = cout
    return total + _conv(cin, 1280, 1) + _bn(1280) + 1280 * classes + classes


def shufflenetv2_params(classes: int) -> int:
    total, cin = _conv(3, 24, 1) + _bn(24), 24
    for cout, n in ((116, 3), (232, 7), (464, 3)):
        mid = cout // 2
        left = _conv(cin, cin, 3, groups=cin) + _bn(cin) + _conv(cin, mid, 1) + _bn(mid)
        right = _conv(cin, mid, 1) + _bn(mid) + _conv(mid, mid, 3, groups=mid) + _bn(mid)
        right += _conv(mid, mid, 1) + _bn(mid)
        basic = 2 * (_conv(mid, mid, 1) + _bn(mid)) + _conv(mid, mid, 3, groups=mid) + _bn(mid)
        total += left + right + n * basic
        cin = cout
    return total + _conv(464, 1024, 1) + _bn(1024) + 1024 * classes + classes


def wrn_params(depth: int, k: int, classes: int) -> int:
    from tests.test_models import expected_params

    return expected_params(depth, k, classes)


N, W = (16, 16, 32, 64), (32, 64, 128, 256)
VGG = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
}
EXPECTED = {
    **{f"resnet{d}": (lambda c, d=d: resnet_params(d, N, c)) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": lambda c: resnet_params(8, W, c),
    "resnet32x4": lambda c: resnet_params(32, W, c),
    **{name: (lambda c, s=s: vgg_params(s, c)) for name, s in VGG.items()},
    "mobilenetv2": mobilenetv2_params,
    "shufflenetv2": shufflenetv2_params,
    **{
        f"wrn{d}_{k}": (lambda c, d=d, k=k: wrn_params(d, k, c))
        for d, k in ((16, 1), (16, 2), (40, 1), (40, 2))
    },
}

# The implementation's exact counts (10 classes, 100 classes).
EXACT = {
    "resnet8": (78_042, 83_892),
    "resnet14": (175_258, 181_108),
    "resnet20": (272_474, 278_324),
    "resnet32": (466_906, 472_756),
    "resnet44": (661_338, 667_188),
    "resnet56": (855_770, 861_620),
    "resnet110": (1_730_714, 1_736_564),
    "resnet8x4": (1_210_410, 1_233_540),
    "resnet32x4": (7_410_730, 7_433_860),
    "vgg8": (3_918_858, 3_965_028),
    "vgg11": (9_231_114, 9_277_284),
    "vgg13": (9_416_010, 9_462_180),
    "mobilenetv2": (697_546, 812_836),
    "shufflenetv2": (1_263_278, 1_355_528),
    "wrn16_1": (175_066, 180_916),
    "wrn16_2": (691_674, 703_284),
    "wrn40_1": (563_930, 569_780),
    "wrn40_2": (2_243_546, 2_255_156),
}

# Published sizes at 100 classes (millions) of the CIFAR-100 benchmark of RepDistiller / mdistiller
# (the figures quoted in issue 22; the tables of the KD papers built on RepDistiller's models).
# Two are truncated rather than rounded (resnet110: 1.7366M, vgg8: 3.9650M), hence "round or floor".
PUBLISHED_M = {
    "resnet20": 0.28, "resnet56": 0.86, "resnet110": 1.73, "resnet8x4": 1.23, "resnet32x4": 7.43,
    "wrn16_2": 0.70, "wrn40_2": 2.26, "vgg8": 3.96, "vgg13": 9.46, "mobilenetv2": 0.81,
    "shufflenetv2": 1.36,
}  # fmt: skip

# Map sizes at 32x32 input: cam_layer and each feature layer.
SIZES = {
    "resnet": (8, (32, 16, 8)),
    "wrn": (8, (32, 16, 8)),
    "vgg": (4, (16, 8, 4, 4)),
    "mobilenetv2": (2, (16, 8, 4, 2)),
    "shufflenetv2": (4, (16, 8, 4)),
}


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def family(name: str) -> str:
    return next(f for f in SIZES if name.startswith(f))


def test_every_registered_model_is_counted() -> None:
    assert set(model_names()) == set(EXACT) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXACT))
def test_parameter_counts(name: str) -> None:
    for classes, exact in zip((10, 100), EXACT[name], strict=True):
        count = n_params(build_model(name, num_classes=classes))
        assert count == exact == EXPECTED[name](classes), (name, classes)
    if name in PUBLISHED_M:
        c = EXACT[name][1] / 1e6
        assert PUBLISHED_M[name] in (round(c, 2), math.floor(c * 100) / 100), (name, c)


def _run_hooked(net: nn.Module, layers: tuple[str, ...]) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Logits of a (2, 3, 32, 32) batch, the outputs of ``layers`` and the global pool's input."""
    maps: dict[str, torch.Tensor] = {}
    hooks = [
        net.get_submodule(n).register_forward_hook(
            lambda _m, _i, out, n=n: maps.__setitem__(n, out)
        )
        for n in layers
    ]
    hooks.append(net.pool.register_forward_hook(lambda _m, i, _o: maps.__setitem__("_pool", i[0])))
    with torch.no_grad():
        logits = net(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    return logits, maps, maps.pop("_pool")


@pytest.mark.parametrize("name", sorted(EXACT))
def test_forward_cam_and_feature_layers(name: str) -> None:
    cam_size, feature_sizes = SIZES[family(name)]
    for classes in (10, 100):
        net = build_model(name, num_classes=classes).eval()
        layers = (net.cam_layer, *net.feature_layers)
        logits, maps, pool_in = _run_hooked(net, layers)
        assert logits.shape == (2, classes)
        assert all(maps[n].dim() == 4 and maps[n].shape[0] == 2 for n in layers)
        assert maps[net.cam_layer].shape[-2:] == (cam_size, cam_size)
        assert [maps[n].shape[-1] for n in net.feature_layers] == list(feature_sizes)
        # the head after cam_layer: (WRN: BN-ReLU) -> global average pool -> Linear
        a = maps[net.cam_layer]
        f = net.relu(net.bn(a)) if name.startswith("wrn") else a
        torch.testing.assert_close(pool_in, f)
        torch.testing.assert_close(logits, net.fc(f.mean(dim=(2, 3))))
        assert isinstance(net.fc, nn.Linear) and net.fc.out_features == classes


@pytest.mark.parametrize("name", ["resnet8", "vgg8", "mobilenetv2", "shufflenetv2", "wrn16_1"])
def test_cams_fast_path_detects_the_head(name: str) -> None:
    """The CAM library finds ``f -> GAP -> Linear`` after ``cam_layer`` (fx trace succeeds)."""
    net = build_model(name).eval()
    head = detect_head(net, net.cam_layer)
    assert head is not None and head.linear is net.fc


def test_names_and_arch_round_trip() -> None:
    for name in model_names():
        net = build_model(name)
        assert canonical_name(net.arch) == name, (name, net.arch)
    assert build_model("wrn28_4").arch == "wrn-28-4" and canonical_name("wrn-28-4") == "wrn28_4"
    assert canonical_name("resnet57") is None


def test_unknown_name_lists_the_registered_ones() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet57'") as err:
        build_model("resnet57")
    assert all(n in str(err.value) for n in model_names())
    assert "wrn<depth>_<width>" in str(err.value)


def test_channel_shuffle_interleaves_groups() -> None:
    from distill.models.shufflenetv2 import channel_shuffle

    x = torch.arange(6.0).view(1, 6, 1, 1)
    assert channel_shuffle(x).flatten().tolist() == [0, 3, 1, 4, 2, 5]


# ---------------------------------------------------------------- configs and run names


def _compose(*overrides: str):
    import distill.train as train  # registers the resolvers

    with initialize_config_dir(config_dir=train.CONFIG_DIR, version_base=None):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(EXACT))
def test_model_config_builds_the_named_model(name: str) -> None:
    path = ROOT / "configs" / "model" / f"{name}.yaml"
    cfg = OmegaConf.load(path)
    if name not in ("wrn16_2", "wrn40_2"):  # their num_classes line belongs to the data helper
        assert "\nnum_classes: ${data.num_classes}\n" in path.read_text()
    cfg.num_classes = 100
    net = hydra.utils.instantiate(cfg)
    assert model_name(cfg) == name and n_params(net) == EXACT[name][1]


@pytest.mark.slow
def test_teacher_run_names_start_with_the_registry_name() -> None:
    base = _compose().teacher.run_name
    assert re.fullmatch(r"wrn40_2-torchvision-subNone-e200-s0-d[0-9a-f]{8}", base)
    for teacher in ("resnet56", "resnet110", "resnet32x4", "vgg13", "wrn40_2"):
        cfg = _compose(f"teacher={teacher}")
        assert cfg.teacher.run_name == base.replace("wrn40_2", teacher)
        assert cfg.teacher.train_command.endswith(
            "model=wrn40_2 model.depth=40 model.widen_factor=2"
            if teacher == "wrn40_2"
            else f"model={teacher}"
        )
    assert _compose("teacher.model.depth=10").teacher.run_name.startswith("wrn10_2-")
    assert _compose("model@teacher.model=vgg8").teacher.run_name.startswith("vgg8-")
    # the teacher experiment stores its run under the name the student's teacher config looks for
    run = _compose("experiment=teacher", "model=resnet56").run_name
    assert run == _compose("teacher=resnet56").teacher.run_name


def _finished_run(root: Path, name: str) -> Path:
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "metrics.json").write_text("{}")
    return run


def test_lookup_lists_other_families_with_their_override(tmp_path: Path) -> None:
    tail = "torchvision-subNone-e200-s0-d0123abcd"
    wanted = tmp_path / f"wrn40_2-{tail}"
    resnet = _finished_run(tmp_path, f"resnet56-{tail}")
    wide = _finished_run(tmp_path, "resnet32x4-torchvision-subNone-e1-s0-d0123abcd")
    wrn = _finished_run(tmp_path, f"wrn16_2-{tail}")
    odd = _finished_run(tmp_path, f"wrn28_4-{tail}")
    _finished_run(tmp_path, f"resnet57-{tail}")  # not a registered model: ignored
    _finished_run(tmp_path, "vgg13-torchvision-subNone-e200-s0-d99999999")  # other data
    assert other_teacher_runs(wanted) == {
        resnet: ["model@teacher.model=resnet56"],
        wide: ["model@teacher.model=resnet32x4", "teacher.epochs=1"],
        wrn: ["teacher.model.depth=16"],
        odd: ["teacher.model.depth=28", "teacher.model.widen_factor=4"],
    }
    # and from a non-WRN teacher back to a WRN one without its own config
    assert other_teacher_runs(resnet)[odd] == [
        "model@teacher.model=wrn40_2",
        "teacher.model.depth=28",
        "teacher.model.widen_factor=4",
    ]
    assert other_teacher_runs(resnet)[wrn] == ["model@teacher.model=wrn16_2"]
    with pytest.raises(TeacherError, match=r"model@teacher\.model=resnet56"):
        resolve_teacher_checkpoint(None, str(wanted), "python train.py experiment=teacher")
    assert resolve_teacher_checkpoint(None, str(resnet), "cmd").endswith("last.ckpt")


def test_teacher_command_trains_the_selected_model(monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.train as train

    monkeypatch.setattr(train.HydraConfig, "initialized", staticmethod(lambda: True))
    for pick in ("teacher=resnet56", "model@teacher.model=resnet56"):
        command = train.teacher_command(
            [pick, "data.source=synthetic", "teacher.epochs=2", "loss=ce_kd"]
        )
        assert command == (
            "python train.py experiment=teacher model=resnet56 data.source=synthetic "
            "trainer.max_epochs=2"
        )


@pytest.mark.parametrize("name", ["resnet8", "vgg8", "shufflenetv2"])
def test_explain_builds_a_bare_checkpoint_from_its_arch(tmp_path: Path, name: str) -> None:
    from distill.explain import ExplainError, load_network

    net = build_model(name, num_classes=7)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": state, "arch": net.arch}, path)
    loaded = load_network(path).net
    assert type(loaded) is type(net) and loaded.fc.out_features == 7
    torch.testing.assert_close(loaded.state_dict(), net.state_dict())
    torch.save({"state_dict": state, "arch": "resnet57"}, path)
    with pytest.raises(ExplainError, match="resnet57.*known: .*resnet56"):
        load_network(path)
