"""Training entry point (Hydra): ``python train.py [overrides]``; ``train(cfg)`` from Python.

One run = one directory ``<paths.log_dir>/<task_name>/<run_name>`` holding the composed config
(``.hydra/``, ``config_resolved.yaml``), logs, ``checkpoints/last.ckpt`` and ``metrics.json`` with
the test error of the *final* weights. ``ckpt_path=auto`` resumes ``checkpoints/last.ckpt`` when the
run directory already has one (same ``run_name``); a finished run is left as it is.

Start-up order: validate option domains, check that the run directory can be written, resolve
(and verify) the teacher checkpoint, compare the config with the one saved in the run directory
(refuse a changed config), stop if the run is finished, load the data, verify the resume
checkpoint, build; only then is anything written (run directory, ``config_resolved.yaml``): a
refused start-up leaves nothing behind (``main`` also removes what Hydra wrote for it). Every
checkpoint is written atomically with a SHA-256 sidecar (:mod:`distill.checkpointing`);
SIGINT/SIGTERM save a resume point and exit 130/143.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.exceptions import SIGTERMException

from distill.checkpointing import (
    ChecksummedCheckpointIO,
    ResumeCheckpoint,
    RunInterrupted,
    find_resume_checkpoint,
    verify_checkpoint,
)
from distill.config_checks import (
    ConfigError,
    check_saved_config,
    data_key,
    save_config,
    unwritable,
    validate_options,
)
from distill.console import quiet_lightning, say
from distill.data.sources import DataError
from distill.fidelity import fidelity_metrics
from distill.integrity import IntegrityError, atomic_write
from distill.losses import LossConfigError
from distill.models import model_name, model_overrides
from distill.modules.classifier import (
    CheckpointMismatchError,
    NonFiniteLossError,
    check_checkpoint_compatible,
)
from distill.precision import default_precision, precision_summary, use_channels_last
from distill.sweeps import job_dirname
from distill.teacher import (
    CacheError,
    TeacherError,
    check_teacher_data,
    resolve_teacher_checkpoint,
    teacher_digest,
)
from distill.visualize import last_figure

__all__ = ["CONFIG_DIR", "USER_ERRORS", "StartupGuard", "main", "repo_root", "train"]

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


_RECORD_SUBDIRS: dict[str, str] = {}  # run directory -> its Hydra record, as first resolved


def run_record_subdir(output_dir: str) -> str:
    """``hydra.output_subdir``: ``.hydra`` for a new run; for a rerun of an existing run
    ``.hydra/rerun-<time>-<pid>``, so Hydra never overwrites the original record. Fixed at its
    first evaluation (Hydra evaluates it again after writing ``.hydra/config.yaml``)."""
    if output_dir not in _RECORD_SUBDIRS:
        new = not (Path(output_dir) / ".hydra" / "config.yaml").exists()
        rerun = f".hydra/rerun-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        _RECORD_SUBDIRS[output_dir] = ".hydra" if new else rerun
    return _RECORD_SUBDIRS[output_dir]


OmegaConf.register_new_resolver("repo_root", repo_root, replace=True)
OmegaConf.register_new_resolver("data_key", data_key, replace=True)
OmegaConf.register_new_resolver("run_record_subdir", run_record_subdir, replace=True)
OmegaConf.register_new_resolver("default_precision", default_precision, replace=True)
OmegaConf.register_new_resolver("job_dirname", job_dirname, replace=True)
OmegaConf.register_new_resolver("model_name", model_name, replace=True)
OmegaConf.register_new_resolver("model_overrides", model_overrides, replace=True)
CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")

_QUIET = (
    ".*does not have many workers.*",
    ".*GPU available but not used.*",
    ".*Checkpoint directory .* exists and is not empty.*",
    ".*The number of training batches.*",
    ".*across ranks is zero.*",
    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*",
    ".*module\\(s\\) in eval mode at the start of training.*",  # the frozen teacher: said by
    # StudentModule.on_train_start ("teacher frozen in eval mode: N modules"), others warned there
    ".*is not supported by the model summary.*",  # the size estimate of a bf16/16-bit run
)


def _quiet_warnings() -> None:
    """Silence Lightning warnings that are expected here (tensor-resident data, frozen teacher)
    and its tips (:func:`distill.console.quiet_lightning`)."""
    for pattern in _QUIET:
        warnings.filterwarnings("ignore", pattern)
    quiet_lightning()


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
    command = teacher_command(user_overrides(), module.teacher_command) or module.teacher_command
    path = resolve_teacher_checkpoint(
        module.get("teacher_checkpoint"), module.teacher_run_dir, command
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
    """Resolve the config once (fixes the timestamp in run_name); refuse a run directory that
    cannot be written (nothing is created yet)."""
    cfg = cfg.copy()
    OmegaConf.resolve(cfg)
    output_dir = Path(cfg.paths.output_dir)
    _check_writable(output_dir)
    return cfg, output_dir


def _check_writable(output_dir: Path) -> None:
    reason = unwritable(output_dir)
    if reason is not None:
        raise ConfigError(
            f"cannot write the run directory {output_dir} ({reason}); "
            "set paths.log_dir=PATH to a writable folder"
        )


def finished_metrics(cfg: DictConfig, output_dir: Path) -> dict[str, Any] | None:
    """``metrics.json`` of a finished run that this command would only repeat, else None.

    Finished: ``ckpt_path=auto``, ``metrics.json`` is there, and its ``epochs`` reach
    ``trainer.max_epochs`` (or its ``global_step`` ``trainer.max_steps``). Not finished when the
    command asks for a test the run did not record (``test_error`` null) or trains further.
    """
    path = output_dir / "metrics.json"
    if cfg.get("ckpt_path") != "auto" or not path.is_file():
        return None
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(metrics, dict) or (
        cfg.get("test", True) and metrics.get("test_error") is None
    ):
        return None
    max_steps = cfg.trainer.get("max_steps", -1)
    epochs_done = int(metrics.get("epochs") or 0) >= int(cfg.trainer.max_epochs)
    steps_done = max_steps not in (None, -1) and int(metrics.get("global_step") or 0) >= max_steps
    return metrics if epochs_done or steps_done else None


def user_overrides() -> list[str]:
    """The command line's overrides (``python train.py a=b ...``); [] outside Hydra."""
    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


_TEACHER_KEYS = {"teacher.epochs": "trainer.max_epochs", "teacher.seed": "seed"}
_TEACHER_MODEL = ("teacher", "model@teacher.model")  # the overrides that pick the teacher model


def teacher_command(overrides: list[str], config_command: str | None = None) -> str | None:
    """The command that trains the teacher a student run looks for, from the student's own
    command-line overrides: its ``data``/``paths`` overrides as given, ``teacher.epochs`` /
    ``teacher.seed`` / ``teacher.model.*`` as the teacher run's keys, ``teacher=<name>`` and
    ``model@teacher.model=<name>`` as ``model=<name>``, ``recipe=<name>`` as given. With an
    ``experiment=`` override (it may pick the data, recipe and teacher) it is ``config_command``
    (the config's ``teacher.train_command``, naming them all) plus the ``paths`` overrides, or
    None without one. None outside Hydra."""
    if not HydraConfig.initialized():
        return None
    if any(o.lstrip("+~").startswith("experiment=") for o in overrides):
        paths = [o for o in overrides if o.lstrip("+~").startswith("paths.")]
        return " ".join([config_command, *paths]) if config_command else None
    kept = []
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("data", "recipe") or key.startswith(("data.", "paths.")):
            kept.append(override)
        elif key in _TEACHER_KEYS:
            kept.append(f"{_TEACHER_KEYS[key]}={value}")
        elif key.startswith("teacher.model."):
            kept.append(f"{key.removeprefix('teacher.')}={value}")
        elif key in _TEACHER_MODEL:
            kept.append(f"model={value}")
    return " ".join(["python train.py experiment=teacher", *kept])


def _announce(cfg: DictConfig, output_dir: Path) -> None:
    """The start-up lines: the overrides (the whole config with ``print_config=true``), the run
    directory and the command that continues this run (its ``run_name`` fixed)."""
    if cfg.get("print_config", False):
        say(OmegaConf.to_yaml(cfg))
    overrides = user_overrides()
    say(f"overrides: {' '.join(overrides) if overrides else '(none)'}")
    kept = [o for o in overrides if not o.startswith(("run_name=", "+run_name="))]
    say(
        f"run directory: {output_dir} (full config: .hydra/config.yaml, config_resolved.yaml); "
        f"resume or extend it with: python train.py {' '.join([*kept, f'run_name={cfg.run_name}'])}"
    )


def loss_record(cfg: DictConfig, module: pl.LightningModule) -> dict[str, Any]:
    """What was optimized: the loss preset, the CAM method, alpha and the weight of every term
    of the active objectives (at the last training step; CE alone: ``{"ce": 1.0}``)."""
    loss = cfg.get("loss") or {}
    weights = getattr(module, "term_weights", None) or {"ce": 1.0}
    return {
        "loss_preset": loss.get("name"),
        "cam_method": loss.get("method"),
        "alpha": float(loss.get("alpha") or 0.0),
        "loss_weights": weights,
    }


def _summary(metrics: dict[str, Any]) -> str:
    err = metrics.get("test_error")
    err_text = f"{err:.2f}%" if err is not None else "n/a"
    return f"test error: {err_text} | checkpoint: {metrics.get('checkpoint')}"


def _start_run(cfg: DictConfig, output_dir: Path, changed: list[str], main: bool) -> None:
    """Training really starts: create the run directory and save the config (first start only,
    or beside it when continued with a changed config)."""
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        if main:
            save_config(cfg, output_dir, changed)
    except OSError as err:
        raise ConfigError(
            f"cannot write the run directory {output_dir} ({err.strerror or err}); "
            "set paths.log_dir=PATH to a writable folder"
        ) from None


# ----------------------------------------------------------------------------- train


def train(cfg: DictConfig, on_start: Callable[[], None] | None = None) -> dict[str, Any]:
    """Fit (or resume) and test one run; returns (and writes to metrics.json) the final metrics.

    A finished run (:func:`finished_metrics`) is left as it is: its summary is printed and its
    metrics returned. Nothing is written before every start-up check has passed; ``on_start`` is
    called right after the run directory and its config are written.
    """
    _quiet_warnings()
    validate_options(cfg)  # before anything is written
    cfg, output_dir = _prepare_cfg(cfg)
    _announce(cfg, output_dir)
    teacher = resolve_teacher(cfg)
    is_main_process = (
        os.environ.get("LOCAL_RANK", "0") == "0" and os.environ.get("NODE_RANK", "0") == "0"
    )
    changed = check_saved_config(cfg, output_dir) if is_main_process else []
    finished = finished_metrics(cfg, output_dir)
    if finished is not None:
        say(
            f"run {output_dir} is already finished (epochs: {finished.get('epochs')}, "
            f"trainer.max_epochs={cfg.trainer.max_epochs}); its metrics.json is left as it is "
            "(a larger trainer.max_epochs trains it further)"
        )
        say(_summary(finished))
        return finished
    pl.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.load()  # decode now: bad data fails before anything else is built
    if teacher:
        check_teacher_data(teacher["teacher_checkpoint"], getattr(datamodule, "dataset_id", None))
    module = build_module(cfg, instantiate(cfg.model))
    ckpt_path = resolve_ckpt_path(cfg, output_dir)
    if ckpt_path is not None:
        check_checkpoint_compatible(ckpt_path, module)
        say(f"resuming from {ckpt_path}")

    loggers = _instantiate_group(cfg.get("logger"))
    callbacks = build_callbacks(cfg, bool(loggers))
    extra: dict[str, Any] = {"plugins": [ChecksummedCheckpointIO()]}
    if not any(isinstance(c, pl.callbacks.ModelCheckpoint) for c in callbacks):
        extra["enable_checkpointing"] = False  # no hidden default checkpoint; see _last_checkpoint
    trainer: pl.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, **extra
    )
    _start_run(cfg, output_dir, changed, is_main_process)
    if on_start is not None:
        on_start()
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
        say(precision_summary(precision, channels_last, accelerator))
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
    live = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    recorded = module.epoch_metrics() if hasattr(module, "epoch_metrics") else {}
    fit_metrics = {**recorded, **live}  # recorded: a resume with no epoch left to train
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
        "cam_figure": str(figure) if (figure := last_figure(output_dir)) else None,
        **fidelity_metrics(test_metrics),  # fidelity_*, faithfulness_* (distill.fidelity)
        **loss_record(cfg, module),
        **record,
    }
    if trainer.is_global_zero:
        text = json.dumps(metrics, indent=2) + "\n"  # the "finished" marker: never torn
        atomic_write(output_dir / "metrics.json", lambda fh: fh.write(text.encode()))
        say(_summary(metrics))
    return metrics


# ----------------------------------------------------------------------------- CLI

_CREATED_BY_START: dict[str, list[Path]] = {}  # run directory -> its folders that Hydra creates


class StartupGuard(Callback):
    """Hydra callback (``configs/hydra/default.yaml``), run before Hydra creates anything: refuse
    a run (or sweep) directory that cannot be written with one line (``error: ...``, exit 2),
    and note which of its folders do not exist yet, for :func:`_discard_startup`."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = self._check(config, "hydra.run.dir")
        if run_dir is not None:
            missing = [p for p in (run_dir, *run_dir.parents) if not p.exists()]
            _CREATED_BY_START[str(run_dir)] = missing

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "hydra.sweep.dir")

    @staticmethod
    def _check(config: DictConfig, key: str) -> Path | None:
        try:
            path = Path(os.path.abspath(str(OmegaConf.select(config, key, throw_on_missing=True))))
        except Exception:  # noqa: BLE001 - not resolvable before the job: Hydra reports it
            return None
        reason = unwritable(path)
        if reason is not None:
            print(
                f"error: cannot write the run directory {path} ({reason}); set "
                "paths.log_dir=PATH to a writable folder",
                file=sys.stderr,
                flush=True,
            )
            sys.exit(2)
        return path


def _discard_startup(
    output_dir: Path, record_subdir: str | None, log_file: str | None, log_size: int = 0
) -> None:
    """Remove what Hydra wrote for a start-up that did not start training: its record
    (``.hydra/`` or ``.hydra/rerun-*``), its lines in the job log (cut back to ``log_size``),
    and the run directory (with its job log) when this start-up created it; in a multirun, a
    job directory that holds nothing else."""
    if record_subdir is not None:
        record = output_dir / record_subdir
        for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
            (record / name).unlink(missing_ok=True)
        for folder in (record, record.parent):
            if folder != output_dir and folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
    output_dir = Path(os.path.abspath(output_dir))
    missing = _CREATED_BY_START.pop(str(output_dir), None)
    log = Path(log_file) if log_file else None
    if log is not None and log.is_file() and log.stat().st_size > log_size:
        os.truncate(log, log_size)
    if missing is None:  # multirun job: its directory is this start-up's if nothing else is there
        left = set(output_dir.iterdir()) if output_dir.is_dir() else set()
        missing = [output_dir] if left <= {log} else []
    if output_dir in missing and log is not None:
        log.unlink(missing_ok=True)
    for folder in missing:  # deepest first
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def _size(path: str | None) -> int:
    try:
        return os.path.getsize(path) if path else 0
    except OSError:
        return 0


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    """``python train.py``: run :func:`train`; user errors print one message, exit status 2.
    A start-up that does not start training (refused, or the run is finished) leaves no trace
    of itself in the run directory."""
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
    log_file = OmegaConf.select(hydra_cfg, "job_logging.handlers.file.filename", default=None)
    log_size = _size(log_file)
    record = _RECORD_SUBDIRS.get(str(output_dir))  # None: Hydra wrote no record of ours
    started: list[bool] = []
    try:
        metrics = train(cfg, on_start=lambda: started.append(True))
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    except RunInterrupted as err:
        print(str(err), file=sys.stderr, flush=True)
        sys.exit(err.exit_code)
    finally:
        if not started:
            _discard_startup(output_dir, record, log_file, log_size)
        _RECORD_SUBDIRS.pop(str(output_dir), None)
    key = cfg.get("optimized_metric")
    return metrics.get(key) if key else None


if __name__ == "__main__":
    main()
