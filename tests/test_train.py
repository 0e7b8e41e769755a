"""Configs, the classifier module, and end-to-end runs of ``train.py`` (run, resume, bad input)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException

from distill.models import WideResNet, wrn16_2, wrn40_2
from distill.modules.classifier import (
    CheckpointMismatchError,
    ClassifierModule,
    NonFiniteLossError,
    check_checkpoint_compatible,
)
from distill.train import build_module, train
from tests.conftest import compose_cfg, run_python

# ----------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    "overrides",
    [
        ["model=wrn40_2", "data=cifar10_folder", "trainer=gpu", "logger=wandb"],
        ["data=synthetic", "trainer=cpu", "logger=tensorboard", "callbacks=rich"],
        ["trainer=ddp", "logger=many", "callbacks=none"],
        ["logger=none", "loss=ce", "experiment=smoke"],
    ],
)
def test_config_options_compose(overrides: list[str]) -> None:
    cfg = compose_cfg(*overrides)
    assert cfg.module._target_ == "distill.modules.classifier.ClassifierModule"
    assert cfg.trainer._target_ == "pytorch_lightning.Trainer"
    assert cfg.paths.output_dir.endswith(f"/{cfg.task_name}/{cfg.run_name}")


def test_defaults_follow_the_recipe() -> None:
    cfg = compose_cfg()
    assert (cfg.model.depth, cfg.model.widen_factor) == (16, 2)
    assert cfg.data.source == "torchvision" and cfg.data.download is True
    assert cfg.data.batch_size == 128 and cfg.trainer.max_epochs == 200
    opt, sched = cfg.module.optimizer, cfg.module.scheduler
    assert (opt.lr, opt.momentum, opt.weight_decay, opt.nesterov) == (0.1, 0.9, 5e-4, False)
    assert list(sched.milestones) == [60, 120, 160] and sched.gamma == 0.2
    assert cfg.ckpt_path == "auto" and cfg.logger.csv is not None
    folder = compose_cfg("data=cifar10_folder").data.root
    assert folder.endswith("/../shared/data/cifar10-jpeg")


def test_teacher_experiment() -> None:
    cfg = compose_cfg("experiment=teacher")
    assert cfg.task_name == "teacher" and cfg.model.depth == 40 and cfg.loss.name == "ce"
    # deterministic (rerun = resume); d<8 hex> = data identity (source, root, subset, split)
    assert re.fullmatch(r"wrn40_2-torchvision-subNone-e200-s0-d[0-9a-f]{8}", cfg.run_name)


def test_unknown_option_lists_choices() -> None:
    with pytest.raises(MissingConfigException, match="wrn16_2"):
        compose_cfg("model=resnet_nope")
    with pytest.raises((MissingConfigException, ConfigCompositionException)):
        compose_cfg("logger=nope")


def test_module_instantiated_from_config_matches_defaults() -> None:
    cfg = compose_cfg("data=synthetic")
    module = build_module(cfg, wrn16_2())
    conf = module.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    plain = ClassifierModule(wrn16_2()).configure_optimizers()
    for o in (opt, plain["optimizer"]):
        group = o.param_groups[0]
        assert isinstance(o, torch.optim.SGD)
        assert (group["lr"], group["momentum"], group["weight_decay"]) == (0.1, 0.9, 5e-4)
    for s in (sched, plain["lr_scheduler"]["scheduler"]):
        assert dict(s.milestones) == {60: 1, 120: 1, 160: 1} and s.gamma == 0.2


def test_train_api_raises_user_errors_unwrapped(tmp_path: Path) -> None:
    from distill.data import DataError

    cfg = compose_cfg("data.source=imagenet", f"paths.log_dir={tmp_path}", "print_config=false")
    with pytest.raises(DataError, match="data.source must be one of"):
        train(cfg)


# ----------------------------------------------------------------------------- module


class _NaNKD(ClassifierModule):
    def compute_loss(self, batch):  # type: ignore[no-untyped-def]
        loss, logits, terms = super().compute_loss(batch)
        kd = loss * float("nan")
        return loss + kd, logits, {**terms, "kd": kd}


def _batch(n: int = 4) -> dict:
    return {
        "image": torch.randn(n, 3, 32, 32),
        "label": torch.arange(n) % 10,
        "index": torch.arange(n),
    }


def test_non_finite_loss_names_step_and_term() -> None:
    module = _NaNKD(WideResNet(10, 1))
    with pytest.raises(NonFiniteLossError, match=r"global step 0.*kd=nan"):
        module.training_step(_batch(), 0)


def test_ce_loss_and_terms() -> None:
    module = ClassifierModule(WideResNet(10, 1))
    batch = _batch()
    loss, logits, terms = module.compute_loss(batch)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, batch["label"]))
    assert set(terms) == {"ce"} and logits.shape == (4, 10)


def test_channels_last_switch_keeps_outputs() -> None:
    torch.manual_seed(0)
    plain = ClassifierModule(WideResNet(10, 1)).eval()
    fast = ClassifierModule(WideResNet(10, 1), channels_last=True).eval()
    fast.load_state_dict(plain.state_dict())
    fast.setup("fit")
    assert fast.net.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fast(x), plain(x), rtol=1e-4, atol=1e-4)


def test_checkpoint_of_other_architecture_rejected(tmp_path: Path) -> None:
    teacher = ClassifierModule(wrn40_2())
    path = tmp_path / "teacher.ckpt"
    torch.save({"state_dict": teacher.state_dict(), "arch": teacher.arch}, path)
    check_checkpoint_compatible(path, ClassifierModule(wrn40_2()))
    with pytest.raises(CheckpointMismatchError, match="teacher.ckpt.*wrn-40-2.*wrn-16-2"):
        check_checkpoint_compatible(path, ClassifierModule(wrn16_2()))


# ----------------------------------------------------------------------------- end to end

SMOKE = [
    "train.py",
    "experiment=smoke",
    "data.synthetic_size=96",
    "data.synthetic_test_size=40",
    "data.val_size=16",
    "data.batch_size=32",
    "model.depth=10",
    "model.widen_factor=1",
    "trainer.enable_progress_bar=false",
    "print_config=false",
]


@pytest.mark.slow
def test_train_run_resume_and_architecture_mismatch(tmp_path: Path) -> None:
    args = [*SMOKE, f"paths.log_dir={tmp_path}", "run_name=r1"]
    first = run_python([*args, "trainer.max_epochs=1"])
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "smoke" / "r1"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 1 and metrics["global_step"] == 3
    assert 0 <= metrics["test_error"] <= 100 and metrics["val_error"] is not None
    assert metrics["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert list((run_dir / "csv").glob("version_*/metrics.csv"))
    summary = [ln for ln in first.stdout.splitlines() if ln.startswith("test error: ")]
    assert summary == [
        f"test error: {metrics['test_error']:.2f}% | checkpoint: {metrics['checkpoint']}"
    ]

    resumed = run_python([*args, "trainer.max_epochs=2"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["global_step"] == 6

    other = run_python([*args, "model.depth=16", "trainer.max_epochs=3"])
    assert other.returncode == 2
    assert "differs in: model.depth" in other.stderr  # a changed config is refused first
    forced = run_python(
        [*args, "model.depth=16", "trainer.max_epochs=3", "allow_changed_config=true"]
    )
    assert forced.returncode == 2
    assert "wrn-10-1" in forced.stderr and "wrn-16-1" in forced.stderr
    assert "Traceback" not in other.stderr + other.stdout + forced.stderr + forced.stdout


@pytest.mark.slow
def test_missing_data_is_one_clear_message(tmp_path: Path) -> None:
    res = run_python(
        [
            "train.py",
            "data.source=folder",
            f"data.root={tmp_path / 'nope'}",
            f"paths.log_dir={tmp_path}",
        ]
    )
    assert res.returncode == 2
    assert "data.download=true" in res.stderr and "data.source=synthetic" in res.stderr
    assert "Traceback" not in res.stderr + res.stdout


@pytest.mark.slow
def test_synthetic_is_learnable_via_train_api(tmp_path: Path) -> None:
    """train(cfg) from Python (the harness path), offline wandb, low error on synthetic data."""
    cfg = compose_cfg(
        "data=synthetic", "trainer=cpu", "callbacks=none",
        "logger=wandb", "logger.wandb.offline=true",
        "model.depth=10", "model.widen_factor=1", "data.synthetic_size=320",
        "data.synthetic_test_size=200", "data.batch_size=64", "trainer.max_epochs=4",
        "trainer.enable_progress_bar=false", "print_config=false", "module.optimizer.lr=0.05",
        f"paths.log_dir={tmp_path}", "run_name=learn",
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["test_error"] < 25.0, metrics
    assert Path(metrics["checkpoint"]).is_file()
    assert json.loads((tmp_path / "train" / "learn" / "metrics.json").read_text()) == metrics
    assert list((tmp_path / "train" / "learn" / "wandb").glob("offline-run-*"))
    wandb = pytest.importorskip("wandb")
    assert wandb.run is None  # finished after the run


def test_eval_mode_module_still_warned_after_lightning_warning_is_silenced() -> None:
    """distill.train silences Lightning's eval-mode warning (the frozen teacher); a module of
    the trained network left in eval mode is still named in a warning of ours."""
    import warnings

    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    from distill.train import _quiet_warnings

    module = ClassifierModule(WideResNet(10, 1))
    module.net.fc.eval()
    data = [{"image": torch.randn(3, 32, 32), "label": i % 10} for i in range(8)]
    trainer = pl.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _quiet_warnings()
        trainer.fit(module, DataLoader(data, batch_size=4))
    texts = [str(w.message) for w in caught]
    assert not [t for t in texts if "at the start of training" in t]  # Lightning's: silenced
    assert [t for t in texts if "are in eval mode when training starts (net.fc)" in t], texts
