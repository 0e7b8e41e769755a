"""The ``loss`` config group: one schema (defaults written once), its Hydra registration, and
building the configured CAM methods.

:class:`LossConfig` is the structured config of the group: the CAM/memo keys plus one key
``loss.<name>`` per registered objective with options (its ``Config`` dataclass, e.g.
:class:`KDConfig` at ``loss.kd``; :mod:`distill.objectives`). It is stored in Hydra's
ConfigStore as ``loss/_schema`` and ``configs/loss/ce.yaml`` lists it first in its defaults, so
every preset is validated against it at composition. A misspelt key
(``loss.alpah=1``) or a value of the wrong type (``loss.alpha=abc``) is refused by Hydra naming
the key; new keys are refused too (``+loss.x=1``), except inside the free-form CAM option dicts
``cam`` / ``student_cam`` / ``teacher_cam`` (checked against :func:`cams.method_options` when the
CAMs are built, :func:`build_cam`). Option domains (``alpha >= 0``, ``kd.beta`` in [0, 1], ...)
are checked at start-up by :mod:`distill.config_checks` (each objective's own by its ``check``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, make_dataclass, replace
from typing import Any

from torch import nn

import cams
from cams.utils import NORMALIZATIONS
from distill.losses import LossConfigError, check_alpha
from distill.objectives import OBJECTIVES
from distill.objectives.base import declared_layer
from distill.objectives.kd import KDConfig

__all__ = [
    "SCHEMA_NAME",
    "TEACHER_MAP_SOURCES",
    "KDConfig",
    "LossConfig",
    "build_cam",
    "cam_options",
    "register_configs",
    "resolve_cam_layers",
]

SCHEMA_NAME = "_schema"  # configs/loss/ce.yaml: defaults: [_schema, _self_]
TEACHER_MAP_SOURCES = ("online", "cache")


@dataclass
class _LossKeys:
    """The keys of the ``loss`` group besides the objectives' own (``loss.<objective>``): the
    preset name, the explanation term's CAM (``method`` ... ``fresh_orderings``; the ``cam``
    objective), the teacher memo and the CAM logging. :class:`LossConfig` adds one key per
    registered objective with options (``kd``, ``dkd``, ``at``, ...)."""

    name: str = "ce"
    method: str | None = None  # a cams.METHODS name; None: no explanation term
    alpha: float = 0.0
    norm: str = "l2"  # cams.utils.NORMALIZATIONS
    student_layer: str | None = None  # None: the student's declared cam_layer
    teacher_layer: str | None = None  # None: the teacher's declared cam_layer
    map_size: int | None = None  # maps compared at this size; None: the smaller (same if equal)
    teacher_maps: str = "online"  # TEACHER_MAP_SOURCES
    map_align: str = "nearest"
    cache_dir: str | None = None
    teacher_memo: bool = True  # memoize teacher logits/online maps per (image, view) on disk
    memo_dir: str | None = None  # None: <module.memo_root>/<fingerprint hash>
    fresh_orderings: bool = True
    cam: dict[str, Any] = field(default_factory=dict)
    student_cam: dict[str, Any] = field(default_factory=dict)
    teacher_cam: dict[str, Any] = field(default_factory=dict)
    agreement_batches: int = 2
    grid_every_n_epochs: int = 10

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> Any:
        """A validated config from a composed ``loss`` node or a plain dict (missing keys take
        their defaults). Raises :class:`LossConfigError` for unknown keys, wrong types,
        a bad ``alpha``, ``norm`` or ``teacher_maps``."""
        from omegaconf import OmegaConf
        from omegaconf.errors import OmegaConfBaseException

        try:
            merged = OmegaConf.merge(OmegaConf.structured(cls), data)
            cfg: LossConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
        except OmegaConfBaseException as err:
            raise LossConfigError(f"bad loss options: {str(err).splitlines()[0]}") from None
        cfg.alpha = check_alpha(cfg.alpha)
        if cfg.norm not in NORMALIZATIONS:
            raise LossConfigError(f"loss.norm must be one of {NORMALIZATIONS}, got {cfg.norm!r}")
        if cfg.teacher_maps not in TEACHER_MAP_SOURCES:
            raise LossConfigError(
                f"loss.teacher_maps must be 'online' or 'cache', got {cfg.teacher_maps!r}"
            )
        return cfg

    def as_dict(self) -> dict[str, Any]:
        """Plain nested dict (for hyper-parameters and logs)."""
        from dataclasses import asdict

        return asdict(self)

    def options(self, side: str) -> dict[str, Any]:
        """CAM options for ``side`` ("student" or "teacher"): shared ``cam`` + side-specific."""
        return {**self.cam, **getattr(self, f"{side}_cam")}


def _objective_fields() -> list[tuple[str, type, Any]]:
    """``loss.<name>`` of every registered objective with options (its ``Config``)."""
    taken = {f.name for f in fields(_LossKeys)}
    out = []
    for name, objective in OBJECTIVES.items():
        if objective.Config is None:
            continue
        if name in taken:
            raise ValueError(f"objective {name!r} clashes with the loss key loss.{name}")
        out.append((name, objective.Config, field(default_factory=objective.Config)))
    return out


LossConfig = make_dataclass(
    "LossConfig",
    _objective_fields(),
    bases=(_LossKeys,),
    namespace={
        "__module__": __name__,
        "__doc__": """Every key of the ``loss`` group with its default (documented in
    ``configs/loss/ce.yaml``): the keys of :class:`_LossKeys` and ``loss.<name>`` (enabled +
    options) of every registered objective (:data:`distill.objectives.OBJECTIVES`).""",
    },
)


def resolve_cam_layers(cfg: Any, student: nn.Module, teacher: nn.Module) -> Any:
    """``cfg`` (a :class:`LossConfig`) with ``student_layer`` / ``teacher_layer`` set: a null
    one is the network's declared ``cam_layer`` (:func:`distill.objectives.base.declared_layer`,
    which raises naming the key when the network declares none). Unchanged without a CAM
    method (the layers are not used)."""
    if cfg.method is None:
        return cfg
    return replace(
        cfg,
        student_layer=declared_layer(student, cfg.student_layer, "loss.student_layer"),
        teacher_layer=declared_layer(teacher, cfg.teacher_layer, "loss.teacher_layer"),
    )


def register_configs() -> None:
    """Store :class:`LossConfig` as ``loss/_schema`` in Hydra's ConfigStore (idempotent)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="loss", name=SCHEMA_NAME, node=LossConfig)


def cam_options(method: str) -> list[str]:
    """The keyword options the CAM class of ``method`` takes (from its constructor signature)."""
    return list(cams.method_options(method))


def build_cam(method: str, model: nn.Module, layer: str, options: Mapping[str, Any] | None = None):
    """A :mod:`cams` method by its preset name (``gradcam``, ``gradcampp``, ...).

    Raises :class:`LossConfigError` for an unknown method, an option the method does not take
    (listing those it takes) or a value its constructor refuses.
    """
    if method not in cams.METHODS:
        raise LossConfigError(
            f"unknown CAM method loss.method={method!r}; choose one of {sorted(cams.METHODS)}"
        )
    options = dict(options or {})
    takes = cam_options(method)
    unknown = sorted(set(options) - set(takes))
    name = cams.METHODS[method].__name__
    if unknown:
        raise LossConfigError(
            f"{name} (loss.method={method}) takes no option {', '.join(unknown)} "
            f"(set in loss.cam / loss.student_cam / loss.teacher_cam); it takes: "
            f"{', '.join(takes)}"
        )
    try:
        return cams.METHODS[method](model, layer, **options)
    except ValueError as err:
        raise LossConfigError(f"{name} (loss.method={method}): {err}") from None
