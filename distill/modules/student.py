"""Student training: CE (+ Hinton KD) + alpha * || N(L_s) - N(L_t) ||^2 on true-class CAMs.

:class:`StudentModule` composes the classification loss (CE, or KD from the teacher's
logits), the explanation term (student CAM vs teacher map) and a teacher source
(:class:`distill.teacher.Teacher`: frozen network, its CAM, online or cached maps). It also logs
map agreement and keeps its checkpoints student-only (the CAM figure is drawn by the callback
:class:`distill.visualize.CamFigure`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.loss_config import LossConfig, build_cam
from distill.losses import LossConfigError, explanation_loss, kd_loss, map_agreement
from distill.modules.classifier import ClassifierModule
from distill.teacher import Teacher


def step_seed(seed: int, run_seed: int, step: int) -> int:
    """A 63-bit seed for training step ``step`` (distinct streams per seed, run and step)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + run_seed * 0xBF58476D1CE4E5B9 + step) % (1 << 64)
    return (mixed ^ (mixed >> 31)) & ((1 << 63) - 1)


def _layer_output_shape(model: nn.Module, layer: str, probe: Tensor) -> tuple[int, ...]:
    """Shape of ``layer``'s output for ``probe`` (eval mode, no grad, mode restored)."""
    captured: list[tuple[int, ...]] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: captured.append(tuple(o.shape))
    )
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(probe)
    finally:
        model.train(was_training)
        handle.remove()
    return captured[0]


class StudentModule(ClassifierModule):
    """A student trained against a frozen teacher with KD and/or an explanation loss.

    The student's map is computed by :mod:`cams` with ``create_graph=True`` in the same forward
    pass that produces its logits (one forward per step); the teacher's logits and maps come from
    ``teacher`` (:meth:`distill.teacher.Teacher.outputs`: online on the same augmented batch, or
    from the offline cache).

    Args:
        net: the student network.
        teacher_net: the teacher architecture (weights loaded from the checkpoint); ignored when
            ``teacher`` is given.
        loss: the ``loss`` config (:class:`~distill.loss_config.LossConfig` keys).
        teacher_checkpoint, teacher_run_dir, teacher_command, cache_root, memo_root: where the
            teacher, its cached maps and its output memos are (:meth:`Teacher.load`).
        teacher: a ready :class:`~distill.teacher.Teacher` (built from the arguments above if
            None).
        **kwargs: :class:`~distill.modules.classifier.ClassifierModule` options.
    """

    def __init__(
        self,
        net: nn.Module,
        teacher_net: nn.Module | None = None,
        loss: Mapping[str, Any] | LossConfig | None = None,
        teacher_checkpoint: str | None = None,
        teacher_run_dir: str = "",
        teacher_command: str = "python train.py experiment=teacher",
        cache_root: str = "cache/teacher_maps",
        memo_root: str = "cache/teacher_memo",
        teacher: Teacher | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(net=net, **kwargs)
        cfg = loss if isinstance(loss, LossConfig) else LossConfig.from_mapping(loss or {})
        self.loss_cfg = cfg
        if teacher is None:
            if teacher_net is None:
                raise TypeError("StudentModule needs teacher_net (or a ready teacher=Teacher)")
            teacher = Teacher.load(
                teacher_net,
                cfg,
                teacher_checkpoint,
                teacher_run_dir,
                teacher_command,
                cache_root,
                memo_root,
            )
        self.teacher = teacher
        self.teacher_checkpoint = teacher.checkpoint
        self.hparams.update(
            loss=cfg.as_dict(),
            teacher_checkpoint=teacher.checkpoint,
            teacher_arch=type(teacher.net).__name__,
        )
        self.student_cam = None
        if cfg.method is not None:
            self.student_cam = build_cam(
                cfg.method, self.net, cfg.student_layer, cfg.options("student")
            )
            self._check_map_shapes()
        self.run_seed = torch.initial_seed()  # seed_everything's seed: per-run ordering streams
        self.ordering_seed = getattr(self.student_cam, "seed", None)

    @property
    def teacher_cam(self) -> Any:
        """The teacher's CAM method (None without an explanation term)."""
        return self.teacher.cam

    # ----------------------------------------------------------------- setup
    def _check_map_shapes(self) -> None:
        """Stop before training when student and teacher maps differ in size (one 32x32 probe)."""
        probe = torch.zeros(2, 3, 32, 32)
        cfg = self.loss_cfg
        outputs = {
            "student": _layer_output_shape(self.net, cfg.student_layer, probe),
            "teacher": _layer_output_shape(self.teacher.net, cfg.teacher_layer, probe),
        }
        for side, shape in outputs.items():
            if len(shape) != 4:
                layer = getattr(cfg, f"{side}_layer")
                raise LossConfigError(
                    f"loss.{side}_layer={layer} outputs shape {shape}, not spatial maps "
                    f"(B, C, h, w): choose a convolutional layer, e.g. loss.{side}_layer=block3"
                )
        shapes = [shape[-2:] for shape in outputs.values()]
        if shapes[0] != shapes[1]:
            raise LossConfigError(
                f"student layer {cfg.student_layer!r} gives {shapes[0]} maps but teacher "
                f"layer {cfg.teacher_layer!r} gives {shapes[1]}: choose layers of equal "
                "resolution (loss.student_layer=..., loss.teacher_layer=...)"
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.use_channels_last:
            self.teacher.net.to(memory_format=torch.channels_last)
        if stage != "fit":
            return
        if self.teacher.cam is not None and self.teacher.source == "cache":
            self.teacher.load_cache(self.trainer.datamodule)
        self.teacher.enable_memo(self.trainer.datamodule, str(self.trainer.precision))

    def on_train_epoch_end(self) -> None:
        """Log the teacher memo's hit rate of the epoch (``teacher/memo_hit_rate``)."""
        super().on_train_epoch_end()
        rate = self.teacher.memo_hit_rate()
        if rate is not None:
            self.log("teacher/memo_hit_rate", rate, on_epoch=True, sync_dist=True)

    # ----------------------------------------------------------------- losses
    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        cfg = self.loss_cfg
        x, y = batch["image"], batch["label"]
        if self.use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            batch = {**batch, "image": x}  # the teacher reads the same layout
        if self.student_cam is not None:
            self._seed_student_cam()
            out = self.student_cam.compute(x, y, create_graph=True)
            logits, student_maps = out.logits, out.maps
        else:
            logits, student_maps = self.net(x), None
        teacher_logits, teacher_maps = self.teacher.outputs(batch, need_logits=cfg.kd.enabled)
        ce = F.cross_entropy(logits, y)
        terms = {"ce": ce}
        loss = ce
        if cfg.kd.enabled:
            terms["kd"] = kd_loss(logits, teacher_logits, cfg.kd.temperature)
            loss = (1 - cfg.kd.beta) * ce + cfg.kd.beta * terms["kd"]
        if student_maps is not None:
            terms["cam"] = explanation_loss(student_maps, teacher_maps, cfg.norm)
            if self._trainer is not None:
                agreement = map_agreement(student_maps.detach(), teacher_maps).mean()
                self.log(
                    "train/map_agreement",
                    agreement,
                    on_step=False,
                    on_epoch=True,
                    batch_size=len(y),
                )
            loss = loss + cfg.alpha * terms["cam"]
        return loss, logits, terms

    def _seed_student_cam(self) -> None:
        """Sampled CAMs (Shap-CAM's orderings) draw fresh samples every training step: the seed
        is derived from the configured seed, the run seed and the global step, so a resumed run
        draws the same ones. Validation and ``fresh_orderings=false`` use the configured seed."""
        base = self.ordering_seed
        if not isinstance(base, int) or isinstance(base, bool):
            return
        fresh = self.loss_cfg.fresh_orderings and self.training
        self.student_cam.seed = step_seed(base, self.run_seed, self.global_step) if fresh else base

    # ----------------------------------------------------------------- validation extras
    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Any:
        result = super().validation_step(batch, batch_idx)
        if self.student_cam is not None and batch_idx < self.loss_cfg.agreement_batches:
            x, y = batch["image"], batch["label"]
            agreement = map_agreement(self.student_cam(x, y), self.teacher.explain(x, y)).mean()
            self.log("val/map_agreement", agreement, on_epoch=True, batch_size=len(y))
        return result

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints student-only: the teacher is reloaded from ``teacher_checkpoint``."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Student weights from the checkpoint, teacher weights from the loaded teacher (stale
        ``teacher.*`` entries of older checkpoints are replaced)."""
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
