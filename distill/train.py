"""Training entry point (Hydra): ``python train.py [overrides]``; ``train(cfg)`` from Python.

One run = one directory ``<paths.log_dir>/<task_name>/<run_name>`` holding the composed config
(``.hydra/``, ``config_resolved.yaml``), logs, ``checkpoints/last.ckpt`` and ``metrics.json`` with
the test error of the *final* weights. ``ckpt_path=auto`` resumes ``checkpoints/last.ckpt`` when the
run directory already has one (same ``run_name``).

Start-up order: validate option domains, resolve (and verify) the teacher checkpoint, compare the
config with the one saved in the run directory (refuse a changed config), load the data, verify
the resume checkpoint, build, fit. Every checkpoint is written atomically with a SHA-256 sidecar
(:mod:`distill.checkpointing`); SIGINT/SIGTERM save a resume point and exit 130/143.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from distill.checkpointing import (
    ChecksummedCheckpointIO,
    ResumeCheckpoint,
    RunInterrupted,
    find_resume_checkpoint,
    verify_checkpoint,
)
from distill.config_checks import ConfigError, check_saved_config, data_key, validate_options
from distill.data.sources import DataError
from distill.fidelity import fidelity_metrics
from distill.integrity import IntegrityError, atomic_write
from distill.losses import LossConfigError
from distill.modules.classifier import (
    CheckpointMismatchError,
    NonFiniteLossError,
    check_checkpoint_compatible,
)
from distill.precision import default_precision, precision_summary, use_channels_last
from distill.teacher import (
    CacheError,
    TeacherError,
    check_teacher_data,
    resolve_teacher_checkpoint,
    teacher_digest,
)

__all__ = ["CONFIG_DIR", "USER_ERRORS", "main", "repo_root", "train"]

USER_ERRORS: tuple[type[Exception], ...] = (
    DataError,
    CheckpointMismatchError,
    NonFiniteLossError,
    TeacherError,
    CacheError,
    LossConfigError,
    ConfigError,
    IntegrityError,
)


def repo_root() -> str:
    """The repository holding ``configs/`` (editable install), else the current directory."""
    root = Path(__file__).resolve().parents[1]
    return str(root if (root / "configs").is_dir() else Path.cwd())


def run_record_subdir(output_dir: str) -> str:
    """``hydra.output_subdir``: ``.hydra`` for a new run; for a rerun of an existing run
    ``.hydra/rerun-<time>-<pid>``, so Hydra never overwrites the original record."""
    if not (Path(output_dir) / ".hydra" / "config.yaml").exists():
        return ".hydra"
    return f".hydra/rerun-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


OmegaConf.register_new_resolver("repo_root", repo_root, replace=True)
OmegaConf.register_new_resolver("data_key", data_key, replace=True)
OmegaConf.register_new_resolver("run_record_subdir", run_record_subdir, replace=True)
OmegaConf.register_new_resolver("default_precision", default_precision, replace=True)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

_QUIET = (
    ".*does not have many workers.*",
    ".*GPU available but not used.*",
    ".*Checkpoint directory .* exists and is not empty.*",
    ".*The number of training batches.*",
    ".*across ranks is zero.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
)


def _quiet_warnings() -> None:
    """Silence Lightning warnings that are expected with tensor-resident data."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", pattern)


# ----------------------------------------------------------------------------- building blocks


def instantiate(config: Any, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate`` that re-raises user errors (bad data, ...) unwrapped."""
    try:
        return hydra.utils.instantiate(config, **kwargs)
    except InstantiationException as err:  # Hydra wraps errors raised in constructors
        if isinstance(err.__cause__, USER_ERRORS):
            raise err.__cause__ from None
        raise


def _instantiate_group(group: DictConfig | None) -> list[Any]:
    """Instantiate every entry with a ``_target_`` of a group such as ``callbacks`` / ``logger``."""
    if not group:
        return []
    return [instantiate(c) for c in group.values() if isinstance(c, DictConfig) and "_target_" in c]


def build_callbacks(cfg: DictConfig, has_logger: bool) -> list[pl.Callback]:
    callbacks = _instantiate_group(cfg.get("callbacks"))
    if not has_logger:  # LearningRateMonitor refuses to run without a logger
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    if cfg.trainer.get("enable_progress_bar") is False:  # Lightning refuses a bar callback then
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    return callbacks


def build_module(cfg: DictConfig, net: torch.nn.Module) -> pl.LightningModule:
    """The LightningModule of ``cfg.module`` around ``net``."""
    return instantiate(cfg.module, net=net)


def resolve_ckpt_path(cfg: DictConfig, output_dir: Path) -> str | None:
    """``auto``: the run's newest resume point (``checkpoints/last.ckpt``, or a SLURM
    ``hpc_ckpt_N.ckpt``) if any; ``null``: None; else the path. The file is verified against its
    checksum (:class:`IntegrityError` naming the path and the way out)."""
    ckpt = cfg.get("ckpt_path")
    if ckpt in (None, "", "null", "none"):
        return None
    if ckpt == "auto":
        found = find_resume_checkpoint(output_dir)
        if found is None:
            return None
        fix = "delete it to restart this run from scratch, or pass ckpt_path=null"
    else:
        found = Path(ckpt)
        if not found.is_file():
            raise CheckpointMismatchError(
                f"ckpt_path '{ckpt}' does not exist (use ckpt_path=auto or null)"
            )
        fix = "resume from another checkpoint, or pass ckpt_path=null"
    verify_checkpoint(found, fix=fix)
    return str(found)


def resolve_teacher(cfg: DictConfig) -> dict[str, str]:
    """For student runs: resolve the teacher checkpoint, verify it, pin it in ``cfg.module`` and
    record path and SHA-256 as ``teacher.resolved_checkpoint`` / ``teacher.sha256``."""
    module = cfg.module
    if "teacher_run_dir" not in module:
        return {}
    path = resolve_teacher_checkpoint(
        module.get("teacher_checkpoint"), module.teacher_run_dir, module.teacher_command
    )
    digest = teacher_digest(path)
    with open_dict(cfg):
        cfg.module.teacher_checkpoint = path
        cfg.teacher.resolved_checkpoint = path
        cfg.teacher.sha256 = digest
    return {"teacher_checkpoint": path, "teacher_sha256": digest}


def _last_checkpoint(trainer: pl.Trainer, output_dir: Path) -> Path:
    """The checkpoint of the final weights, writing ``checkpoints/last.ckpt`` if no callback did."""
    for cb in trainer.checkpoint_callbacks:
        if getattr(cb, "save_last", False) and getattr(cb, "last_model_path", ""):
            return Path(cb.last_model_path)
    last = output_dir / "checkpoints" / "last.ckpt"
    if trainer.state.fn == "fit" or not last.is_file():
        trainer.save_checkpoint(last)
    return last


def _metric(metrics: dict[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return None if value is None else float(value)


def _finish_wandb() -> None:
    """Close the wandb run so the next job of a multirun gets its own (template issue #289)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _prepare_cfg(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """Resolve the config once (fixes the timestamp in run_name) and create the run directory."""
    cfg = cfg.copy()
    OmegaConf.resolve(cfg)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return cfg, output_dir


# ----------------------------------------------------------------------------- train


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit (or resume) and test one run; returns (and writes to metrics.json) the final metrics."""
    _quiet_warnings()
    validate_options(cfg)  # before anything is written
    cfg, output_dir = _prepare_cfg(cfg)
    if cfg.get("print_config", True):
        print(OmegaConf.to_yaml(cfg), flush=True)
    teacher = resolve_teacher(cfg)
    is_main_process = (
        os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    )
    changed = check_saved_config(cfg, output_dir) if is_main_process else []
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.load()  # decode now: bad data fails before anything else is built
    if teacher:
        check_teacher_data(teacher["teacher_checkpoint"], getattr(datamodule, "dataset_id", None))
    module = build_module(cfg, instantiate(cfg.model))
    ckpt_path = resolve_ckpt_path(cfg, output_dir)
    if ckpt_path is not None:
        check_checkpoint_compatible(ckpt_path, module)
        print(f"resuming from {ckpt_path}", flush=True)

    loggers = _instantiate_group(cfg.get("logger"))
    callbacks = build_callbacks(cfg, bool(loggers))
    extra: dict[str, Any] = {"plugins": [ChecksummedCheckpointIO()]}
    if not any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks):
        extra["enable_checkpointing"] = False  # no hidden default checkpoint; see _last_checkpoint
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra
    )
    for lg in loggers:
        lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    record = {
        **teacher,
        **_precision_record(cfg, trainer),
        **({"config_changes": changed} if changed else {}),
    }
    try:
        return _fit_and_test(cfg, trainer, module, datamodule, ckpt_path, output_dir, record)
    finally:
        for cb in callbacks:
            if isinstance(cb, ResumeCheckpoint):
                cb.restore_signals()
        _finish_wandb()


def _precision_record(cfg: DictConfig, trainer: pl.Trainer) -> dict[str, Any]:
    """What ran (precision, memory format), printed once and kept in ``metrics.json``."""
    precision = str(trainer.precision)
    channels_last = use_channels_last(cfg.module.get("channels_last", False), precision)
    accelerator = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    if trainer.is_global_zero:
        print(precision_summary(precision, channels_last, accelerator), flush=True)
    return {"precision": precision, "channels_last": channels_last, "accelerator": accelerator}


def _fit(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    ckpt_path: str | None,
) -> None:
    """``trainer.fit``; a stop by SIGINT/SIGTERM (resume point saved) raises RunInterrupted."""
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    except SIGTERMException:
        resume = [cb for cb in trainer.callbacks if isinstance(cb, ResumeCheckpoint)]
        if resume:
            raise resume[0].interrupted(trainer) from None
        raise RunInterrupted(
            f"interrupted at global step {trainer.global_step} (no checkpoint callback: "
            "callbacks=none saves only at the end); rerun to start again",
            143,
        ) from None


def _fit_and_test(
    cfg: DictConfig,
    trainer: pl.Trainer,
    module: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    ckpt_path: str | None,
    output_dir: Path,
    record: dict[str, Any],
) -> dict[str, Any]:
    start = time.perf_counter()
    if cfg.get("train", True):
        _fit(trainer, module, datamodule, ckpt_path)
    elif ckpt_path is not None:  # test only: evaluate the checkpoint's weights
        state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        module.load_state_dict(state["state_dict"])
    fit_metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    checkpoint = _last_checkpoint(trainer, output_dir) if cfg.get("train", True) else ckpt_path
    test_metrics: dict[str, Any] = {}
    if cfg.get("test", True):
        results = trainer.test(
            module, datamodule=datamodule, verbose=False
        )  # final weights, not "best"
        test_metrics = results[0] if results else {}
    metrics = {
        "test_error": _metric(test_metrics, "test/err"),
        "val_error": _metric(fit_metrics, "val/err"),
        "train_error": _metric(fit_metrics, "train/err"),
        "epochs": int(trainer.current_epoch),
        "global_step": int(trainer.global_step),
        "checkpoint": str(checkpoint) if checkpoint else None,
        "run_dir": str(output_dir),
        "task_name": cfg.task_name,
        "run_name": cfg.run_name,
        "model": getattr(module, "arch", type(module).__name__),
        "dataset_id": getattr(datamodule, "dataset_id", None),
        "seed": int(cfg.seed),
        "wall_seconds": round(time.perf_counter() - start, 1),  # this process: fit + test
        "resumed": ckpt_path is not None,
        "resumed_from": ckpt_path,
        **fidelity_metrics(test_metrics),  # fidelity_*, faithfulness_* (distill.fidelity)
        **record,
    }
    if trainer.is_global_zero:
        text = json.dumps(metrics, indent=2) + "\n"  # the "finished" marker: never torn
        atomic_write(output_dir / "metrics.json", lambda fh: fh.write(text.encode()))
        err = metrics["test_error"]
        err_text = f"{err:.2f}%" if err is not None else "n/a"
        print(f"test error: {err_text} | checkpoint: {metrics['checkpoint']}", flush=True)
    return metrics


# ----------------------------------------------------------------------------- CLI


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python train.py``: run :func:`train`; user errors print one message, exit status 2."""
    from hydra.core.hydra_config import HydraConfig

    with open_dict(cfg):
        cfg.paths.output_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(cfg)
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunInterrupted as err:
        print(str(err), file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    main()
