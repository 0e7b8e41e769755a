"""``python -m distill.explain``: a teacher's and its students' CAMs side by side on the same
images, for each CAM method (a paper's figure 1), with each student's map agreement.

    python -m distill.explain results/cpu-mini/runs/ce_kd-s0 results/cpu-mini/runs/gradcam_kd-s0
    python -m distill.explain --teacher T.ckpt KD=runs/a/checkpoints/last.ckpt CAM=runs/b \\
        --methods gradcam,gradcampp --out figures/explain.png

A network is a run directory (``<run>/checkpoints/last.ckpt``, built from
``<run>/config_resolved.yaml``) or a checkpoint file (its run's config when it lies in
``<run>/checkpoints/``, else the registered model the checkpoint's ``arch`` names: ``wrn-D-K``,
``resnet56``, ...); a student may be named ``LABEL=PATH`` (default label: the run directory's
name). The teacher defaults to the first student's (``module.teacher_checkpoint`` of its run
config). The images are the first ``--per-class`` test images of each class of the first run's
data (``--data`` overrides it with ``train.py`` data overrides). Methods default to the
students' ``loss.method`` (else Grad-CAM); each side's CAM options are those of a run trained
with the method, else of its preset (``configs/loss/<method>.yaml``).

Writes the PNG (:func:`distill.visualize.map_grid`: one colour scale per image and method, shared
by the teacher and the students) and beside it ``<stem>.json`` and ``<stem>.md`` with each
student's agreement per method: the cosine similarity of its flattened map with the teacher's
(:data:`distill.visualize.AGREEMENT`), per image and the mean. :func:`explain_figure` is the
Python entry point (e.g. for the harness report). Bad input prints ``error: ...``, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

import cams
from distill.integrity import IntegrityError, checksum_path
from distill.losses import map_agreement
from distill.visualize import (
    AGREEMENT,
    Column,
    FigureImages,
    Note,
    figure_images,
    map_grid,
    save_figure,
    shared_scale,
)

__all__ = ["ExplainError", "Network", "explain_figure", "load_network", "main"]

CHECKPOINT = Path("checkpoints") / "last.ckpt"
CONFIG = "config_resolved.yaml"
RIGHT, WRONG = "#1a7f37", "#c62828"


class ExplainError(ValueError):
    """Bad input to :mod:`distill.explain` (a path, a label, a method, an option)."""


@dataclass
class Network:
    """A loaded network (eval mode, frozen) with its label, checkpoint and run config."""

    label: str
    net: nn.Module
    checkpoint: Path
    config: DictConfig | None

    @property
    def arch(self) -> str:
        return str(getattr(self.net, "arch", type(self.net).__name__))


# ----------------------------------------------------------------------------- loading


def locate(path: str | Path) -> tuple[Path, Path | None]:
    """``(checkpoint, run config or None)`` of a run directory or a checkpoint file."""
    p = Path(path)
    if p.is_dir():
        ckpt = p / CHECKPOINT
        if not ckpt.is_file():
            raise ExplainError(
                f"{p} has no {CHECKPOINT}: pass a finished run directory or a .ckpt file"
            )
        run = p
    elif p.is_file():
        ckpt, run = p, p.parent.parent if p.parent.name == "checkpoints" else p.parent
    else:
        raise ExplainError(f"{p} does not exist: pass a run directory or a .ckpt file")
    config = run / CONFIG
    return ckpt, config if config.is_file() else None


def read_checkpoint(path: Path) -> Mapping[str, Any]:
    """The checkpoint dict, verified against its ``.sha256`` sidecar when it has one."""
    from distill.checkpointing import verify_checkpoint

    if checksum_path(path).is_file():
        try:
            verify_checkpoint(path, fix="retrain the run or restore its checkpoint")
        except IntegrityError as err:
            raise ExplainError(str(err)) from None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # text file, truncated zip, foreign pickle, ...
        reason = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise ExplainError(f"{path} is not a readable checkpoint ({reason})") from None
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict", ckpt), Mapping):
        raise ExplainError(f"{path} holds a {type(ckpt).__name__}, not a Lightning checkpoint")
    return ckpt


def _net_weights(ckpt: Mapping[str, Any]) -> dict[str, Tensor]:
    state = ckpt.get("state_dict", ckpt)
    return {
        k.removeprefix("net.").removeprefix("_orig_mod."): v
        for k, v in state.items()
        if k.startswith("net.")
    }


def _recorded_arch(ckpt: Mapping[str, Any]) -> str | None:
    arch = ckpt.get("arch") or (ckpt.get("hyper_parameters") or {}).get("arch")
    return str(arch) if arch else None


def _build_from_arch(ckpt: Mapping[str, Any], path: Path) -> nn.Module:
    """The registered model the checkpoint's ``arch`` names (``wrn-40-2``, ``wrn40_2``,
    ``resnet56``, ...; :func:`distill.models.canonical_name`), with its ``fc`` classes."""
    from distill.models import build_model, canonical_name, model_names

    arch = _recorded_arch(ckpt)
    name = canonical_name(arch or "")
    fc = _net_weights(ckpt).get("fc.weight")
    if name is None or fc is None:
        raise ExplainError(
            f"{path}: no run config ({CONFIG}) beside it and no registered architecture recorded "
            f"in it ({arch or 'none'}; known: {', '.join(model_names())}, wrn<depth>_<width>); "
            "pass its run directory instead"
        )
    return build_model(name, num_classes=int(fc.shape[0]))


def load_network(path: str | Path, label: str | None = None, model: Any | None = None) -> Network:
    """Load a run directory or checkpoint (see the module docstring) frozen in eval mode.

    ``model``: the architecture config to build when the checkpoint has no run config beside it
    (e.g. a student run's ``teacher.model``); the run config's ``model`` comes first.
    """
    import hydra

    ckpt_path, config_path = locate(path)
    config = OmegaConf.load(config_path) if config_path is not None else None
    ckpt = read_checkpoint(ckpt_path)
    model = config.model if config is not None and "model" in config else model
    net = hydra.utils.instantiate(model) if model is not None else None
    net = net if isinstance(net, nn.Module) else _build_from_arch(ckpt, ckpt_path)
    weights = _net_weights(ckpt)
    try:
        net.load_state_dict(weights)
    except RuntimeError as err:
        found = _recorded_arch(ckpt) or "another architecture"
        raise ExplainError(
            f"{ckpt_path} holds {found} weights that do not fit {getattr(net, 'arch', net)} "
            f"({str(err).splitlines()[0]}); pass the run directory it was trained in"
        ) from None
    net.eval().requires_grad_(False)
    if label is None:
        label = ckpt_path.parent.parent.name if ckpt_path.parent.name == "checkpoints" else None
        label = label or ckpt_path.stem
    return Network(label, net, ckpt_path, config)


def _teacher_path(students: Sequence[Network]) -> str:
    for s in students:
        cfg = s.config
        found = cfg is not None and OmegaConf.select(cfg, "module.teacher_checkpoint")
        if found and not Path(found).exists():
            raise ExplainError(
                f"the teacher recorded by {s.label}, {found}, does not exist: pass --teacher PATH"
            )
        if found:
            return str(found)
    raise ExplainError("no student run records its teacher: pass --teacher PATH")


def _teacher_model(students: Sequence[Network]) -> Any | None:
    for s in students:
        found = s.config is not None and OmegaConf.select(s.config, "teacher.model")
        if found:
            return found
    return None


# ----------------------------------------------------------------------------- CAMs


def cam_options(method: str, side: str, students: Sequence[Network] = ()) -> dict[str, Any]:
    """``side``'s (``"teacher"``/``"student"``) CAM options of ``method``: those of a student run
    trained with it, else those of the preset ``configs/loss/<method>.yaml``, else none."""
    from distill.loss_config import LossConfig
    from distill.presets import loss_presets

    for s in students:
        loss = s.config is not None and OmegaConf.select(s.config, "loss")
        if loss and loss.get("method") == method:
            return LossConfig.from_mapping(loss).options(side)
    if method not in loss_presets():
        return {}
    from hydra import compose, initialize_config_dir

    from distill.train import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"loss={method}"])
    return LossConfig.from_mapping(cfg.loss).options(side)


def _maps(
    method: str,
    net: Network,
    side: str,
    layer: str,
    students: Sequence[Network],
    x: Tensor,
    y: Tensor,
) -> Tensor:
    from distill.loss_config import build_cam

    if layer not in dict(net.net.named_modules()):
        raise ExplainError(
            f"--layer {layer!r} is not a module of {net.label} ({net.arch}); e.g. block3 or relu"
        )
    cam = build_cam(method, net.net, layer, cam_options(method, side, students))
    with torch.enable_grad():
        return cam(x, y).detach().float().cpu()


def _layer(net: Network, layer: str | None) -> str:
    """``layer``, or the network's declared ``cam_layer`` when None."""
    from distill.objectives.base import declared_layer

    return declared_layer(net.net, layer, "--layer", ExplainError)


def _default_methods(students: Sequence[Network]) -> list[str]:
    found = [OmegaConf.select(s.config, "loss.method") for s in students if s.config is not None]
    return list(dict.fromkeys(m for m in found if m)) or ["gradcam"]


def _images(
    networks: Sequence[Network], data: Sequence[str] | None, per_class: int, max_classes: int
) -> FigureImages:
    """Test images of the first run's data (or of ``train.py`` ``data`` overrides)."""
    from distill.train import instantiate

    if data:
        from hydra import compose, initialize_config_dir

        from distill.train import CONFIG_DIR

        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=list(data))
        data_cfg = cfg.data
    else:
        configs = [n.config for n in networks if n.config is not None and "data" in n.config]
        if not configs:
            raise ExplainError(
                "no run config (config_resolved.yaml) beside any checkpoint says which data: "
                "pass run directories or --data data=cifar10_folder"
            )
        data_cfg = configs[0].data
    datamodule = instantiate(data_cfg)
    datamodule.load()
    return figure_images(datamodule, per_class, max_classes, split="test")


# ----------------------------------------------------------------------------- figure


def _verdict(pred: int, label: int, images: FigureImages) -> Note:
    mark = "\u2713" if pred == label else "\u2717"
    return Note(f"{images.class_name(pred)} {mark}", RIGHT if pred == label else WRONG)


def _check_counts(per_class: int, max_classes: int) -> None:
    if per_class < 1 or max_classes < 1:
        raise ExplainError(
            f"--per-class and --max-classes must be >= 1, got {per_class} and {max_classes}"
        )


def explain_figure(
    teacher_ckpt: str | Path | None,
    student_ckpts: Mapping[str, str | Path],
    images: FigureImages | None = None,
    methods: Sequence[str] | None = None,
    out_path: str | Path = "explain.png",
    *,
    layer: str | None = None,
    per_class: int = 1,
    max_classes: int = 10,
    data: Sequence[str] | None = None,
    device: str | None = None,
    dpi: int = 100,
    palette: bool = False,
) -> Path:
    """Render the teacher's and each student's maps of ``methods`` on ``images`` to ``out_path``
    (PNG) and write each student's agreement beside it (``<stem>.json``, ``<stem>.md``).

    Args:
        teacher_ckpt: the teacher's run directory or checkpoint; None: the first student's.
        student_ckpts: ``{label: run directory or checkpoint}`` (one or more, in column order).
        images: the images (:func:`distill.visualize.figure_images`); None: the first
            ``per_class`` test images of each of the first ``max_classes`` classes of the first
            run's data, or of ``data`` (``train.py`` overrides such as ``data=cifar10_folder``).
        methods: :data:`cams.METHODS` names; None: the students' ``loss.method`` (else gradcam).
        layer: the CAM target layer of every network (None: each network's declared
            ``cam_layer``; maps of different sizes are compared average-pooled to the smaller).
        device: where the CAMs run (default: CUDA when available).
        palette: write a 256-colour PNG (:func:`distill.visualize.save_figure`).

    Returns the PNG's path. Raises :class:`ExplainError` (and the data/config errors of
    ``train.py``) for bad input.
    """
    if not student_ckpts:
        raise ExplainError("no student given: pass one or more run directories or checkpoints")
    _check_counts(per_class, max_classes)
    students = [load_network(p, label) for label, p in student_ckpts.items()]
    teacher_path = teacher_ckpt if teacher_ckpt is not None else _teacher_path(students)
    teacher = load_network(teacher_path, "teacher", model=_teacher_model(students))
    methods = list(methods) if methods else _default_methods(students)
    unknown = [m for m in methods if m not in cams.METHODS]
    if unknown:
        raise ExplainError(
            f"unknown CAM method {', '.join(unknown)}; choose from {', '.join(cams.METHODS)}"
        )
    if images is None:
        images = _images([*students, teacher], data, per_class, max_classes)
    if len(images.labels) == 0:
        raise ExplainError("no images to explain (empty test set)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x, y = images.normalized(dev), images.labels.to(dev)
    nets = [teacher, *students]
    preds = {}
    for n in nets:
        n.net.to(dev)
        with torch.no_grad():
            preds[n.label] = n.net(x).argmax(1).cpu().tolist()
    layers = [_layer(n, layer) for n in nets]
    maps = {
        m: [
            _maps(m, n, "teacher" if n is teacher else "student", at, students, x, y)
            for n, at in zip(nets, layers, strict=True)
        ]
        for m in methods
    }
    layer = "/".join(dict.fromkeys(layers))  # the label: one name when all networks agree
    agreement = {
        s.label: {m: map_agreement(maps[m][k + 1], maps[m][0]).tolist() for m in methods}
        for k, s in enumerate(students)
    }
    out = Path(out_path)
    fig = _render(images, teacher, students, methods, maps, preds, agreement, layer, dpi)
    save_figure(fig, out, palette=palette)
    _write_agreement(out, images, teacher, students, methods, layer, agreement)
    return out


def _render(
    images: FigureImages,
    teacher: Network,
    students: Sequence[Network],
    methods: Sequence[str],
    maps: Mapping[str, Sequence[Tensor]],
    preds: Mapping[str, list[int]],
    agreement: Mapping[str, Mapping[str, list[float]]],
    layer: str,
    dpi: int,
) -> Any:
    labels = images.labels.tolist()
    columns = [Column("input", kind="input", titles=[images.class_name(c) for c in labels])]
    for m in methods:
        name = cams.METHODS[m].__name__
        scaled, _ = shared_scale(maps[m], tuple(images.images.shape[-2:]))
        kind = "signed" if any(bool((s < 0).any()) for s in scaled) else "map"
        for k, (net, values) in enumerate(zip([teacher, *students], scaled, strict=True)):
            notes = [
                [_verdict(p, c, images)] for p, c in zip(preds[net.label], labels, strict=True)
            ]
            if k == 0:
                columns.append(Column(f"{name}\nteacher\n{net.arch}", kind, values, notes=notes))
                continue
            cos = agreement[net.label][m]
            mean = sum(cos) / len(cos)
            columns.append(
                Column(
                    f"{name}\n{net.label}\nmean cos {mean:.2f}",
                    kind,
                    values,
                    notes=notes,
                    titles=[f"cos {a:.2f}" for a in cos],
                )
            )
    h = min(m.shape[-2] for m in maps[methods[0]])
    w = min(m.shape[-1] for m in maps[methods[0]])
    title = (
        f"True-class CAMs at {layer}: teacher ({teacher.arch}) and {len(students)} student(s), "
        f"{images.split} images (first {images.per_class} of each class)\n"
        f"cos: {AGREEMENT} ({h}x{w}), student vs teacher; under each map: that network's "
        "prediction"
    )
    return map_grid(
        images.images.float() / 255,
        columns,
        row_labels=images.row_labels(),
        title=title,
        bar_labels={
            "map": "map / maximum of its row and method",
            "signed": "signed map / maximum of its row and method",
        },
        dpi=dpi,
    )


def _write_agreement(
    out: Path,
    images: FigureImages,
    teacher: Network,
    students: Sequence[Network],
    methods: Sequence[str],
    layer: str,
    agreement: Mapping[str, Mapping[str, list[float]]],
) -> None:
    """``<stem>.json`` (per image and mean) and ``<stem>.md`` (a table of the means)."""
    means = {s: {m: sum(v) / len(v) for m, v in per.items()} for s, per in agreement.items()}
    record = {
        "figure": out.name,
        "agreement": AGREEMENT,
        "layer": layer,
        "teacher": str(teacher.checkpoint),
        "students": {s.label: str(s.checkpoint) for s in students},
        "methods": list(methods),
        "images": {
            "split": images.split,
            "indices": images.indices.tolist(),
            "labels": images.labels.tolist(),
        },
        "mean_agreement": means,
        "per_image_agreement": agreement,
    }
    out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    names = [cams.METHODS[m].__name__ for m in methods]
    lines = [
        f"Map agreement with the teacher ({AGREEMENT}, {layer}), mean over the "
        f"{len(images.labels)} {images.split} images of [{out.name}]({out.name}):",
        "",
        "| student | " + " | ".join(names) + " |",
        "|---|" + "---|" * len(names),
        *(
            f"| {s} | " + " | ".join(f"{means[s][m]:.3f}" for m in methods) + " |"
            for s in agreement
        ),
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------------------- CLI


def _labelled(spec: str) -> tuple[str | None, str]:
    """``LABEL=PATH`` or ``PATH``."""
    label, sep, path = spec.partition("=")
    if sep and label and "/" not in label:
        return label, path
    return None, spec


def parse_students(specs: Sequence[str]) -> dict[str, str]:
    """``{label: path}``; a label defaults to the run directory's name (resolved when loading)."""
    found: dict[str, str] = {}
    for spec in specs:
        label, path = _labelled(spec)
        if label is None:
            p = Path(path)
            label = p.parent.parent.name if p.parent.name == "checkpoints" else p.name
            label = label.removesuffix(".ckpt") or path
        if label in found:
            raise ExplainError(
                f"two students are labelled {label!r}: name them LABEL=PATH (e.g. kd={path})"
            )
        found[label] = path
    return found


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill.explain",
        description="Teacher and student CAMs side by side on the same images, with agreement.",
    )
    parser.add_argument(
        "students",
        nargs="+",
        metavar="STUDENT",
        help="student run directory or checkpoint, optionally LABEL=PATH",
    )
    parser.add_argument(
        "--teacher",
        help="teacher run directory or checkpoint (default: the first student's teacher)",
    )
    parser.add_argument(
        "--methods",
        help="comma-separated CAM methods (default: the students' loss.method, else gradcam)",
    )
    parser.add_argument(
        "--layer", help="CAM target layer (default: each network's cam_layer, WRN: block3)"
    )
    parser.add_argument("--per-class", type=int, default=1, help="images per class (default 1)")
    parser.add_argument("--max-classes", type=int, default=10, help="classes shown (default 10)")
    parser.add_argument(
        "--data",
        action="append",
        metavar="OVERRIDE",
        help="train.py data override for the images, repeatable (default: the first run's data)",
    )
    parser.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--dpi", type=int, default=100)
    parser.add_argument(
        "--palette", action="store_true", help="256-colour PNG (about 2.5x smaller)"
    )
    parser.add_argument("--out", default="explain.png", help="PNG path (default explain.png)")
    args = parser.parse_args(argv)
    from distill.loss_config import LossConfigError
    from distill.train import USER_ERRORS

    try:
        out = explain_figure(
            args.teacher,
            parse_students(args.students),
            methods=args.methods.split(",") if args.methods else None,
            out_path=args.out,
            layer=args.layer,
            per_class=args.per_class,
            max_classes=args.max_classes,
            data=args.data,
            device=args.device,
            dpi=args.dpi,
            palette=args.palette,
        )
    except (ExplainError, LossConfigError, *USER_ERRORS) as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    print(f"figure: {out}\nagreement: {out.with_suffix('.md')}", flush=True)
    print(out.with_suffix(".md").read_text(), end="", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
