"""The registry of CAM methods: the one list of method names in the code base.

A method class registers itself under a short name with :func:`register`; everything that
enumerates methods — :func:`build`, the training presets (``configs/loss/<name>.yaml``), the
reproduction harness, the benchmarks and the generic test suites — reads :data:`METHODS`::

    cams.METHODS["gradcam"]                  # -> cams.GradCAM
    cams.method_options("shapcam")           # -> ('utility', 'relu', 'n_permutations', ...)
    cams.build("gradcampp", model, "layer4", utility="prob")
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

__all__ = ["METHODS", "build", "get_method", "method_options", "register"]

METHODS: dict[str, type] = {}
T = TypeVar("T", bound=type)


def register(name: str) -> Callable[[T], T]:
    """Class decorator: ``@register("gradcam")`` adds the class to :data:`METHODS`."""

    def decorate(cls: T) -> T:
        if METHODS.get(name, cls) is not cls:
            raise ValueError(f"CAM method name {name!r} is taken by {METHODS[name].__name__}")
        METHODS[name] = cls
        cls.method_name = name
        return cls

    return decorate


def get_method(name: str) -> type:
    """The class registered as ``name``; unknown names list the registered ones."""
    if name not in METHODS:
        raise ValueError(f"unknown CAM method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_options(method: str | type) -> tuple[str, ...]:
    """The keyword options of a method's constructor (after ``model`` and ``target_layer``)."""
    cls = get_method(method) if isinstance(method, str) else method
    params = inspect.signature(cls.__init__).parameters.values()
    return tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)


def build(name: str, model: nn.Module, target_layer: nn.Module | str, **options: Any) -> Any:
    """``METHODS[name](model, target_layer, **options)``; an option the method does not take is
    refused with the list of those it does."""
    cls = get_method(name)
    known = method_options(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"CAM method {name!r} takes no option {', '.join(map(repr, unknown))}; "
            f"its options: {', '.join(known)}"
        )
    return cls(model, target_layer, **options)
