"""Start-up checks of a run's config: option domains, refused combinations, config drift.

* :func:`validate_options` — every numeric option in its domain (one message naming the key).
* :func:`check_saved_config` — a rerun of an existing run directory must have the config that is
  saved there (``config_resolved.yaml``, written once by the first run that started training and
  never overwritten); otherwise it is refused with the differing keys, unless
  ``allow_changed_config=true``. :func:`save_config` writes it once training starts.
* :func:`unwritable` — why a folder (made if missing) cannot be written, for a one-line refusal.
* :func:`data_key` — the ``${data_key:${data}}`` resolver: a short hash of the data identity
  (which dataset and images a run trains on), part of the teacher run names.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

__all__ = [
    "IGNORED_ON_RERUN",
    "ConfigError",
    "check_saved_config",
    "config_diff",
    "data_key",
    "save_config",
    "unwritable",
    "validate_options",
]


class ConfigError(ValueError):
    """An option is outside its domain, or a rerun's config differs from the saved one."""


# ----------------------------------------------------------------------------- domains

Rule = tuple[str, type, Callable[[float], bool], str, bool]  # key, type, test, domain, nullable

_RULES: tuple[Rule, ...] = (
    ("seed", int, lambda v: v >= 0, "an integer >= 0", False),
    ("loss.alpha", float, lambda v: v >= 0, "a finite number >= 0", False),
    ("loss.kd.beta", float, lambda v: 0 <= v <= 1, "a number in [0, 1] (CE weight 1-beta)", False),
    ("loss.kd.temperature", float, lambda v: v > 0, "a number > 0", False),
    ("loss.agreement_batches", int, lambda v: v >= 0, "an integer >= 0", False),
    ("loss.grid_every_n_epochs", int, lambda v: v >= 0, "an integer >= 0 (0 = never)", False),
    ("data.batch_size", int, lambda v: v >= 1, "an integer >= 1", False),
    ("data.eval_batch_size", int, lambda v: v >= 1, "an integer >= 1", True),
    ("data.val_size", int, lambda v: v >= 0, "an integer >= 0", False),
    ("data.train_subset", int, lambda v: v >= 1, "an integer >= 1 or null", True),
    ("data.num_classes", int, lambda v: v >= 2, "an integer >= 2", False),
    ("data.synthetic_size", int, lambda v: v >= 1, "an integer >= 1", False),
    ("data.synthetic_test_size", int, lambda v: v >= 1, "an integer >= 1", False),
    ("data.pad", int, lambda v: v >= 0, "an integer >= 0", False),
    ("trainer.max_epochs", int, lambda v: v >= 1, "an integer >= 1", False),
    ("trainer.max_steps", int, lambda v: v == -1 or v >= 1, "-1 (no limit) or >= 1", False),
    ("trainer.log_every_n_steps", int, lambda v: v >= 1, "an integer >= 1", False),
    ("trainer.check_val_every_n_epoch", int, lambda v: v >= 1, "an integer >= 1", True),
    ("trainer.accumulate_grad_batches", int, lambda v: v >= 1, "an integer >= 1", False),
    ("module.optimizer.lr", float, lambda v: v > 0, "a number > 0", False),
    ("module.optimizer.momentum", float, lambda v: 0 <= v < 1, "a number in [0, 1)", False),
    ("module.optimizer.weight_decay", float, lambda v: v >= 0, "a number >= 0", False),
    ("module.scheduler.gamma", float, lambda v: v > 0, "a number > 0", False),
    ("teacher.epochs", int, lambda v: v >= 1, "an integer >= 1", False),
    ("teacher.seed", int, lambda v: v >= 0, "an integer >= 0", False),
    ("callbacks.model_checkpoint.every_n_minutes", float, lambda v: v > 0, "> 0 or null", True),
    ("callbacks.model_checkpoint.every_n_train_steps", int, lambda v: v >= 0, ">= 0", False),
)

_MISSING = object()


def _number(key: str, value: Any, kind: type, domain: str) -> float:
    """``value`` as a number of ``kind``; ConfigError naming ``key`` if it is not one."""
    bad = ConfigError(f"{key} must be {domain}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    if not math.isfinite(float(value)) or (kind is int and float(value) != int(value)):
        raise bad
    return float(value)


def validate_options(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first option outside its domain or a refused
    combination; keys absent from ``cfg`` are skipped."""
    for key, kind, test, domain, nullable in _RULES:
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if value is _MISSING or (value is None and nullable):
            continue
        if not test(_number(key, value, kind, domain)):
            raise ConfigError(f"{key} must be {domain}, got {value!r}")
    method = OmegaConf.select(cfg, "loss.method", default=None)
    if OmegaConf.select(cfg, "module.compile", default=False) and method:
        raise ConfigError(
            f"module.compile=true does not work with a CAM loss (loss.method={method}): the "
            "compiled net hides the CAM layer from the hooks; set module.compile=false"
        )
    if OmegaConf.select(cfg, "loss") is not None:
        _check_objectives(cfg)


def _check_objectives(cfg: DictConfig) -> None:
    """The loss objectives' options in their domains; objectives that read the teacher need the
    student module; hooked student layers do not survive ``module.compile``."""
    from distill.objectives import active_objectives, check_objectives, teacher_needs

    loss: Any = OmegaConf.to_container(cfg.loss, resolve=True)
    check_objectives(loss)
    objectives = [o for o in active_objectives(loss) if o.name != "ce"]
    active = [o.name for o in objectives]
    target = str(OmegaConf.select(cfg, "module._target_", default=""))
    if teacher_needs(loss) and target.endswith(".ClassifierModule"):
        raise ConfigError(
            f"loss objectives {', '.join(active)} read a frozen teacher, which the classifier "
            "module (teacher training) has none of: start from a student preset (e.g. "
            "loss=ce_kd, loss=dkd) or add module=student"
        )
    hooked = [o.name for o in objectives if o.hooks_student]
    if OmegaConf.select(cfg, "module.compile", default=False) and hooked:
        raise ConfigError(
            f"module.compile=true does not work with loss objective(s) {', '.join(hooked)}: "
            "the compiled net hides the student layers they read from the hooks; set "
            "module.compile=false"
        )


# ----------------------------------------------------------------------------- data identity

_DATA_IDENTITY = ("source", "train_subset", "val_size", "split_seed")
_SYNTHETIC_IDENTITY = ("synthetic_size", "synthetic_test_size", "synthetic_seed")


def data_key(data: Mapping[str, Any]) -> str:
    """8 hex digits identifying the training images of a ``data`` config: dataset and class
    count, source, root (not for synthetic data), subset, validation split and synthetic
    size/seed.

    CIFAR-10 with 10 classes (also a config without ``dataset``/``num_classes``) leaves the
    dataset out of the hashed text, so keys of runs made before datasets were configurable
    stay the same."""
    from distill.data.datasets import CIFAR10

    ident = {k: data.get(k) for k in _DATA_IDENTITY}
    dataset = (data.get("dataset") or CIFAR10.name, data.get("num_classes") or CIFAR10.num_classes)
    if dataset != (CIFAR10.name, CIFAR10.num_classes):
        ident.update(dataset=dataset[0], num_classes=dataset[1])
    if data.get("source") == "synthetic":
        ident.update({k: data.get(k) for k in _SYNTHETIC_IDENTITY})
    else:
        ident["root"] = os.path.normpath(str(data.get("root")))
    text = json.dumps(ident, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


# ----------------------------------------------------------------------------- config drift

# keys a rerun may change: where things go, what is printed or logged, how far to train
IGNORED_ON_RERUN = (
    "run_name", "task_name", "paths", "ckpt_path", "train", "test", "print_config",
    "optimized_metric", "allow_changed_config", "logger", "callbacks", "trainer.max_epochs",
    "trainer.enable_progress_bar", "trainer.log_every_n_steps", "trainer.default_root_dir",
    "data.device", "data.eval_batch_size", "data.cache_dir", "teacher.checkpoint",
    "teacher.resolved_checkpoint", "teacher.run_dir", "teacher.train_command",
    "module.teacher_checkpoint", "module.teacher_run_dir", "module.teacher_command",
    "module.cache_root",
)  # fmt: skip


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, Mapping) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_ON_RERUN)


# keys added after runs were saved without them, with the value those runs had implicitly
ADDED_KEYS: dict[str, Any] = {
    "data.dataset": "cifar10",
    "data.num_classes": 10,
    "module.num_classes": 10,
    "teacher.train_recipe": "",
}


def config_diff(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs (keys in IGNORED_ON_RERUN skipped; a
    key of :data:`ADDED_KEYS` missing on one side counts as its value there)."""
    a, b = _flatten(saved), _flatten(new)
    keys = (k for k in set(a) | set(b) if not _ignored(k))
    return sorted(
        k
        for k in keys
        if a.get(k, ADDED_KEYS.get(k, _MISSING)) != b.get(k, ADDED_KEYS.get(k, _MISSING))
    )


def _declared(node: Any, attribute: str) -> Any:
    """The class attribute ``attribute`` of the network a config node builds (``_target_``:
    ``cam_layer`` / ``feature_layers``), None when it cannot be read without building it."""
    target = node.get("_target_") if isinstance(node, Mapping) else None
    try:
        from hydra.utils import get_object

        found = getattr(get_object(target), attribute, None) if target else None
    except Exception:  # noqa: BLE001 - an unimportable target: nothing declared
        return None
    return list(found) if isinstance(found, tuple) else found


def normalize_layers(cfg: dict[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    """``cfg`` with the layer keys that are null (= the network's declared ``cam_layer`` /
    ``feature_layers``) written out, and ``loss.map_size`` dropped when null and absent from
    ``other``: a run saved before these defaults (``block3``, ``[block1, block2, block3]``, no
    ``map_size``) and its rerun with them compare equal, both ways."""
    loss = cfg.get("loss")
    if not isinstance(loss, dict):
        return cfg
    loss = dict(loss)
    candidates = [
        (cfg.get("module") or {}).get("teacher_net"),
        (cfg.get("teacher") or {}).get("model"),
    ]
    teacher = next((c for c in candidates if isinstance(c, Mapping)), None)
    nets = {"student": cfg.get("model"), "teacher": teacher}
    for side, net in nets.items():
        if loss.get(f"{side}_layer", "") is None:
            loss[f"{side}_layer"] = _declared(net, "cam_layer")
    if isinstance(loss.get("at"), dict):
        at = loss["at"] = dict(loss["at"])
        for side, net in nets.items():
            if at.get(f"{side}_layers", "") is None:
                at[f"{side}_layers"] = _declared(net, "feature_layers")
    if isinstance(loss.get("catkd"), dict) and loss["catkd"].get("layer", "") is None:
        catkd = loss["catkd"] = dict(loss["catkd"])  # saved before the default: "relu" (WRN's)
        catkd["layer"] = _declared(nets["student"], "pooled_layer") or _declared(
            nets["student"], "cam_layer"
        )
    if loss.get("map_size", "") is None and "map_size" not in (other.get("loss") or {}):
        del loss["map_size"]
    return {**cfg, "loss": loss}


def check_saved_config(cfg: DictConfig, output_dir: Path) -> list[str]:
    """Compare ``cfg`` with the config saved in ``output_dir`` (nothing saved yet: ``[]``).

    Returns the differing keys when ``allow_changed_config`` is set; raises :class:`ConfigError`
    listing them otherwise. Writes nothing (:func:`save_config` does, once training starts).
    """
    saved_path = output_dir / "config_resolved.yaml"
    if not saved_path.is_file():
        return []
    new = OmegaConf.to_container(cfg, resolve=True)
    saved = OmegaConf.to_container(OmegaConf.load(saved_path), resolve=False)
    diff = config_diff(normalize_layers(saved, new), normalize_layers(new, saved))  # type: ignore[arg-type]
    if not diff or cfg.get("allow_changed_config", False):
        return diff
    shown = ", ".join(diff[:12]) + (f" (+{len(diff) - 12} more)" if len(diff) > 12 else "")
    raise ConfigError(
        f"run directory {output_dir} holds a run with another config (differs in: {shown}). "
        "Use a new run_name=..., or add allow_changed_config=true to continue this run anyway"
    )


def save_config(cfg: DictConfig, output_dir: Path, changed: list[str]) -> None:
    """Save ``cfg`` as ``config_resolved.yaml`` when the run has none; a config continued with
    ``changed`` keys goes beside it as ``config_resolved.changed-N.yaml`` (the original is never
    overwritten)."""
    saved_path = output_dir / "config_resolved.yaml"
    if not saved_path.is_file():
        OmegaConf.save(cfg, saved_path)
    elif changed:
        n = len(list(output_dir.glob("config_resolved.changed-*.yaml"))) + 1
        OmegaConf.save(cfg, output_dir / f"config_resolved.changed-{n}.yaml")


# ----------------------------------------------------------------------------- file system


def unwritable(path: str | Path) -> str | None:
    """Why folder ``path`` (created when missing) cannot be written, else None: the error of a
    probe folder made and removed in its nearest existing ancestor (root ignores file modes, a
    read-only mount refuses everyone: only a real write tells)."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a folder"
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".write-probe-", dir=existing))
    except OSError as err:
        return f"{existing}: {err.strerror or err}"
    return None
