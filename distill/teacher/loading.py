"""Finding, verifying and loading a teacher checkpoint (frozen, eval mode).

* :func:`resolve_teacher_checkpoint` — ``teacher.checkpoint``, or the finished run of
  ``python train.py experiment=teacher`` for this data (else the command that trains it).
* :func:`teacher_digest` — the checkpoint's SHA-256, verified against its ``.sha256`` sidecar.
* :func:`load_teacher` — its ``net.*`` weights into the teacher architecture, frozen.
* :func:`check_teacher_data` — refuse a teacher whose run recorded other training images.

Every refusal is a :class:`TeacherError` naming the file and the fix.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from distill.integrity import IntegrityError, checksum_path, sha256_file

__all__ = [
    "TeacherError",
    "check_teacher_data",
    "load_teacher",
    "resolve_teacher_checkpoint",
    "teacher_digest",
]


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


def load_teacher(net: nn.Module, checkpoint: str | Path) -> nn.Module:
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
            f"{type(net).__name__}: set teacher.model to the checkpoint's architecture "
            f"or point teacher.checkpoint at a matching run ({str(err).splitlines()[0]})"
        ) from None
    net.eval()
    for param in net.parameters():
        param.requires_grad_(False)
    return net


def resolve_teacher_checkpoint(checkpoint: str | None, run_dir: str, train_command: str) -> str:
    """``checkpoint`` if given, else the finished teacher run for this teacher config.

    A teacher run counts as finished when its ``metrics.json`` exists (written after the final
    test); otherwise stop with the exact command that trains it and the finished teacher runs
    for the same data (:func:`other_teacher_runs`), each with the override that selects it.
    """
    if checkpoint:
        if not Path(checkpoint).exists():
            raise TeacherError(
                f"teacher checkpoint {checkpoint} does not exist; fix teacher.checkpoint=PATH"
            )
        return str(checkpoint)
    run = Path(run_dir)
    train_command = train_command.replace("=None", "=null")  # Hydra's spelling of a missing value
    if _finished(run):
        return str(run / "checkpoints" / "last.ckpt")
    others = other_teacher_runs(run)
    found = "".join(f"\n    {' '.join(o)}    ({r})" for r, o in others.items())
    found = f"\nTrained teachers for the same data (add the override to use one):{found}"
    raise TeacherError(
        f"no trained teacher found at {run} (teacher.checkpoint is not set). Train it first:\n"
        f"    {train_command}\nor pass teacher.checkpoint=PATH" + (found if others else "")
    )


# experiment=teacher's run name: <model>-<source>-sub<subset>-e<epochs>-s<seed>-d<key>, with
# <model> a registry name (distill.models: wrn40_2, resnet56, ...; never contains "-")
_TEACHER_RUN = re.compile(
    r"^(?P<model>[a-z][a-z0-9_]*)-(?P<data>.+-sub.*)"
    r"-e(?P<epochs>\d+)-s(?P<seed>-?\d+)-(?P<key>d[0-9a-f]{8})$"
)
_SELECTS = {  # run-name field -> the student override that selects it (model: _model_selects)
    "epochs": "teacher.epochs",
    "seed": "teacher.seed",
}


def _parse_run(name: str) -> re.Match[str] | None:
    """The fields of a teacher run name whose model part is a registered model, else None."""
    from distill.models import canonical_name

    found = _TEACHER_RUN.match(name)
    return found if found and canonical_name(found["model"]) == found["model"] else None


def _model_selects(wanted: str, found: str) -> list[str]:
    """The overrides that turn teacher model ``wanted`` into ``found`` (registry names):
    ``teacher.model.depth=..``/``widen_factor=..`` between WRNs, else ``model@teacher.model=<name>``
    (plus the WRN depth and width when ``found`` is a WRN without its own config)."""
    from distill.models import model_names

    wrn = re.compile(r"wrn(\d+)_(\d+)")
    w, f = wrn.fullmatch(wanted), wrn.fullmatch(found)
    if wanted == found:
        return []
    if w and f:
        keys = ("teacher.model.depth", "teacher.model.widen_factor")
        return [f"{k}={b}" for k, a, b in zip(keys, w.groups(), f.groups(), strict=True) if a != b]
    if f and found not in model_names():
        return [
            "model@teacher.model=wrn40_2",
            f"teacher.model.depth={f[1]}",
            f"teacher.model.widen_factor={f[2]}",
        ]
    return [f"model@teacher.model={found}"]


def _finished(run: Path) -> bool:
    return (run / "metrics.json").is_file() and (run / "checkpoints" / "last.ckpt").is_file()


def other_teacher_runs(run: Path) -> dict[Path, list[str]]:
    """The finished teacher runs beside ``run`` trained on the same data (same source, subset
    and data key), any registered model, each with the overrides (``teacher.epochs=1``,
    ``model@teacher.model=resnet56``, ...) that select it."""
    wanted = _parse_run(run.name)
    if wanted is None or not run.parent.is_dir():
        return {}
    out: dict[Path, list[str]] = {}
    for other in sorted(run.parent.iterdir()):
        found = _parse_run(other.name)
        same_data = found and all(found[k] == wanted[k] for k in ("data", "key"))
        if other != run and same_data and _finished(other):
            selects = _model_selects(wanted["model"], found["model"])
            selects += [f"{o}={found[f]}" for f, o in _SELECTS.items() if found[f] != wanted[f]]
            out[other] = selects
    return out


def check_teacher_data(checkpoint: str | Path, dataset_id: str | None) -> None:
    """Refuse a teacher whose run recorded other training images than ``dataset_id`` (the
    ``dataset_id`` of ``<run>/metrics.json`` beside ``<run>/checkpoints/<file>``); teachers
    without a run record are not checked."""
    record = Path(checkpoint).parent.parent / "metrics.json"
    try:
        theirs = json.loads(record.read_text()).get("dataset_id")
    except (OSError, ValueError):
        return
    if theirs and dataset_id and theirs != dataset_id:
        raise TeacherError(
            f"teacher {checkpoint} was trained on dataset {theirs}, this run "
            f"uses {dataset_id}: train a teacher on this data (python train.py experiment=teacher "
            "with the same data.* options) or set teacher.checkpoint to one trained on it"
        )
