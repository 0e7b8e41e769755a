"""A run directory as the harness sees it: its saved config, compared with the one the profile
composes (paths under the results folder made relative first), its ``metrics.json``, and how a
finished run departs from the profile after it was started (:func:`deviation`)."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from distill.harness.profiles import RESULTS_ROOT, ROOT, HarnessError
from distill.harness.records import CHECKPOINT, WEIGHTS_NAME

IGNORED_KEYS = (
    "paths",
    "hydra",
    "run_name",
    "ckpt_path",
    "logger",
    "callbacks",
    "allow_changed_config",
)


def _relative(value: Any, root: str) -> Any:
    """``value`` with the results root ``root`` spelled ``${paths.log_dir}`` in every string."""
    if isinstance(value, dict):
        return {k: _relative(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v, root) for v in value]
    if isinstance(value, str) and (value == root or value.startswith(root + "/")):
        return RESULTS_ROOT + value[len(root) :]
    return value


def _comparable(config: dict[str, Any]) -> dict[str, Any]:
    """A config without run-location keys, with paths under its results root made relative.

    The root is the config's own ``paths.log_dir`` (the results folder it was written in), so runs
    saved with absolute paths by older versions compare equal after the folder is copied.
    """
    root = str((config.get("paths") or {}).get("log_dir") or "")
    kept = {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    teacher = kept.get("teacher")
    if isinstance(teacher, dict) and isinstance(teacher.get("checkpoint"), str):
        # the committed weights (run --commit) are the teacher of last.ckpt: the same run
        teacher = kept["teacher"] = dict(teacher)
        teacher["checkpoint"] = teacher["checkpoint"].replace(WEIGHTS_NAME, CHECKPOINT.as_posix())
    if not root or "${" in root:
        return kept
    return _relative(kept, root.rstrip("/"))


_COMPOSED: dict[tuple[str, ...], dict[str, Any]] = {}


def compose(overrides: Sequence[str]) -> dict[str, Any]:
    """The composed training config for ``overrides`` (comparable form, see :func:`_comparable`)."""
    key = tuple(overrides)
    if key not in _COMPOSED:
        from hydra import compose as hydra_compose
        from hydra import initialize_config_dir
        from omegaconf import OmegaConf

        with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
            cfg = hydra_compose("train", overrides=list(overrides))
        _COMPOSED[key] = _comparable(OmegaConf.to_container(cfg, resolve=False))
    return copy.deepcopy(_COMPOSED[key])


def saved_config(run_dir: Path) -> dict[str, Any] | None:
    """The config saved in ``run_dir`` (comparable form), or None when there is none."""
    path = run_dir / ".hydra" / "config.yaml"
    if not path.exists():
        return None
    return _comparable(yaml.safe_load(path.read_text()) or {})


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ (a key absent on one side counts as null there; keys added
    since a run was saved are filled in before, by :func:`_upgraded`)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [
            d
            for k in sorted(set(a) | set(b))
            for d in _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        ]
    return [] if a == b else [prefix.rstrip(".")]


# derived strings of the automatic teacher lookup; harness runs pass teacher.checkpoint instead
TEACHER_LOOKUP_KEYS = ("run_name", "run_dir", "train_command")


def _fill(value: Any, num_classes: Any) -> Any:
    """``value`` with every ``${data.num_classes}`` replaced by ``num_classes``."""
    if isinstance(value, dict):
        return {k: _fill(v, num_classes) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, num_classes) for v in value]
    return num_classes if value == "${data.num_classes}" else value


def _upgraded(config: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """``config`` as a run saved by an older version compares with today's composition: keys
    added since (:data:`~distill.config_checks.ADDED_KEYS`) at the value those runs had, null
    layer keys written out as the networks declare them (the rule ``train.py`` applies to a
    rerun), ``${data.num_classes}`` at its value, the teacher lookup's derived strings dropped."""
    from distill.config_checks import ADDED_KEYS, normalize_layers

    config = normalize_layers(copy.deepcopy(config), other)
    teacher = config.get("teacher")
    if isinstance(teacher, dict):  # where a teacher lookup would look: the harness names it
        config["teacher"] = {k: v for k, v in teacher.items() if k not in TEACHER_LOOKUP_KEYS}
    for dotted, value in ADDED_KEYS.items():
        node = config
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.setdefault(leaf, value)
    return _fill(config, (config.get("data") or {}).get("num_classes", 10))


def differing_keys(composed: dict[str, Any], saved: dict[str, Any]) -> list[str]:
    """Dotted keys where a saved run's config differs from today's composition, after both are
    upgraded by :func:`_upgraded` (a key added since counts at the value old runs had)."""
    return _diff_keys(_upgraded(composed, saved), _upgraded(saved, composed))


def config_mismatch(run_dir: Path, overrides: Sequence[str]) -> str | None:
    """Why ``run_dir``'s saved config differs from what ``overrides`` compose to (None: same, or
    nothing saved yet)."""
    found = saved_config(run_dir)
    if found is None:
        return None
    diff = differing_keys(compose(overrides), found)
    return f"{run_dir} (differs in {', '.join(diff[:8])})" if diff else None


def check_same_config(run_dir: Path, overrides: Sequence[str]) -> None:
    """Refuse a run directory whose saved config differs from what the profile asks for."""
    mismatch = config_mismatch(run_dir, overrides)
    if mismatch:
        raise HarnessError(
            f"{mismatch} holds a run with a different config; it is not reused or merged: "
            "move it away, or run this profile into another results folder (--results-dir)"
        )


def read_metrics(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / "metrics.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())


def changed_keys(run_dir: Path, metrics: dict[str, Any]) -> list[str]:
    """Config keys a continuation with ``allow_changed_config=true`` changed in ``run_dir``.

    Two records, either one enough: ``config_changes`` in ``metrics.json`` (the last process's)
    and every ``config_resolved.changed-N.yaml`` beside ``config_resolved.yaml`` (kept for good,
    so a later rerun with the original config, which rewrites ``metrics.json`` without
    ``config_changes``, does not hide that a changed config trained these weights).
    """
    from distill.config_checks import config_diff

    keys = set(metrics.get("config_changes") or [])
    original = run_dir / "config_resolved.yaml"
    for changed in sorted(run_dir.glob("config_resolved.changed-*.yaml")):
        diff = config_diff(_load_yaml(original), _load_yaml(changed)) if original.exists() else []
        keys |= set(diff) or {f"unknown keys ({changed.name})"}
    return sorted(keys)


def _load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text()) or {}


def asked_epochs(overrides: Sequence[str]) -> int | None:
    """``trainer.max_epochs`` of the composed config (None: not a plain number of epochs)."""
    value = compose(overrides).get("trainer", {}).get("max_epochs")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def deviation(run_dir: Path, overrides: Sequence[str]) -> str | None:
    """How the finished run in ``run_dir`` differs from what ``overrides`` ask, after its start
    (its saved config is :func:`config_mismatch`'s job): continued with a changed config, or
    trained for another number of epochs than ``trainer.max_epochs`` (``epochs`` in
    ``metrics.json``; a run without that record is not checked). None: as asked, or not finished.
    """
    metrics = read_metrics(run_dir)
    if metrics is None:
        return None
    found = []
    if keys := changed_keys(run_dir, metrics):
        found.append(f"continued with allow_changed_config=true, changing {', '.join(keys)}")
    epochs = metrics.get("epochs")
    asked = None if epochs is None else asked_epochs(overrides)
    if asked is not None and int(epochs) != asked:
        found.append(f"trained {int(epochs)} epochs, the profile asks {asked}")
    return "; ".join(found) or None
