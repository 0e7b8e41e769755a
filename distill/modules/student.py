"""Student training against a frozen teacher: the sum of the configured objectives' terms.

:class:`StudentModule` runs the student's one forward (its CAM when ``loss.method`` is set, the
layers the objectives read hooked), collects what the objectives read from the teacher
(:class:`distill.teacher.Teacher`: frozen network, its CAM, online, memo or cached outputs) and
sums the weighted terms of every active objective (:mod:`distill.objectives`: CE, Hinton KD,
the CAM term, AT, CAT-KD, DKD, ...). It also logs map agreement (``train/map_agreement``: epoch
mean over the training batches; ``val/map_agreement`` when there is a validation split) and
keeps its checkpoints student-only (the CAM figure is drawn by the callback
:class:`distill.visualize.CamFigure`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from distill.console import say
from distill.loss_config import LossConfig, build_cam, resolve_cam_layers
from distill.losses import map_agreement
from distill.modules.classifier import ClassifierModule, check_output_width
from distill.objectives import StudentOutputs, build_objectives
from distill.objectives.base import capture
from distill.teacher import Teacher


def step_seed(seed: int, run_seed: int, step: int) -> int:
    """A 63-bit seed for training step ``step`` (distinct streams per seed, run and step)."""
    mixed = (seed * 0x9E3779B97F4A7C15 + run_seed * 0xBF58476D1CE4E5B9 + step) % (1 << 64)
    return (mixed ^ (mixed >> 31)) & ((1 << 63) - 1)


class StudentModule(ClassifierModule):
    """A student trained against a frozen teacher with the objectives of its loss config.

    The student's map is computed by :mod:`cams` with ``create_graph=True`` in the same forward
    pass that produces its logits and the hooked layer outputs (one forward per step); the
    teacher's outputs come from ``teacher`` (:meth:`distill.teacher.Teacher.collect`: online on
    the same augmented batch, from the memo, or maps from the offline cache). The loss is
    ``sum(weight * value)`` over the terms of the active objectives; each term is logged as
    ``train/<name>``.

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
        if teacher is None and teacher_net is None:
            raise TypeError("StudentModule needs teacher_net (or a ready teacher=Teacher)")
        # null CAM layers: the networks' declared cam_layer (refused here when there is none)
        cfg = resolve_cam_layers(cfg, net, teacher.net if teacher is not None else teacher_net)
        self.loss_cfg = cfg
        if teacher is None:
            teacher = Teacher.load(
                teacher_net,
                cfg,
                teacher_checkpoint,
                teacher_run_dir,
                teacher_command,
                cache_root,
                memo_root,
            )
        check_output_width(teacher.net, self.hparams["num_classes"], "teacher.model")
        self.teacher = teacher
        self.teacher_checkpoint = teacher.checkpoint
        self.hparams.update(
            loss=cfg.as_dict(),
            teacher_checkpoint=teacher.checkpoint,
            teacher_arch=type(teacher.net).__name__,
        )
        self.objectives = build_objectives(cfg, self.net, teacher.net)
        # the (h, w) at which student and teacher maps are compared (the CAM term's; None: no term)
        self.map_size = next((o.size for o in self.objectives if o.name == "cam"), None)
        teacher.require(self.objectives)
        self.student_layers = [layer for o in self.objectives for layer in o.student_layers]
        self.student_cam = None
        if cfg.method is not None:
            self.student_cam = build_cam(
                cfg.method, self.net, cfg.student_layer, cfg.options("student")
            )
        self.term_weights: dict[str, float] = {}  # weight of each term at the last step
        self.run_seed = torch.initial_seed()  # seed_everything's seed: per-run ordering streams
        self.ordering_seed = getattr(self.student_cam, "seed", None)

    @property
    def teacher_cam(self) -> Any:
        """The teacher's CAM method (None without an explanation term)."""
        return self.teacher.cam

    # ----------------------------------------------------------------- setup
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if self.use_channels_last:
            self.teacher.net.to(memory_format=torch.channels_last)
        if stage != "fit":
            return
        if self.teacher.cam is not None and self.teacher.source == "cache":
            self.teacher.load_cache(self.trainer.datamodule)
        self.teacher.enable_memo(self.trainer.datamodule, str(self.trainer.precision))

    def on_fit_start(self) -> None:
        """Say once, before any progress bar, that the frozen teacher is in eval mode (Lightning's
        generic eval-mode warning is silenced by ``distill.train``)."""
        super().on_fit_start()
        if self.trainer.is_global_zero:
            frozen = sum(1 for m in self.teacher.modules() if not m.training)
            say(f"teacher frozen in eval mode: {frozen} modules")

    def on_train_epoch_end(self) -> None:
        """Log the teacher memo's hit rate of the epoch (``teacher/memo_hit_rate``)."""
        super().on_train_epoch_end()
        rate = self.teacher.memo_hit_rate()
        if rate is not None:
            self.log("teacher/memo_hit_rate", rate, on_epoch=True, sync_dist=True)

    # ----------------------------------------------------------------- losses
    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        x, y = batch["image"], batch["label"]
        if self.use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            batch = {**batch, "image": x}  # the teacher reads the same layout
        student = self.student_outputs(x, y)
        teacher = self.teacher.collect(batch, self.teacher.needs)
        terms: dict[str, Tensor] = {}
        weights: dict[str, Any] = {}
        loss: Tensor | None = None
        for objective in self.objectives:
            for term in objective.terms(student, teacher, batch, self.current_epoch):
                if term.name in terms:
                    raise ValueError(f"two objectives return a term named {term.name!r}")
                terms[term.name], weights[term.name] = term.value, term.weight
                part = term.weight * term.value
                loss = part if loss is None else loss + part
        assert loss is not None  # cross-entropy is always on
        self.term_weights = {name: float(w) for name, w in weights.items()}
        if student.maps is not None and "maps" in teacher and self._trainer is not None:
            agreement = map_agreement(student.maps.detach(), teacher["maps"], self.map_size)
            agreement = agreement.mean()
            self.log_train_mean("map_agreement", agreement, len(y))  # resume-exact epoch mean
        return loss, student.logits, terms

    def student_outputs(self, x: Tensor, y: Tensor) -> StudentOutputs:
        """The student's one forward: logits, its CAM maps (with ``loss.method``, differentiable)
        and the outputs of the layers the objectives read."""
        with capture(self.net, self.student_layers) as features:
            if self.student_cam is not None:
                self._seed_student_cam()
                out = self.student_cam.compute(x, y, create_graph=True)
                logits, maps = out.logits, out.maps
            else:
                logits, maps = self.net(x), None
        return StudentOutputs(logits, maps, dict(features))

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
            maps = self.student_cam(x, y), self.teacher.explain(x, y)
            agreement = map_agreement(*maps, self.map_size).mean()
            self.log("val/map_agreement", agreement, on_epoch=True, batch_size=len(y))
        return result

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints student-only: the teacher is reloaded from ``teacher_checkpoint``."""
        super().on_save_checkpoint(checkpoint)
        checkpoint["term_weights"] = dict(self.term_weights)  # metrics.json after a late resume
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Student weights from the checkpoint, teacher weights from the loaded teacher (stale
        ``teacher.*`` entries of older checkpoints are replaced)."""
        super().on_load_checkpoint(checkpoint)
        self.term_weights = dict(checkpoint.get("term_weights", {}))
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]
        state.update({f"teacher.{k}": v for k, v in self.teacher.state_dict().items()})
