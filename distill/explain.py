"""Glue between the training code and :mod:`cams`: building CAM methods by name, teacher loading."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cams

METHODS: dict[str, type] = {
    "gradcam": cams.GradCAM,
    "gradcampp": cams.GradCAMPlusPlus,
    "scorecam": cams.ScoreCAM,
    "shapleycam": cams.ShapleyCAM,
    "shapcam": cams.ShapCAM,
}


def build_cam(method: str, model: nn.Module, layer: str, options: Mapping[str, Any] | None = None):
    """A :mod:`cams` method by its preset name (``gradcam``, ``gradcampp``, ...)."""
    if method not in METHODS:
        raise ValueError(f"unknown CAM method {method!r}; choose one of {sorted(METHODS)}")
    return METHODS[method](model, layer, **dict(options or {}))


class TeacherError(RuntimeError):
    """The teacher checkpoint is missing or does not fit the teacher architecture."""


def load_teacher(net: nn.Module, checkpoint: str | Path, arch: str = "") -> nn.Module:
    """Load a Lightning checkpoint's ``net.*`` weights into ``net``; freeze it in eval mode."""
    path = Path(checkpoint)
    if not path.exists():
        raise TeacherError(f"teacher checkpoint {path} does not exist; set teacher.checkpoint=PATH")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt)
    weights = {
        k.removeprefix("net.").removeprefix("_orig_mod."): v
        for k, v in state.items()
        if k.startswith("net.")
    } or state
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        found = ckpt.get("hyper_parameters", {}).get("arch", "another architecture")
        raise TeacherError(
            f"teacher checkpoint {path} holds {found}, which does not fit teacher.model "
            f"{arch or type(net).__name__}: set teacher.model to the checkpoint's architecture "
            f"or point teacher.checkpoint at a matching run ({str(err).splitlines()[0]})"
        ) from None
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def resolve_teacher_checkpoint(checkpoint: str | None, run_dir: str, train_command: str) -> str:
    """``checkpoint`` if given, else the finished teacher run for this teacher config.

    A teacher run counts as finished when its ``metrics.json`` exists (written after the final
    test); otherwise stop with the exact command that trains it.
    """
    if checkpoint:
        if not Path(checkpoint).exists():
            raise TeacherError(
                f"teacher checkpoint {checkpoint} does not exist; fix teacher.checkpoint=PATH"
            )
        return str(checkpoint)
    run = Path(run_dir)
    train_command = train_command.replace("=None", "=null")  # Hydra's spelling of a missing value
    if (run / "metrics.json").exists() and (run / "checkpoints" / "last.ckpt").exists():
        return str(run / "checkpoints" / "last.ckpt")
    raise TeacherError(
        f"no trained teacher found at {run} (teacher.checkpoint is not set). Train it first:\n"
        f"    {train_command}\nor pass teacher.checkpoint=PATH"
    )
