"""CAM figures: teacher and student maps of fixed images, labelled, saved as PNG (matplotlib, Agg).

* :func:`cam_figure` — one student run: a row per image, columns input (true class, teacher and
  student prediction), teacher map, student map, and student - teacher with their agreement.
* :func:`map_grid` — the renderer it shares with :mod:`distill.explain` (any columns of maps).
* :class:`CamFigure` — the Lightning callback (``callbacks.cam_figure``) that draws
  :func:`cam_figure` for a fixed set of images every ``every_n_epochs`` and at the last epoch,
  writes ``<run_dir>/cam_grids/epoch_NNN.png`` and sends it to TensorBoard / wandb.

Display convention: each map is L2-normalized over its positions (the ``N`` of the loss
``|| N(L_s) - N(L_t) ||^2``), upsampled bilinearly to the input size and divided by the largest
absolute value among the maps compared in its row (teacher and student): one colour scale per row,
read off the colour bar as a fraction of that maximum. The difference column is
``N(L_s) - N(L_t)`` on the same scale. Agreement is the cosine similarity of the flattened maps at
CAM resolution (:func:`distill.losses.map_agreement`, the quantity logged as ``val/map_agreement``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn

import cams
from distill.data.augment import normalize_images
from distill.data.datasets import CIFAR10, DatasetSpec
from distill.losses import map_agreement

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "AGREEMENT",
    "CamFigure",
    "Column",
    "FigureImages",
    "Note",
    "cam_figure",
    "figure_images",
    "last_figure",
    "log_figure",
    "map_grid",
    "pick_images",
    "save_figure",
    "shared_scale",
]

AGREEMENT = "cosine similarity of the flattened maps at CAM resolution"
FONT = 10  # pt, every text of a figure
PANEL = 1.45  # inches, side of one image / map panel
GAP = 0.15  # inches between panels of a row
LINE = 0.2  # inches per line of text
RIGHT, WRONG = "#1a7f37", "#c62828"
SCALES = {"map": (0.0, "turbo"), "signed": (-1.0, "RdBu_r"), "diff": (-1.0, "RdBu_r")}
BAR_LABELS = {
    "map": "map / row maximum",
    "signed": "signed map / row maximum",
    "diff": "difference / row maximum",
}


# ----------------------------------------------------------------------------- images


def pick_images(labels: Tensor, per_class: int, max_classes: int | None = None) -> Tensor:
    """Positions of the first ``per_class`` entries of each class in ``labels`` (index order),
    class by class in ascending class order, for at most ``max_classes`` classes."""
    present = labels.unique(sorted=True)[:max_classes].tolist()
    picked = [(labels == c).nonzero().flatten()[:per_class] for c in present]
    return torch.cat(picked) if picked else torch.zeros(0, dtype=torch.long)


@dataclass(frozen=True)
class FigureImages:
    """Images of a figure: uint8 (N, 3, H, W), labels, index in their split, class names and
    the dataset (whose statistics normalize them for the networks)."""

    images: Tensor
    labels: Tensor
    indices: Tensor
    split: str  # "validation" (training-set indices) or "test"
    classes: tuple[str, ...]
    dataset: DatasetSpec = CIFAR10

    def normalized(self, device: torch.device | str | None = None) -> Tensor:
        """The images as the networks' input (normalized with the dataset's mean/std)."""
        return normalize_images(self.images.to(device), self.dataset)

    def class_name(self, label: int) -> str:
        return self.classes[label] if 0 <= label < len(self.classes) else str(label)

    @property
    def per_class(self) -> int:
        """The most images of one class."""
        return int(torch.bincount(self.labels).max()) if len(self.labels) else 0

    def row_labels(self) -> list[str]:
        prefix = "val" if self.split == "validation" else self.split
        return [f"{prefix} #{i}" for i in self.indices.tolist()]


def figure_images(
    datamodule: Any, per_class: int = 2, max_classes: int | None = 10, split: str = "auto"
) -> FigureImages:
    """The first ``per_class`` images of each class of the validation split (``split="auto"``
    when the datamodule has one, else the test set), in index order: the same every call.

    Reads ``val_indices``, ``train_images``/``train_labels``, ``test_images``/``test_labels`` and
    ``classes`` (class indices as names when absent) of :class:`distill.data.CIFAR10DataModule`.
    """
    val = getattr(datamodule, "val_indices", None)
    if split == "validation" or (split == "auto" and val is not None and len(val) > 0):
        indices = val.cpu().sort().values
        images, labels = datamodule.train_images[indices], datamodule.train_labels[indices]
        split = "validation"
    else:
        labels = datamodule.test_labels
        indices, images, split = torch.arange(len(labels)), datamodule.test_images, "test"
    pos = pick_images(labels.cpu(), per_class, max_classes)
    names = getattr(datamodule, "classes", None) or ()
    dataset = getattr(datamodule, "dataset", None)
    return FigureImages(
        images[pos].cpu(),
        labels[pos].cpu().long(),
        indices[pos],
        split,
        tuple(names),
        dataset if isinstance(dataset, DatasetSpec) else CIFAR10,
    )


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Note:
    """One line of text under a panel."""

    text: str
    color: str = "black"


@dataclass(frozen=True)
class Column:
    """A column of :func:`map_grid`: its header and, per image, the panel and its texts.

    ``kind``: ``"input"`` (the image itself; ``values`` unused), ``"map"`` (non-negative maps,
    ``[0, 1]``), ``"signed"`` (maps with negative values, ``[-1, 1]``) or ``"diff"`` (differences,
    ``[-1, 1]``). ``values`` are (N, H, W) display values already scaled (:func:`shared_scale`).
    """

    header: str
    kind: str = "map"
    values: Tensor | None = None
    titles: Sequence[str] = ()
    notes: Sequence[Sequence[Note]] = ()


def shared_scale(maps: Sequence[Tensor], size: tuple[int, int]) -> tuple[list[Tensor], Tensor]:
    """Display values of maps compared with each other: each (N, h, w) set L2-normalized per map,
    upsampled (bilinear) to ``size`` and divided, row by row, by the largest absolute value over
    all sets (the row's scale). Returns the scaled sets and the per-row scale (N,)."""
    ups = [cams.upsample(cams.normalize(m.detach().float().cpu(), "l2"), size) for m in maps]
    peak = torch.stack([u.flatten(1).abs().amax(1) for u in ups]).amax(0).clamp_min(1e-12)
    return [u / peak[:, None, None] for u in ups], peak


def _lines(text: str) -> int:
    return text.count("\n") + 1 if text else 0


def _inches_to_px(value: float, dpi: int) -> int:
    return int(round(value * dpi))


def _panel_pixels(column: Column, image: Tensor, i: int, side: int, norms: dict) -> np.ndarray:
    """RGB uint8 (side, side, 3) of panel ``i`` of ``column``: the image upsampled (nearest), or
    the values upsampled (bilinear) and coloured with the column's colour map."""
    if column.kind == "input":
        up = torch.nn.functional.interpolate(image[None], size=(side, side), mode="nearest")[0]
        return (up.clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()
    norm, cmap = norms[column.kind]
    values = cams.upsample(column.values[i : i + 1].float(), side)[0].numpy()
    return cmap(norm(values), bytes=True)[..., :3]


@dataclass(frozen=True)
class _Layout:
    """Geometry of :func:`map_grid` in inches, measured from the figure's top-left corner."""

    blocks: int
    rows: int
    left: float
    top: float
    row_h: float
    block_w: float
    title_h: float
    width: float
    height: float

    @classmethod
    def of(cls, n: int, columns: Sequence[Column], blocks: int, title: str, bars: int) -> _Layout:
        title_h = LINE * max((_lines(t) for c in columns for t in c.titles), default=0)
        notes_h = LINE * max((len(ns) for c in columns for ns in c.notes), default=0)
        header_h = LINE * max(_lines(c.header) for c in columns) + 0.1
        row_h = PANEL + title_h + notes_h + 0.15
        block_w = len(columns) * (PANEL + GAP) + 0.35
        left, right, top = 0.45, 1.05 * bars + 0.1, LINE * _lines(title) + 0.15 + header_h
        width = max(left + blocks * block_w + right, 8.2)  # >= 800 px at 100 dpi
        rows = max(1, math.ceil(n / blocks))
        height = top + rows * row_h + 0.1
        return cls(blocks, rows, left, top, row_h, block_w, title_h, width, height)

    def panel(self, i: int, j: int) -> tuple[float, float]:
        """Top-left corner of image ``i``'s panel in column ``j``."""
        r, b = divmod(i, self.blocks)
        return self.left + b * self.block_w + j * (
            PANEL + GAP
        ), self.top + r * self.row_h + self.title_h


def map_grid(
    images: Tensor,
    columns: Sequence[Column],
    *,
    blocks: int = 1,
    row_labels: Sequence[str] = (),
    title: str = "",
    bar_labels: Mapping[str, str] | None = None,
    dpi: int = 100,
) -> Figure:
    """A labelled grid: image ``i`` in grid row ``i // blocks``, block ``i % blocks``; each block
    holds one panel per column. Column headers on top, ``row_labels`` left of each block, per-image
    titles above and notes under the panels, a colour bar for each kind of map column (labelled
    by ``bar_labels[kind]``). Every text is at least 10 pt.

    ``images``: float (N, 3, H, W) in [0, 1]. The panels are composed at ``dpi`` into one image
    (no resampling when saved at ``fig.dpi``: :func:`save_figure`), the texts are figure texts.
    """
    import matplotlib
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    bars = [k for k in SCALES if k in {c.kind for c in columns}]
    lay = _Layout.of(len(images), columns, blocks, title, len(bars))
    fig = Figure(figsize=(lay.width, lay.height), dpi=dpi)
    norms = {k: (Normalize(low, 1.0), matplotlib.colormaps[c]) for k, (low, c) in SCALES.items()}

    def text(x: float, y: float, s: str, **kwargs: Any) -> None:  # inches from the top left
        fig.text(x / lay.width, 1 - y / lay.height, s, **{"fontsize": FONT, **kwargs})

    if title:
        text(lay.width / 2, 0.1, title, ha="center", va="top", fontsize=FONT + 2)
    for b in range(blocks):
        for j, col in enumerate(columns):
            x, _ = lay.panel(b, j)
            text(
                x + PANEL / 2,
                lay.top - 0.05,
                col.header,
                ha="center",
                va="bottom",
                fontweight="bold",
            )
    side = _inches_to_px(PANEL, dpi)
    canvas = np.zeros((_inches_to_px(lay.height, dpi), _inches_to_px(lay.width, dpi), 4), np.uint8)
    for i in range(len(images)):
        for j, col in enumerate(columns):
            x, y = lay.panel(i, j)
            px, py = _inches_to_px(x, dpi), _inches_to_px(y, dpi)
            panel = canvas[py : py + side, px : px + side]
            panel[..., :3] = _panel_pixels(col, images[i], i, side, norms)
            panel[..., 3] = 255
            for edge in (panel[0], panel[-1], panel[:, 0], panel[:, -1]):  # a thin frame
                edge[..., :3] = 64
            if i < len(col.titles) and col.titles[i]:
                text(x + PANEL / 2, y - 0.03, col.titles[i], ha="center", va="bottom")
            for k, note in enumerate(col.notes[i] if i < len(col.notes) else ()):
                text(
                    x + PANEL / 2,
                    y + PANEL + 0.03 + k * LINE,
                    note.text,
                    ha="center",
                    va="top",
                    color=note.color,
                )
        if i < len(row_labels):
            x, y = lay.panel(i, 0)
            text(x - 0.05, y + PANEL / 2, row_labels[i], ha="right", va="center", rotation=90)
    fig.figimage(canvas, xo=0, yo=0, origin="upper")
    _colour_bars(fig, lay, {k: norms[k] for k in bars}, {**BAR_LABELS, **(bar_labels or {})})
    return fig


def _colour_bars(
    fig: Figure, lay: _Layout, scales: Mapping[str, Any], labels: Mapping[str, str]
) -> None:
    """One colour bar per kind of map column, right of the grid, from the first row down."""
    from matplotlib.cm import ScalarMappable

    bar_h = min((lay.rows - 1) * lay.row_h + PANEL, 4.0)  # first panel top to last panel bottom
    for k, (kind, (norm, cmap)) in enumerate(scales.items()):
        x = lay.width - 1.05 * (len(scales) - k) + 0.05
        top = lay.top + lay.title_h
        cax = fig.add_axes(
            (x / lay.width, 1 - (top + bar_h) / lay.height, 0.15 / lay.width, bar_h / lay.height)
        )
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax)
        bar.set_label(labels[kind], fontsize=FONT)
        bar.ax.tick_params(labelsize=FONT)


def _verdict(prefix: str, pred: int, label: int, images: FigureImages) -> Note:
    right = pred == label
    mark = "\u2713" if right else "\u2717"
    return Note(f"{prefix}{images.class_name(pred)} {mark}", RIGHT if right else WRONG)


def cam_figure(
    images: FigureImages,
    teacher_maps: Tensor,
    student_maps: Tensor,
    teacher_logits: Tensor,
    student_logits: Tensor,
    *,
    method: str = "CAM",
    layer: str = "",
    names: tuple[str, str] = ("teacher", "student"),
    epoch: int | None = None,
    blocks: int = 1,
    dpi: int = 100,
) -> Figure:
    """The figure of one student run (see the module docstring for the colour scales).

    Columns: the input (title: true class; under it ``T:``/``S:`` the teacher's and student's
    predicted class, ✓ right / ✗ wrong), the teacher's and student's maps of the true class
    (one colour scale per row), ``student - teacher`` titled with their agreement (``cos``).
    """
    size = tuple(images.images.shape[-2:])
    (teacher, student), _ = shared_scale([teacher_maps, student_maps], size)
    kind = "signed" if bool((teacher < 0).any() or (student < 0).any()) else "map"
    agree = map_agreement(student_maps.detach().float().cpu(), teacher_maps.detach().float().cpu())
    labels = images.labels.tolist()
    t_pred = teacher_logits.argmax(1).tolist()
    s_pred = student_logits.argmax(1).tolist()
    inputs = Column(
        "input",
        kind="input",
        titles=[images.class_name(y) for y in labels],
        notes=[
            [_verdict("T: ", t, y, images), _verdict("S: ", s, y, images)]
            for t, s, y in zip(t_pred, s_pred, labels, strict=True)
        ],
    )
    columns = [
        inputs,
        Column(f"teacher\n{names[0]}", kind, teacher),
        Column(f"student\n{names[1]}", kind, student),
        Column(
            "student \u2212 teacher",
            kind="diff",
            values=student - teacher,
            titles=[f"cos {a:.2f}" for a in agree.tolist()],
        ),
    ]
    h, w = (
        min(a, b) for a, b in zip(teacher_maps.shape[-2:], student_maps.shape[-2:], strict=True)
    )
    at = f" at {layer}" if layer else ""
    when = f", end of epoch {epoch}" if epoch is not None else ""
    title = (
        f"{method} maps of the true class{at}{when}: {images.split} images "
        f"(first {images.per_class} of each class)\n"
        f"agreement (cos) = {AGREEMENT} ({h}x{w}); mean {agree.mean():.3f}. "
        f"T / S: teacher / student prediction"
    )
    return map_grid(
        images.images.float() / 255,
        columns,
        blocks=blocks,
        row_labels=images.row_labels(),
        title=title,
        bar_labels={
            "map": "map / row maximum (teacher and student share it)",
            "signed": "signed map / row maximum (teacher and student share it)",
            "diff": "student \u2212 teacher / row maximum",
        },
        dpi=dpi,
    )


def save_figure(fig: Figure, path: str | Path, palette: bool = False) -> Path:
    """Write ``fig`` as PNG at its own dpi (Agg; no pyplot state), creating the directory.

    ``palette``: a 256-colour PNG (median cut, no dithering; about 2.5x smaller, slight banding in
    smooth maps), e.g. for figures committed to documentation.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas = FigureCanvasAgg(fig)
    if not palette:
        fig.savefig(path, dpi=fig.dpi, format="png")
        return path
    canvas.draw()
    image = Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB")
    image = image.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    image.save(path, format="png", optimize=True)
    return path


def log_figure(loggers: Sequence[Any], path: Path, step: int, key: str = "cam_figure") -> None:
    """Send the PNG at ``path`` to the image-capable loggers: wandb (``log_image``; the run summary
    keeps the last one, its path as ``<key>_path``) and TensorBoard (``add_image``)."""
    import numpy as np
    from PIL import Image

    for logger in loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(logger, "log_image"):  # wandb
            logger.log_image(key=key, images=[str(path)], step=step)
            experiment.summary[f"{key}_path"] = str(path)
        elif hasattr(experiment, "add_image"):  # tensorboard
            with Image.open(path) as img:
                pixels = np.asarray(img.convert("RGB"))
            experiment.add_image(key, pixels, global_step=step, dataformats="HWC")


def last_figure(run_dir: str | Path, dirname: str = "cam_grids") -> Path | None:
    """The newest ``<run_dir>/cam_grids/epoch_NNN.png`` (the last epoch's figure), or None."""
    found = sorted(Path(run_dir, dirname).glob("epoch_*.png"))
    return found[-1] if found else None


# ----------------------------------------------------------------------------- callback


@contextmanager
def _eval_mode(*nets: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for net in nets for m in net.modules()]
    try:
        for net in nets:
            net.eval()
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _arch(net: nn.Module) -> str:
    return str(getattr(net, "arch", type(net).__name__))


class CamFigure(pl.Callback):
    """Draws :func:`cam_figure` of a student run every ``every_n_epochs`` epochs and at the last.

    The images are the first ``per_class`` of each of the first ``max_classes`` classes of the
    validation split, or of the test set when the run has none (:func:`figure_images`): the same
    every epoch and after a resume. Maps and predictions come from the module's own CAMs in eval
    mode: ``module.teacher.cam`` / ``module.teacher.net`` and ``module.student_cam`` /
    ``module.net``; a module without both CAMs (teacher, CE or KD-only runs) draws nothing.
    The PNG goes to ``<trainer.default_root_dir>/<dirname>/epoch_NNN.png`` (``dirname``:
    ``cam_grids``) and to the image loggers (:func:`log_figure`); rank zero only.
    """

    def __init__(
        self,
        every_n_epochs: int = 10,
        per_class: int = 2,
        max_classes: int = 10,
        dirname: str = "cam_grids",
        dpi: int = 100,
    ) -> None:
        self.every_n_epochs, self.per_class, self.max_classes = (
            every_n_epochs,
            per_class,
            max_classes,
        )
        self.dirname, self.dpi = dirname, dpi
        self.images: FigureImages | None = None
        self.last_path: Path | None = None

    def due(self, trainer: pl.Trainer) -> bool:
        """Every ``every_n_epochs``-th epoch and the last one (0: never)."""
        every, epoch = self.every_n_epochs, trainer.current_epoch + 1
        last = trainer.max_epochs is not None and epoch >= trainer.max_epochs > 0
        return every > 0 and (epoch % every == 0 or last)

    def render(self, trainer: pl.Trainer, module: pl.LightningModule) -> Figure | None:
        """The figure of the module's current weights (None: no CAMs or no datamodule)."""
        student_cam = getattr(module, "student_cam", None)
        teacher = getattr(module, "teacher", None)
        teacher_cam = getattr(teacher, "cam", None)
        datamodule = getattr(trainer, "datamodule", None)
        if student_cam is None or teacher_cam is None or datamodule is None:
            return None
        if self.images is None:
            self.images = figure_images(datamodule, self.per_class, self.max_classes)
        images = self.images
        x = images.normalized(module.device)
        y = images.labels.to(module.device)
        with _eval_mode(module.net, teacher.net), torch.enable_grad():
            teacher_maps, student_maps = teacher_cam(x, y), student_cam(x, y)
            with torch.no_grad():
                teacher_logits, student_logits = teacher.net(x), module.net(x)
        return cam_figure(
            images,
            teacher_maps.cpu(),
            student_maps.cpu(),
            teacher_logits.float().cpu(),
            student_logits.float().cpu(),
            method=type(student_cam).__name__,
            layer=str(getattr(student_cam, "target_name", "")),
            names=(_arch(teacher.net), _arch(module.net)),
            epoch=trainer.current_epoch,
            blocks=self.per_class if len(images.classes) > 1 else 1,
            dpi=self.dpi,
        )

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.due(trainer) or not trainer.is_global_zero:
            return
        fig = self.render(trainer, pl_module)
        if fig is None:
            if getattr(pl_module, "student_cam", None) is not None:
                rank_zero_warn("CamFigure: no datamodule on the trainer; no CAM figure drawn")
            return
        name = f"epoch_{trainer.current_epoch:03d}.png"
        path = save_figure(fig, Path(trainer.default_root_dir) / self.dirname / name)
        log_figure(trainer.loggers, path, trainer.global_step)
        self.last_path = path
