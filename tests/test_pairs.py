"""CIFAR-100 teacher -> student pairs (issue 22): the recipe group, the c100 experiment configs,
the teacher lookup of a recipe-trained teacher, the harness profile with ``pairs`` and its
FLOPs-scaled cost estimate, and one training step of a homogeneous and a heterogeneous pair.

References: the RepDistiller/mdistiller recipe as published (/work/shared/REFERENCES.md), CAM-map
sides per family written out by hand (docs/CONTRACTS.md), ResNet-20's forward FLOPs counted by
hand (conv and linear multiply-adds x 2), and cost rows recomputed from a hand-written
step-times record.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
import torch

from tests.conftest import compose_cfg, student

# pair -> (teacher, student, CAM-map side of the teacher, of the student, student lr)
PAIRS = {
    "resnet56-resnet20": ("resnet56", "resnet20", 8, 8, 0.05),
    "resnet110-resnet32": ("resnet110", "resnet32", 8, 8, 0.05),
    "resnet32x4-resnet8x4": ("resnet32x4", "resnet8x4", 8, 8, 0.05),
    "wrn40_2-wrn16_2": ("wrn40_2", "wrn16_2", 8, 8, 0.05),
    "wrn40_2-wrn40_1": ("wrn40_2", "wrn40_1", 8, 8, 0.05),
    "vgg13-vgg8": ("vgg13", "vgg8", 4, 4, 0.05),
    "vgg13-mobilenetv2": ("vgg13", "mobilenetv2", 4, 2, 0.01),
    "resnet32x4-shufflenetv2": ("resnet32x4", "shufflenetv2", 8, 4, 0.01),
}


def _cam_side(net: torch.nn.Module) -> int:
    """The side of the map at the network's declared ``cam_layer`` for one 32x32 image."""
    found: list[torch.Size] = []
    layer = dict(net.named_modules())[net.cam_layer]
    handle = layer.register_forward_hook(lambda _m, _i, out: found.append(out.shape))
    with torch.no_grad():
        net.eval()(torch.zeros(1, 3, 32, 32))
    handle.remove()
    assert found[0][-1] == found[0][-2]
    return int(found[0][-1])


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_every_pair_composes_with_the_recipe_and_aligns_its_cam_maps(pair: str) -> None:
    import hydra

    from distill.losses import aligned_size
    from distill.models import model_name

    teacher, name, t_side, s_side, lr = PAIRS[pair]
    cfg = compose_cfg(f"experiment=c100/{pair}", "loss=gradcam", "data=synthetic100")
    assert (model_name(cfg.model), model_name(cfg.teacher.model)) == (name, teacher)
    # the published recipe: 240 epochs, batch 64, SGD 0.05 (0.01 light students), x0.1 at 150...
    opt, sched = cfg.module.optimizer, cfg.module.scheduler
    assert (cfg.trainer.max_epochs, cfg.data.batch_size, cfg.teacher.epochs) == (240, 64, 240)
    assert (opt.lr, opt.momentum, opt.weight_decay) == (lr, 0.9, 5e-4)
    assert (list(sched.milestones), sched.gamma) == ([150, 180, 210], 0.1)
    assert cfg.data.num_classes == 100 and cfg.module.num_classes == 100
    s_net, t_net = hydra.utils.instantiate(cfg.model), hydra.utils.instantiate(cfg.teacher.model)
    assert s_net(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    assert t_net.eval()(torch.zeros(1, 3, 32, 32)).shape == (1, 100)
    assert (_cam_side(t_net), _cam_side(s_net)) == (t_side, s_side)
    side = min(t_side, s_side)  # docs/losses.md: the smaller of two square maps
    assert aligned_size((s_side, s_side), (t_side, t_side)) == (side, side)


def test_the_heterogeneous_maps_refuse_a_map_size_that_does_not_fit() -> None:
    from distill.losses import LossConfigError, aligned_size

    # VGG13 4x4 vs MobileNetV2 2x2: loss.map_size=4 is larger than the student's maps
    with pytest.raises(LossConfigError, match="larger than the student's 2x2"):
        aligned_size((2, 2), (4, 4), map_size=4)
    assert aligned_size((4, 4), (8, 8), map_size=2) == (2, 2)


def _overrides(command: str) -> list[str]:
    words = shlex.split(command.replace("=None", "=null"))
    assert words[:3] == ["python", "train.py", "experiment=teacher"]
    return words[2:]


@pytest.mark.parametrize("pair", ["vgg13-mobilenetv2", "wrn40_2-wrn40_1"])
def test_the_printed_teacher_command_trains_the_teacher_the_student_looks_for(pair: str) -> None:
    """The student's ``teacher.train_command`` composes to a teacher run named as its
    ``teacher.run_name`` and trained with the recipe (lr 0.05 even for a 0.01 student)."""
    cfg = compose_cfg(f"experiment=c100/{pair}", "loss=ce_kd")
    assert " recipe=cifar100 " in cfg.teacher.train_command
    run = compose_cfg(*_overrides(cfg.teacher.train_command))
    assert run.run_name == cfg.teacher.run_name
    assert run.run_name.startswith(f"{PAIRS[pair][0]}-torchvision-subNone-e240-s0-d")
    assert (run.module.optimizer.lr, run.data.batch_size, run.trainer.max_epochs) == (0.05, 64, 240)
    assert list(run.module.scheduler.milestones) == [150, 180, 210] and run.data.num_classes == 100
    # and the command the brief names trains the same run
    by_hand = compose_cfg(
        "experiment=teacher", "data=cifar100", "recipe=cifar100", f"model={PAIRS[pair][0]}"
    )
    assert by_hand.run_name == cfg.teacher.run_name


def test_teacher_command_from_the_command_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import distill.train as train

    monkeypatch.setattr(train.HydraConfig, "initialized", staticmethod(lambda: True))
    command = train.teacher_command(["data=cifar100", "recipe=cifar100", "teacher=vgg13"])
    assert command == "python train.py experiment=teacher data=cifar100 recipe=cifar100 model=vgg13"
    # an experiment may pick data, recipe and teacher: the config's own command, plus paths
    assert train.teacher_command(["experiment=c100/vgg13-vgg8", "loss=dkd"]) is None
    pick = ["experiment=c100/vgg13-vgg8", "paths.log_dir=/tmp/x", "loss=dkd"]
    assert (
        train.teacher_command(pick, "python train.py A") == "python train.py A paths.log_dir=/tmp/x"
    )
    # without a recipe the CIFAR-10 command is unchanged (no recipe override)
    assert " recipe=" not in compose_cfg("loss=ce_kd").teacher.train_command


# ----------------------------------------------------------------------------- harness

PROFILE = """
defaults:
  - harness_profile
  - _self_
name: pairs-test
seeds: [0]
cells: [ce, ce_kd]
devices: cpu:1
common: [data=synthetic100, data.synthetic_size=100, trainer=cpu]
teacher: [experiment=teacher, recipe=cifar100]
pairs:
  resnet56-resnet20:
    teacher: [model=resnet56]
    student: [experiment=c100/resnet56-resnet20]
  vgg13-mobilenetv2:
    teacher: [model=vgg13]
    student: [experiment=c100/vgg13-mobilenetv2]
"""


@pytest.fixture
def pairs_profile(tmp_path: Path) -> Path:
    path = tmp_path / "pairs-test.yaml"
    path.write_text(PROFILE)
    return path


def test_the_cifar100_profile_expands_into_one_protocol_per_pair() -> None:
    from distill.harness import HarnessError, Profile

    profile = Profile.load("cifar100")
    assert list(profile.pairs) == list(PAIRS) and profile.seeds == [0, 1, 2]
    assert profile.cells[-3:] == ["at", "catkd", "dkd"] and len(profile.cells) == 15
    subs = profile.expand()
    assert [p.name for p in subs] == [f"cifar100/{p}" for p in PAIRS]
    for sub, (pair, (teacher, *_)) in zip(subs, PAIRS.items(), strict=True):
        assert sub.out == (Path(__file__).parents[1] / "results" / "cifar100" / pair).resolve()
        assert sub.teacher_overrides()[-5:-3] == ["recipe=cifar100", f"model={teacher}"]
        assert f"experiment=c100/{pair}" in sub.cell_overrides("dkd", 1)
        assert sub.teacher_dir == sub.out / "runs" / "teacher"
    assert [p.pair for p in profile.expand("vgg13-vgg8")] == ["vgg13-vgg8"]
    with pytest.raises(HarnessError, match="unknown pair 'vgg13-vgg9'"):
        profile.expand("vgg13-vgg9")
    with pytest.raises(HarnessError, match="has no pairs: drop --pair"):
        Profile.load("smoke").expand("vgg13-vgg8")
    assert Profile.load("smoke").expand() == [Profile.load("smoke")]


@pytest.mark.slow
def test_each_pair_teacher_run_is_the_teacher_its_students_use() -> None:
    from distill.harness import Profile
    from distill.harness.runs import compose
    from distill.models import model_name

    for sub in Profile.load("cifar100").expand():
        teacher = compose(sub.teacher_overrides())
        cell = compose(sub.cell_overrides("ce_kd", 0))
        assert model_name(teacher["model"]) == model_name(cell["teacher"]["model"])
        assert teacher["trainer"]["max_epochs"] == cell["teacher"]["epochs"] == 240


def test_dry_run_and_status_iterate_over_the_pairs(
    pairs_profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.harness import main

    results = str(tmp_path / "results")
    assert (
        main(["run", "--profile", str(pairs_profile), "--dry-run", "--results-dir", results]) == 0
    )
    out = capsys.readouterr().out
    for pair in ("resnet56-resnet20", "vgg13-mobilenetv2"):
        assert f"== pair {pair} ({tmp_path}/results/pairs-test/{pair})" in out
        assert f"paths.log_dir={tmp_path}/results/pairs-test/{pair} task_name=runs" in out
    assert "recipe=cifar100 model=vgg13 paths.log_dir" in out
    assert out.count("ce_kd-s0 -> cpu:0") == 2
    assert not (tmp_path / "results").exists()  # a dry run writes nothing
    args = ["status", "--profile", str(pairs_profile), "--results-dir", results]
    assert main([*args, "--pair", "vgg13-mobilenetv2"]) == 0
    out = capsys.readouterr().out
    assert "== pair" not in out and out.count("seed 0: pending ['ce', 'ce_kd']") == 1
    assert main([*args, "--pair", "nope"]) == 2


def test_forward_flops_of_resnet20_match_the_hand_count() -> None:
    """ResNet-20 (widths 16/16/32/64, 1x1-conv shortcuts, 100 classes): multiply-adds of every
    conv and the linear layer, x 2 (FlopCounterMode counts no BN/ReLU/pool)."""
    from distill.harness import forward_flops

    conv = lambda cin, cout, k, side: cin * cout * k * k * side * side  # noqa: E731
    macs = conv(3, 16, 3, 32) + 6 * conv(16, 16, 3, 32)
    macs += conv(16, 32, 3, 16) + 5 * conv(32, 32, 3, 16) + conv(16, 32, 1, 16)
    macs += conv(32, 64, 3, 8) + 5 * conv(64, 64, 3, 8) + conv(32, 64, 1, 8) + 64 * 100
    assert macs == 40_818_944
    assert forward_flops("resnet20", 100) == 2 * macs


def test_cost_scales_each_pair_by_forward_flops(
    pairs_profile: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from distill.harness import forward_flops, main

    record = {
        "batch": 100,
        "step_s": {"teacher": 2.0, "ce": 0.5, "ce_kd": 0.5},
        "step_s_online": {"teacher": 2.0, "ce": 0.5, "ce_kd": 1.5},
    }
    times = tmp_path / "times.json"
    times.write_text(json.dumps(record))
    args = ["cost", "--profile", str(pairs_profile), "--step-times", str(times)]
    assert main(args) == 0
    out = capsys.readouterr().out
    f = forward_flops
    for pair, teacher, name in (
        ("resnet56-resnet20", "resnet56", "resnet20"),
        ("vgg13-mobilenetv2", "vgg13", "mobilenetv2"),
    ):
        s = f(name, 100) / f("wrn16_2")
        t = f(teacher, 100) / f("wrn40_2")
        section = out.split(f"== pair {pair}")[1].split("== pair")[0]
        assert f"| teacher | 1 | 240 | 100 | {2.0 * t:.3f} |" in section
        assert f"| ce | 1 | 240 | 100 | {0.5 * s:.3f} |" in section
        # ce_kd, one seed, first to fill the logits memo: misses mean_e (1-1/162)^e over 240
        miss = sum((1 - 1 / 162) ** e for e in range(240)) / 240
        step = miss * (0.5 * s + 1.0 * t) + (1 - miss) * 0.5 * s
        assert f"| ce_kd | 1 | 240 | 100 | {step:.3f} |" in section
        assert f"= {s:.2f} x wrn16_2's" in section and f"= {t:.2f} x wrn40_2's" in section
        assert "Estimate, not a measurement" in section
    assert "**Total over the 2 pairs of profile `pairs-test`:" in out


# ----------------------------------------------------------------------------- training step


def _checkpoint(path: Path, name: str, **kw: int) -> Path:
    from distill.models import build_model

    torch.manual_seed(0)
    net = build_model(name, num_classes=100, **kw)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"arch": net.arch}}, path)
    return path


@pytest.mark.parametrize(
    ("pair", "teacher", "extra"),
    [
        ("wrn40_2-wrn16_2", "wrn10_2", ["teacher.model.depth=10"]),  # a tiny WRN teacher
        ("vgg13-mobilenetv2", "vgg13", []),
    ],
)
def test_one_training_step_of_a_pair_with_a_cam_preset(
    tmp_path: Path, pair: str, teacher: str, extra: list[str]
) -> None:
    """Grad-CAM + KD on 100-class synthetic data: 100-wide logits, the CAM term at the pooled
    common size, finite loss, gradients on every student parameter, an SGD step moves weights."""
    import hydra

    ckpt = _checkpoint(tmp_path / "teacher.ckpt", teacher)
    cfg = compose_cfg(
        f"experiment=c100/{pair}",
        "loss=gradcam_kd",
        "data=synthetic100",
        "data.synthetic_size=100",
        "data.synthetic_test_size=8",
        "data.batch_size=8",
        "trainer=cpu",
        "callbacks.fidelity.enabled=false",
        "loss.grid_every_n_epochs=0",
        "loss.agreement_batches=1",
        f"paths.log_dir={tmp_path}",
        f"teacher.checkpoint={ckpt}",
        f"module.cache_root={tmp_path}/cache",
        f"module.memo_root={tmp_path}/memo",
        *extra,
    )
    module = student(cfg).train()
    assert module.net.fc.out_features == 100
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    batch = dm.transform_batch(next(iter(dm.train_dataloader())))
    loss, logits, terms = module.compute_loss(batch)
    assert logits.shape == (8, 100) and set(terms) == {"ce", "kd", "cam"}
    assert torch.isfinite(loss) and terms["cam"] > 0
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.net.parameters())
    before = module.net.fc.weight.detach().clone()
    torch.optim.SGD(module.net.parameters(), lr=0.1).step()
    assert not torch.equal(before, module.net.fc.weight)


def test_a_saved_config_without_an_added_key_is_the_same_run() -> None:
    """Runs saved before ``teacher.train_recipe`` (or ``data.dataset``) existed had "" (cifar10)."""
    from distill.harness.runs import differing_keys

    old = {"teacher": {"epochs": 20}, "data": {"source": "folder"}}
    new = {"teacher": {"epochs": 20, "train_recipe": ""}, "data": {"source": "folder"}}
    assert differing_keys(new, old) == [] and differing_keys(old, new) == []
    new["data"]["dataset"] = "cifar100"
    new["teacher"]["train_recipe"] = " recipe=cifar100"
    assert differing_keys(new, old) == ["data.dataset", "teacher.train_recipe"]


def test_a_dry_run_of_a_gpu_profile_without_gpus_assumes_one(
    pairs_profile: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distill.harness import HarnessError, Local, Profile, devices

    monkeypatch.setattr(devices, "visible_gpus", lambda: 0)
    gpu = pairs_profile.read_text().replace("trainer=cpu", "trainer=gpu")
    pairs_profile.write_text(gpu.replace("devices: cpu:1\n", ""))
    (sub, _) = Profile.load(str(pairs_profile)).expand()
    pending = {0: ["ce"]}
    place = Local.parse("auto").prepare(sub, pending, dry_run=True)
    assert [d.label for d in place.devices] == ["gpu:0"] and place.assumed
    assert "this machine shows no GPU: the plan assumes one" in place.describe(True)
    with pytest.raises(HarnessError, match="trains on GPU .* workers are CPUs"):
        Local.parse("auto").prepare(sub, pending)  # a real run still refuses


@pytest.mark.slow
def test_a_pair_student_without_its_teacher_prints_the_recipe_command(tmp_path: Path) -> None:
    """End to end: the message of ``train.py experiment=c100/...`` without a teacher names a
    command that composes to the teacher run the student looks for."""
    from tests.conftest import run_python

    data = ["data=synthetic100", "data.synthetic_size=100", "trainer=cpu"]
    args = ["train.py", "experiment=c100/vgg13-vgg8", "loss=ce_kd", *data]
    done = run_python([*args, f"paths.log_dir={tmp_path}", "logger=none", "callbacks=none"])
    assert done.returncode == 2 and "no trained teacher found" in done.stderr, done.stderr[-2000:]
    line = next(x for x in done.stderr.splitlines() if "python train.py experiment=teacher" in x)
    words = _overrides(line.strip())
    assert "recipe=cifar100" in words and "model=vgg13" in words
    assert f"paths.log_dir={tmp_path}" in words and "data.source=synthetic" in words
    wanted = compose_cfg(*args[1:], f"paths.log_dir={tmp_path}").teacher.run_name
    assert compose_cfg(*words).run_name == wanted
