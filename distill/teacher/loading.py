"""Glue between the training code and :mod:`cams`: building CAM methods by name, teacher loading."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

import cams
from distill.integrity import IntegrityError, checksum_path, sha256_file
from distill.losses import LossConfigError


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


class TeacherError(RuntimeError):
    """The teacher checkpoint is missing or does not fit the teacher architecture."""


def teacher_digest(checkpoint: str | Path) -> str:
    """SHA-256 of a teacher checkpoint file, verified against its ``.sha256`` sidecar when it has
    one (checkpoints written by ``train.py`` do; hand-made files may not).

    Raises :class:`TeacherError` for a missing path, a directory, an empty file or a mismatch.
    """
    from distill.checkpointing import verify_checkpoint  # Lightning: imported when needed

    path = Path(checkpoint)
    fix = "set teacher.checkpoint to a .ckpt file, e.g. <teacher run>/checkpoints/last.ckpt"
    if not path.exists():
        raise TeacherError(f"teacher checkpoint {path} does not exist; {fix}")
    if path.is_dir():
        raise TeacherError(f"teacher checkpoint {path} is a directory; {fix}")
    if path.stat().st_size == 0:
        raise TeacherError(f"teacher checkpoint {path} is an empty file; {fix}")
    if not checksum_path(path).is_file():
        return sha256_file(path)
    try:
        return verify_checkpoint(path, fix="retrain the teacher or restore its checkpoint")
    except IntegrityError as err:
        raise TeacherError(str(err)) from None


def load_teacher(net: nn.Module, checkpoint: str | Path, arch: str = "") -> nn.Module:
    """Load a Lightning checkpoint's ``net.*`` weights into ``net``; freeze it in eval mode.

    The file is verified first (:func:`teacher_digest`); unreadable files raise
    :class:`TeacherError` naming the path.
    """
    path = Path(checkpoint)
    teacher_digest(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # text file, truncated zip, foreign pickle, ...
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise TeacherError(
            f"teacher checkpoint {path} is not a readable checkpoint ({reason[:120]}); set "
            "teacher.checkpoint to a Lightning .ckpt file, e.g. <teacher run>/checkpoints/last.ckpt"
        ) from None
    if not isinstance(ckpt, Mapping):
        raise TeacherError(
            f"teacher checkpoint {path} holds a {type(ckpt).__name__}, not a checkpoint dict; "
            "set teacher.checkpoint to a Lightning .ckpt file"
        )
    state = ckpt.get("state_dict", ckpt)
    try:
        weights = {
            k.removeprefix("net.").removeprefix("_orig_mod."): v
            for k, v in state.items()
            if k.startswith("net.")
        } or state
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, AttributeError) as err:
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
