"""Explanation fidelity of a run, measured on the test set after training (Lightning callback).

:class:`FidelityCallback` runs inside ``trainer.test`` on the test batches as given (normalized,
not augmented), under the trainer's precision, and logs (in ``metrics.json`` with ``_`` for
``/``, :func:`fidelity_metrics`; means over the measured images, fractions in [0, 1] but the KL,
the image count and the seconds):

* prediction fidelity (Stanton et al. 2021), runs with a teacher (students; the CE baseline when
  ``teacher.checkpoint`` is given):
  ``fidelity/top1_agreement`` = mean ``1[argmax s = argmax t]``;
  ``fidelity/kl_teacher_student`` = mean ``KL(p_t || p_s) = sum_k p_t,k (log p_t,k - log p_s,k)``
  (softmax at T = 1; in nats, >= 0, not bounded by 1);
* explanation agreement, runs with a teacher: mean per-image cosine of the flattened true-class maps
  of student and teacher (average-pooled to the smaller when their sizes differ),
  ``fidelity/map_cosine_gradcam`` with Grad-CAM at ``layer`` (default: each net's ``cam_layer``)
  for every cell (one yardstick), ``fidelity/map_cosine_own`` with the cell's own CAM
  (``loss.method`` at ``loss.student_layer`` / ``loss.teacher_layer`` with the loss's CAM
  options, overridden by ``own_cam[method]``) when it has one. A map that is all zero has
  cosine 0 with anything (:func:`distill.losses.map_agreement`);
* faithfulness of the run's own net's Grad-CAM maps at ``layer`` (every run, the teacher's too):
  ``faithfulness/average_drop``, ``increase_in_confidence``, ``coherency``, ``complexity`` and
  ``adcc`` from :mod:`cams.metrics` (the author's pipeline: the class is the model's prediction);
* ``fidelity/images`` (how many test images were measured) and ``fidelity/seconds`` (wall time of
  the measurement, loading a teacher and building the CAMs included; the slowest process).

``max_images`` limits the measurement to evenly spaced test images (indices ``i`` with
``i % ceil(n_test / max_images) == 0``: every class when the set is sorted by class), the same
images whatever the batch size or number of processes; they are gathered and measured in batches
of the test batch size. Metrics are torchmetrics states, summed over
processes under DDP.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric, SumMetric

from cams.metrics import (
    ADCC,
    AverageDrop,
    Coherency,
    Complexity,
    IncreaseInConfidence,
    explanation_scores,
)
from distill.config_checks import ConfigError
from distill.loss_config import build_cam
from distill.losses import map_agreement
from distill.objectives.base import declared_layer
from distill.teacher import check_teacher_data, load_teacher

__all__ = [
    "GROUPS",
    "FidelityCallback",
    "fidelity_metrics",
    "kl_teacher_student",
    "top1_agreement",
]

GROUPS = ("fidelity", "faithfulness")
FAITHFULNESS = {
    "average_drop": AverageDrop,
    "increase_in_confidence": IncreaseInConfidence,
    "coherency": Coherency,
    "complexity": Complexity,
    "adcc": ADCC,
}
_FIELDS = ("drop", "coherency", "complexity")  # what AD, IC, Coh, Com and ADCC need


def top1_agreement(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per-sample ``1[argmax t = argmax s]`` as float, (B,)."""
    return (teacher_logits.argmax(1) == student_logits.argmax(1)).float()


def kl_teacher_student(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """Per-sample ``KL(softmax(t) || softmax(s))`` in nats, computed in float32, (B,)."""
    log_t = F.log_softmax(teacher_logits.float(), dim=1)
    log_s = F.log_softmax(student_logits.float(), dim=1)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(1)


def fidelity_metrics(results: Mapping[str, Any]) -> dict[str, float]:
    """The ``fidelity/*`` and ``faithfulness/*`` entries of ``trainer.test`` results, as
    ``metrics.json`` keys (``/`` -> ``_``, e.g. ``fidelity_top1_agreement``)."""
    return {
        key.replace("/", "_"): float(value)
        for key, value in results.items()
        if key.split("/", 1)[0] in GROUPS
    }


class FidelityCallback(pl.Callback):
    """Prediction fidelity, explanation agreement and faithfulness on the test set (module doc).

    Args:
        enabled: False: do nothing (``callbacks.fidelity.enabled=false``).
        max_images: measure at most this many evenly spaced test images (None: all).
        layer: the Grad-CAM yardstick's layer, in the run's net and the teacher's (None: each
            network's declared ``cam_layer``; maps of different sizes are compared average-pooled
            to the smaller, :func:`distill.losses.map_agreement`).
        own_method: also compare the maps of the cell's own CAM method (student runs with one).
        own_cam: per-method option overrides for the own-method maps, both nets (e.g. fewer
            Shap-CAM permutations than the teacher's training maps).
        teacher_net, teacher_checkpoint: the teacher of a run whose module has none (the CE
            baseline cell: ``teacher.model``, ``teacher.checkpoint``), loaded and verified at
            setup when the checkpoint is given; a teacher run (no checkpoint) or a missing file
            (a warning) gets only the faithfulness numbers.
    """

    def __init__(
        self,
        enabled: bool = True,
        max_images: int | None = None,
        layer: str | None = None,
        own_method: bool = True,
        own_cam: Mapping[str, Mapping[str, Any]] | None = None,
        teacher_net: nn.Module | None = None,
        teacher_checkpoint: str | None = None,
    ) -> None:
        if max_images is not None and (isinstance(max_images, bool) or max_images < 1):
            raise ConfigError(
                f"callbacks.fidelity.max_images must be an integer >= 1 or null (all test "
                f"images), got {max_images!r}"
            )
        self.enabled, self.max_images, self.layer = enabled, max_images, layer
        self.own_method = own_method
        self.own_cam = {k: dict(v) for k, v in (own_cam or {}).items()}
        self.teacher_net, self.teacher_checkpoint = teacher_net, teacher_checkpoint
        self.teacher: nn.Module | None = None  # the module's teacher, or the one loaded here
        self.warned = False
        self.layers: dict[str, str] = {}  # the yardstick's layer per network (setup)
        self.metrics: dict[str, Metric] = {}
        self.cams: dict[str, Any] = {}
        self.own_is_yardstick = False
        self.stride = self.batch_size = 1
        self.seconds = 0.0
        self.pending: list[tuple[Tensor, Tensor]] = []  # selected images not measured yet

    # ----------------------------------------------------------------- setup
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Find the teacher and check the layers before anything runs (a misspelt layer or a bad
        teacher checkpoint fails before training)."""
        if not self.enabled:
            return
        start = time.perf_counter()
        own = getattr(pl_module, "teacher", None)
        self.teacher = own.net if own is not None else self._load_teacher(trainer)
        self.seconds += time.perf_counter() - start
        self.layers = {}
        for name, net in self._nets(pl_module).items():
            layer = declared_layer(net, self.layer, "callbacks.fidelity.layer", ConfigError)
            if layer not in dict(net.named_modules()):
                hint = getattr(net, "cam_layer", None) or "block3"
                raise ConfigError(
                    f"callbacks.fidelity.layer={layer!r} is not a module of the {name}'s "
                    f"network; choose one with spatial maps, e.g. {hint} (null: its cam_layer)"
                )
            self.layers[name] = layer

    def _load_teacher(self, trainer: pl.Trainer) -> nn.Module | None:
        """``teacher_net`` with the verified ``teacher_checkpoint`` (None without one). A CE run
        does not need its teacher: a missing file only warns (no teacher trained yet); a damaged
        or foreign one stops the run (:class:`~distill.teacher.TeacherError`)."""
        if not self.teacher_checkpoint or self.teacher_net is None:
            return None
        if not Path(self.teacher_checkpoint).exists():
            if not self.warned:
                warnings.warn(
                    f"fidelity: teacher checkpoint {self.teacher_checkpoint} does not exist; "
                    "this run gets faithfulness numbers only (no agreement with a teacher)",
                    stacklevel=2,
                )
                self.warned = True
            return None
        if self.teacher is None:
            check_teacher_data(
                self.teacher_checkpoint, getattr(trainer.datamodule, "dataset_id", None)
            )
            self.teacher = load_teacher(self.teacher_net, self.teacher_checkpoint)
        return self.teacher

    def _nets(self, pl_module: pl.LightningModule) -> dict[str, nn.Module]:
        """The run's own network (``student``) and the teacher's, if there is one."""
        nets = {"student": pl_module.net}
        if self.teacher is not None:
            nets["teacher"] = self.teacher
        return nets

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        start = time.perf_counter()
        nets = self._nets(pl_module)
        if self.teacher is not None and self.teacher is self.teacher_net:  # loaded here
            self.teacher.to(pl_module.device)
            if getattr(pl_module, "use_channels_last", False):
                self.teacher.to(memory_format=torch.channels_last)
        self.cams = {
            f"gradcam_{side}": build_cam("gradcam", net, self.layers[side])
            for side, net in nets.items()
        }
        own = self._own_cams(pl_module, nets) if "teacher" in nets and self.own_method else None
        self.cams.update(own or {})
        self.own_is_yardstick = own == {}
        names = ["images", *(f"faithfulness/{k}" for k in FAITHFULNESS)]
        if "teacher" in nets:
            names += ["top1_agreement", "kl_teacher_student", "map_cosine_gradcam"]
            names += ["map_cosine_own"] if own is not None else []
        self.metrics = {
            name if "/" in name else f"fidelity/{name}": _metric(name) for name in names
        }
        for metric in self.metrics.values():
            metric.to(pl_module.device)
        self.stride = self._stride(trainer)
        self.batch_size, self.pending = 1, []
        self.seconds += time.perf_counter() - start

    def _own_cams(
        self, pl_module: pl.LightningModule, nets: dict[str, nn.Module]
    ) -> dict[str, Any] | None:
        """The cell's own CAM for both nets (from the student's loss config); None: it has none;
        ``{}``: it is the Grad-CAM yardstick itself (its maps are not computed twice)."""
        loss = getattr(pl_module, "loss_cfg", None)
        method = getattr(loss, "method", None)
        if method is None:
            return None
        override = self.own_cam.get(method, {})
        specs = {
            side: (getattr(loss, f"{side}_layer"), {**loss.options(side), **override})
            for side in ("student", "teacher")
        }
        if method == "gradcam" and all(specs[s] == (self.layers[s], {}) for s in specs):
            return {}
        return {
            f"own_{side}": build_cam(method, nets[side], layer, options)
            for side, (layer, options) in specs.items()
        }

    def _stride(self, trainer: pl.Trainer) -> int:
        """Every ``stride``-th test image is measured (1: all)."""
        if self.max_images is None:
            return 1
        loaders = trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, list | tuple) else loaders
        return max(1, math.ceil(len(loader.dataset) / self.max_images))

    # ----------------------------------------------------------------- measurement
    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not self.enabled:
            return
        keep = batch["index"] % self.stride == 0
        if bool(keep.any()):
            self.batch_size = max(self.batch_size, len(keep))
            self.pending.append((batch["image"][keep], batch["label"][keep]))
            if sum(len(y) for _, y in self.pending) >= self.batch_size:
                self._flush(trainer, pl_module, full_only=True)

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule, full_only: bool) -> None:
        """Measure the pending images in batches of the test batch size (``full_only``: keep a
        last partial one pending): a few large calls instead of one small one per test batch."""
        start = time.perf_counter()
        x, y = (torch.cat(parts) for parts in zip(*self.pending, strict=True))
        self.pending = []
        for begin in range(0, len(y), self.batch_size):
            end = begin + self.batch_size
            if full_only and end > len(y):
                self.pending = [(x[begin:], y[begin:])]
                break
            self._update(trainer, pl_module, x[begin:end], y[begin:end])
        self.seconds += time.perf_counter() - start

    def _update(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, x: Tensor, y: Tensor
    ) -> None:
        # the test loop runs in inference mode; the CAMs need ordinary tensors (and autograd)
        with torch.inference_mode(False), trainer.precision_plugin.forward_context():
            x, y = x.clone(), y.clone()
            if getattr(pl_module, "use_channels_last", False):
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():  # the CAMs take their gradients themselves
                values = self._measure(pl_module, x, y)
        for name, value in values.items():  # the states live in the loop's inference mode
            self.metrics[name].update(value)

    def _measure(self, pl_module: pl.LightningModule, x: Tensor, y: Tensor) -> dict[str, Any]:
        """Per-image values of a batch (metric name -> (B,) tensor or ExplanationScores)."""
        cams = self.cams
        scores = self._faithfulness(pl_module.net, x)
        values: dict[str, Any] = {f"faithfulness/{name}": scores for name in FAITHFULNESS}
        values["fidelity/images"] = torch.tensor(float(len(y)), device=y.device)
        if "gradcam_teacher" not in cams:
            return values
        student = cams["gradcam_student"].compute(x, y)
        teacher = cams["gradcam_teacher"].compute(x, y)
        values["fidelity/top1_agreement"] = top1_agreement(teacher.logits, student.logits)
        values["fidelity/kl_teacher_student"] = kl_teacher_student(teacher.logits, student.logits)
        values["fidelity/map_cosine_gradcam"] = map_agreement(student.maps, teacher.maps).float()
        if self.own_is_yardstick:
            values["fidelity/map_cosine_own"] = values["fidelity/map_cosine_gradcam"]
        elif "own_student" in cams:
            own = map_agreement(cams["own_student"](x, y), cams["own_teacher"](x, y))
            values["fidelity/map_cosine_own"] = own.float()
        return values

    def _faithfulness(self, net: nn.Module, x: Tensor) -> Any:
        """:func:`cams.metrics.explanation_scores` of the net's Grad-CAM for its predicted
        class; its first two passes (the logits that pick the class, the maps of ``x``) come from
        one forward (``compute``), the passes on the masked inputs are its own."""
        cam = self.cams["gradcam_student"]
        first = cam.compute(x)  # the predicted class's maps and the logits of one forward

        def model(inputs: Tensor) -> Tensor:
            return first.logits if inputs is x else net(inputs)

        def cam_fn(inputs: Tensor, targets: Tensor) -> Tensor:
            return first.maps if inputs is x else cam(inputs, targets)

        return explanation_scores(model, cam_fn, x, None, _FIELDS)  # type: ignore[arg-type]

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Log the means (each metric syncs its sums itself under DDP) and the time taken;
        nothing when no image was measured."""
        if not self.enabled or not self.metrics:
            return
        if self.pending:
            self._flush(trainer, pl_module, full_only=False)
        if float(self.metrics["fidelity/images"].compute()) > 0:
            for name, metric in self.metrics.items():
                pl_module.log(name, metric.compute().float(), on_epoch=True, sync_dist=False)
            seconds = torch.tensor(self.seconds, device=pl_module.device)
            pl_module.log(
                "fidelity/seconds", seconds, on_epoch=True, sync_dist=True, reduce_fx="max"
            )
        for metric in self.metrics.values():
            metric.reset()
        self.cams, self.seconds = {}, 0.0


def _metric(name: str) -> Metric:
    if name == "images":
        return SumMetric()
    key = name.split("/", 1)[-1]
    return FAITHFULNESS[key]() if name.startswith("faithfulness/") else MeanMetric()
