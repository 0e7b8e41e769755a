"""Distillation objectives: a registry, as :data:`cams.METHODS` is for CAM methods.

Each objective is one module of this package that registers itself::

    @register_objective("dkd")
    class DKD(Objective):
        Config = DKDConfig          # loss.dkd: enabled + options with published defaults
        teacher = ("logits",)       # what it reads from the frozen teacher
        def terms(self, student, teacher, batch, epoch): ...

Every module of the package is imported here, so a new file is picked up without an edit. The
student's loss is ``sum(weight * value)`` over the terms of the active objectives
(:func:`active_objectives`): ``ce`` always, ``kd`` with ``loss.kd.enabled``, ``cam`` with
``loss.method``, and any other with ``loss.<name>.enabled``. Presets compose them
(``configs/loss/``); so does the command line, e.g. ``loss=shapleycam loss.dkd.enabled=true``.
See :mod:`distill.objectives.base` for the interface.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from torch import nn

from distill.losses import LossConfigError
from distill.objectives.base import Objective, StudentOutputs, TeacherOutput, Term

if TYPE_CHECKING:
    from distill.loss_config import LossConfig

__all__ = [
    "OBJECTIVES",
    "Objective",
    "StudentOutputs",
    "TeacherOutput",
    "Term",
    "active_objectives",
    "build_objectives",
    "check_objectives",
    "register_objective",
    "teacher_needs",
]

OBJECTIVES: dict[str, type[Objective]] = {}  # name -> class, in registration order
BUILT_IN = ("ce", "kd", "cam")  # registered first: the order of the terms and of the loss sum


def register_objective(name: str):  # -> Callable[[type[Objective]], type[Objective]]
    """Class decorator: register an :class:`Objective` subclass as ``name``."""

    def add(cls: type[Objective]) -> type[Objective]:
        if name in OBJECTIVES and OBJECTIVES[name] is not cls:
            raise ValueError(f"objective {name!r} is already registered ({OBJECTIVES[name]})")
        cls.name = name
        if cls.Config is not None and not cls.quick_overrides:
            cls.quick_overrides = (f"loss.{name}.enabled=true",)
        OBJECTIVES[name] = cls
        return cls

    return add


def _discover() -> None:
    for name in BUILT_IN:
        importlib.import_module(f"{__name__}.{name}")
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name != "base" and not info.name.startswith("_"):
            importlib.import_module(f"{__name__}.{info.name}")


def _config(loss: LossConfig | Mapping[str, Any]) -> LossConfig:
    from distill.loss_config import LossConfig

    return loss if isinstance(loss, LossConfig) else LossConfig.from_mapping(loss)


def active_objectives(loss: LossConfig | Mapping[str, Any]) -> list[type[Objective]]:
    """The objectives ``loss`` switches on, in registry order."""
    cfg = _config(loss)
    return [cls for cls in OBJECTIVES.values() if cls.active(cfg)]


def check_objectives(loss: LossConfig | Mapping[str, Any]) -> None:
    """Every active objective's options in their domains (:class:`LossConfigError` naming the
    key otherwise)."""
    cfg = _config(loss)
    for cls in active_objectives(cfg):
        cls.check(cfg)


def teacher_needs(loss: LossConfig | Mapping[str, Any]) -> list[str]:
    """The teacher outputs a run with ``loss`` reads (``logits``, ``maps``, output names)."""
    cfg = _config(loss)
    names = [n for cls in active_objectives(cfg) for n in cls.teacher_needs(cfg)]
    return list(dict.fromkeys(names))


def build_objectives(
    loss: LossConfig | Mapping[str, Any], student: nn.Module, teacher: nn.Module
) -> list[Objective]:
    """The active objectives of ``loss`` for these networks (options checked)."""
    cfg = _config(loss)
    check_objectives(cfg)
    objectives = [cls(cfg, student, teacher) for cls in active_objectives(cfg)]
    outputs: dict[str, TeacherOutput] = {}
    for objective in objectives:
        for output in objective.teacher_outputs():
            known = outputs.get(output.name)
            if output.name in ("logits", "maps") or (known is not None and known != output):
                raise LossConfigError(
                    f"objective {objective.name!r} declares teacher output {output.name!r}, "
                    "which another output already uses: give it another name"
                )
            outputs[output.name] = output
    return objectives


_discover()
