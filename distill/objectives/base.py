"""The objective interface: what a distillation objective reads from the student and from the
frozen teacher, and the named, weighted loss terms it returns.

An objective is a subclass of :class:`Objective` registered under a name
(:func:`distill.objectives.register_objective`). Its options are a dataclass ``Config`` with an
``enabled: bool = False`` field; the loss schema (:class:`distill.loss_config.LossConfig`) gets
one key ``loss.<name>`` of that type, so ``loss.<name>.enabled=true`` switches it on and Hydra
refuses misspelt options. Per training step the student module hands every active objective

* :class:`StudentOutputs` — the student's logits, its true-class CAM maps (when ``loss.method``
  is set) and the outputs of the student layers it asked for (forward hooks on the one forward);
* the teacher outputs it asked for by name (``"logits"``, ``"maps"`` — the teacher's CAM maps —
  or a :class:`TeacherOutput` it declared), online or from the teacher-output memo;

and sums ``weight * value`` over the :class:`Term` s it returns; every term is logged as
``train/<term name>``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from distill.losses import LossConfigError

if TYPE_CHECKING:
    from distill.loss_config import LossConfig

__all__ = [
    "Objective",
    "StudentOutputs",
    "TeacherOutput",
    "Term",
    "capture",
    "check_domain",
    "check_layers",
    "declared_layer",
    "declared_layers",
    "exact",
    "layer_shapes",
]


class Term(NamedTuple):
    """One loss term: ``value`` (a scalar, logged as ``train/<name>``) enters the loss as
    ``weight * value``."""

    name: str
    value: Tensor
    weight: float


@dataclass(frozen=True)
class TeacherOutput:
    """A per-sample output of the frozen teacher that an objective reads.

    ``compute(features, logits)`` maps the outputs of the teacher modules ``layers`` (in that
    order, detached) and its logits to a float tensor (B, ...). The teacher-output memo stores it
    per (image, augmentation view) in a table named after ``name`` and a hash of
    ``description``, which must say everything the values depend on besides the teacher and the
    image (layers, sizes, settings): change it whenever the values change.
    """

    name: str
    layers: tuple[str, ...]
    compute: Callable[[list[Tensor], Tensor], Tensor]
    description: Mapping[str, Any]


@dataclass
class StudentOutputs:
    """What the student's one forward of a training step gives the objectives."""

    logits: Tensor
    maps: Tensor | None  # true-class CAM maps (B, h, w) of loss.method (differentiable)
    features: dict[str, Tensor]  # outputs of the requested student layers (differentiable)


class Objective:
    """A distillation objective: options, what it reads, and its terms.

    Subclasses set ``Config`` (a dataclass with ``enabled: bool = False`` and the options with
    their published defaults; the schema key ``loss.<name>``), ``teacher`` (the teacher outputs
    it reads: ``"logits"``, ``"maps"`` or names of the :class:`TeacherOutput` s returned by
    :meth:`teacher_outputs`), ``hooks_student`` when ``__init__`` sets ``student_layers`` (read
    through forward hooks, which ``module.compile`` hides), and implement :meth:`terms`.
    ``__init__`` receives the validated loss config and both networks (to check layers and
    sizes; the teacher is frozen).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type | None] = None
    teacher: ClassVar[tuple[str, ...]] = ()
    hooks_student: ClassVar[bool] = False  # reads student layers through forward hooks
    # Hydra overrides that switch it on cheaply on top of a student preset (generic tests)
    quick_overrides: ClassVar[tuple[str, ...]] = ()

    def __init__(self, loss: LossConfig, student: nn.Module, teacher: nn.Module) -> None:
        self.loss = loss
        self.cfg: Any = getattr(loss, self.name) if self.Config is not None else None
        self.student_layers: tuple[str, ...] = ()  # student layers whose outputs it reads

    @classmethod
    def active(cls, loss: LossConfig) -> bool:
        """Whether ``loss`` switches this objective on (default ``loss.<name>.enabled``)."""
        return bool(getattr(loss, cls.name).enabled)

    @classmethod
    def check(cls, loss: LossConfig) -> None:
        """Raise :class:`~distill.losses.LossConfigError` naming the key of an option outside
        its domain (called at start-up, before any network is built)."""

    @classmethod
    def teacher_needs(cls, loss: LossConfig) -> tuple[str, ...]:
        """The teacher outputs a run with ``loss`` reads (names; see ``teacher``)."""
        return cls.teacher

    def teacher_outputs(self) -> list[TeacherOutput]:
        """The :class:`TeacherOutput` s named in ``teacher`` (besides logits and maps)."""
        return []

    def terms(
        self,
        student: StudentOutputs,
        teacher: Mapping[str, Tensor],
        batch: Mapping[str, Any],
        epoch: int,
    ) -> list[Term]:
        """The weighted terms of one training step; ``epoch`` counts from 0."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- helpers


def check_domain(key: str, value: Any, ok: bool, domain: str) -> None:
    """Raise ``LossConfigError("loss.<key> must be <domain>, got <value>")`` unless ``ok``."""
    if isinstance(value, bool) or not ok:
        raise LossConfigError(f"loss.{key} must be {domain}, got {value!r}")


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def check_layers(net: nn.Module, layers: Sequence[str], key: str) -> None:
    """Refuse layer names that are not modules of ``net`` (naming ``loss.<key>``)."""
    names = dict(net.named_modules())
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        top = ", ".join(n for n in names if n and "." not in n)
        raise LossConfigError(
            f"loss.{key}: {type(net).__name__} has no module {', '.join(unknown)}; "
            f"its top-level modules: {top}"
        )


def _top_modules(net: nn.Module) -> str:
    return ", ".join(n for n, _ in net.named_children())


def declared_layer(
    net: nn.Module, layer: str | None, option: str, error: type[Exception] = LossConfigError
) -> str:
    """``layer``, or when it is None the CAM layer ``net`` declares (its class attribute
    ``cam_layer``: the last feature map before the global pool). Raises ``error`` naming
    ``option`` (e.g. ``loss.student_layer``) when neither is there."""
    if layer is not None:
        return layer
    found = getattr(net, "cam_layer", None)
    if not isinstance(found, str) or not found:
        raise error(
            f"{option} is not set and {type(net).__name__} declares no cam_layer: set "
            f"{option}=<module> (its top-level modules: {_top_modules(net)}) or give the class "
            "a cam_layer attribute"
        )
    return found


def declared_layers(net: nn.Module, layers: Sequence[str] | None, option: str) -> tuple[str, ...]:
    """``layers``, or when None the feature layers ``net`` declares (class attribute
    ``feature_layers``: its stage outputs); :class:`LossConfigError` naming ``option`` when
    neither is there."""
    if layers is not None:
        return tuple(layers)
    found = getattr(net, "feature_layers", None)
    if not found:
        raise LossConfigError(
            f"{option} is not set and {type(net).__name__} declares no feature_layers: set "
            f"{option}=[...] (its top-level modules: {_top_modules(net)}) or give the class a "
            "feature_layers attribute"
        )
    return tuple(found)


@contextmanager
def capture(net: nn.Module, layers: Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Collect the output of each of ``layers`` of ``net`` during the block: the first call of
    each (a CAM method's reruns of the network come after the main forward)."""
    found: dict[str, Tensor] = {}
    modules = dict(net.named_modules())

    def hook(layer: str) -> Callable[..., None]:
        def keep(module: nn.Module, inputs: Any, output: Tensor) -> None:
            found.setdefault(layer, output)

        return keep

    handles = [modules[layer].register_forward_hook(hook(layer)) for layer in dict.fromkeys(layers)]
    try:
        yield found
    finally:
        for handle in handles:
            handle.remove()


def layer_shapes(net: nn.Module, layers: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch) of each of ``layers`` for 32x32 inputs (eval mode, no
    grad, mode restored)."""
    was_training = net.training
    try:
        param = next(net.parameters(), None)
        kwargs = {"device": param.device, "dtype": param.dtype} if param is not None else {}
        with torch.no_grad(), capture(net, layers) as found:
            net.eval()(torch.zeros(2, 3, 32, 32, **kwargs))
    finally:
        net.train(was_training)
    return {layer: tuple(found[layer].shape[1:]) for layer in layers}


def upcast(t: Tensor) -> Tensor:
    """``t`` in float32, or float64 if it is float64."""
    return t if t.dtype == torch.float64 else t.float()


@contextmanager
def exact(t: Tensor) -> Iterator[None]:
    """Loss arithmetic outside autocast (float32 or float64 throughout)."""
    with torch.autocast(t.device.type, enabled=False):
        yield
