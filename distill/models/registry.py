"""Architectures by name: ``build_model("resnet56", num_classes=100)``.

Each family module registers its named variants with :func:`register_model` (a factory
``f(num_classes=..., **kw) -> nn.Module``) and may register a name *pattern* with
:func:`register_pattern` (WRN: ``wrn<depth>_<width>`` for any depth and width). Every model has
the class attributes ``cam_layer`` (the module whose output is the last feature map before the
global average pool) and ``feature_layers`` (the stage outputs used by attention transfer), and an
``arch`` property (a short name stored in checkpoints), see docs/CONTRACTS.md.

The *registry name* of a model config (``${model_name:${model}}`` in the configs) starts the
teacher run names: ``wrn40_2-...``, ``resnet56-...``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from torch import nn

__all__ = [
    "ModelFactory",
    "build_model",
    "canonical_name",
    "model_name",
    "model_names",
    "model_overrides",
    "register_model",
    "register_pattern",
]

ModelFactory = Callable[..., nn.Module]
_MODELS: dict[str, ModelFactory] = {}
# (compiled full-match pattern, human-readable form, factory(match, num_classes, **kw), spelling)
_PATTERNS: list[
    tuple[re.Pattern[str], str, Callable[..., nn.Module], Callable[[re.Match[str]], str]]
] = []


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Decorator: register ``factory(num_classes=..., **kw)`` under ``name`` (no ``-``: the
    name starts run names, ``<name>-<data>-...``)."""
    if not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ValueError(f"model name {name!r} must match [a-z][a-z0-9_]* (lower case, no '-')")

    def add(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS and _MODELS[name] is not factory:
            raise ValueError(f"model name {name!r} is already registered")
        _MODELS[name] = factory
        return factory

    return add


def register_pattern(
    pattern: str, form: str, spelling: Callable[[re.Match[str]], str]
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: names matching ``pattern`` (a regex, full match) build
    ``factory(match, num_classes=..., **kw)``; ``form`` describes them in errors
    (``wrn<depth>_<width>``) and ``spelling(match)`` gives the canonical registry name."""
    compiled = re.compile(pattern)

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _PATTERNS.append((compiled, form, factory, spelling))
        return factory

    return add


def model_names() -> tuple[str, ...]:
    """The registered names (sorted); pattern families are listed by :func:`_known`."""
    return tuple(sorted(_MODELS))


def _known() -> str:
    return ", ".join([*model_names(), *(form for _, form, _, _ in _PATTERNS)])


def canonical_name(spelling: str) -> str | None:
    """The registry name for a name or a checkpoint's ``arch`` (``wrn-40-2`` -> ``wrn40_2``,
    ``resnet56`` -> ``resnet56``); None when no family knows it."""
    if spelling in _MODELS:
        return spelling
    for pattern, _, _, spell in _PATTERNS:
        match = pattern.fullmatch(spelling)
        if match is not None:
            return spell(match)
    return None


def build_model(name: str, num_classes: int = 10, **kwargs: Any) -> nn.Module:
    """The network registered as ``name`` (or matching a registered pattern) for
    ``num_classes`` classes; an unknown name raises ``ValueError`` listing the known ones."""
    if name in _MODELS:
        return _MODELS[name](num_classes=num_classes, **kwargs)
    for pattern, _, factory, _ in _PATTERNS:
        match = pattern.fullmatch(name)
        if match is not None:
            return factory(match, num_classes=num_classes, **kwargs)
    raise ValueError(f"unknown model {name!r}; registered models: {_known()}")


def model_name(config: Mapping[str, Any]) -> str:
    """The registry name of a model config (OmegaConf resolver ``model_name``): its ``name``
    for ``build_model`` configs, ``wrn<depth>_<width>`` for ``WideResNet`` configs."""
    target = str(config.get("_target_", ""))
    if "name" in config and target.endswith("build_model"):
        name = str(config["name"])
        found = canonical_name(name)
        if found is None:
            raise ValueError(f"unknown model {name!r}; registered models: {_known()}")
        return found
    if target.endswith("WideResNet"):
        return f"wrn{config.get('depth', 40)}_{config.get('widen_factor', 2)}"
    raise ValueError(
        f"cannot name the model config with _target_={target!r}: use "
        "_target_: distill.models.build_model with a registered name"
    )


def model_overrides(config: Mapping[str, Any]) -> str:
    """The ``train.py`` overrides that select a model config as ``model`` (OmegaConf resolver
    ``model_overrides``): ``model=<name>`` for ``build_model`` configs, ``model.depth=D
    model.widen_factor=K`` for ``WideResNet`` configs (any depth and width)."""
    name = model_name(config)
    if name.startswith("wrn") and str(config.get("_target_", "")).endswith("WideResNet"):
        depth, width = config.get("depth", 40), config.get("widen_factor", 2)
        return f"model=wrn40_2 model.depth={depth} model.widen_factor={width}"
    return f"model={name}"
