"""Student training: CE (+ Hinton KD) + alpha * || N(L_s) - N(L_t) ||^2 on true-class CAMs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.explain import build_cam, load_teacher, resolve_teacher_checkpoint
from distill.losses import LossConfigError, check_alpha, explanation_loss, kd_loss, map_agreement
from distill.modules.classifier import ClassifierModule
from distill.teacher_maps import (
    CacheError,
    ForeignCacheError,
    MapCache,
    align_maps,
    teacher_fingerprint,
)


def precompute_command(drop_cache_dir: bool = False) -> str:
    """The precompute command with this run's own Hydra overrides (without ``loss.cache_dir``
    when that directory holds another configuration's maps: repeating it would fail again)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return "python -m distill.precompute <the same overrides as this run>"
    if drop_cache_dir:
        task = [o for o in task if not o.lstrip("+~").startswith("loss.cache_dir=")]
    return f"python -m distill.precompute {' '.join(task)}"


@dataclass
class LossConfig:
    """The ``loss`` config group (see ``configs/loss/ce.yaml`` for every key)."""

    name: str = "ce"
    method: str | None = None
    alpha: float = 0.0
    norm: str = "l2"
    student_layer: str = "block3"
    teacher_layer: str = "block3"
    teacher_maps: str = "online"
    cam: dict[str, Any] = field(default_factory=dict)
    student_cam: dict[str, Any] = field(default_factory=dict)
    teacher_cam: dict[str, Any] = field(default_factory=dict)
    kd: dict[str, Any] = field(default_factory=dict)
    map_align: str = "nearest"
    agreement_batches: int = 2
    grid_every_n_epochs: int = 10
    cache_dir: str | None = None
    fresh_orderings: bool = True

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> LossConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LossConfigError(f"unknown loss options {unknown}; known: {sorted(known)}")
        values = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in data.items()}
        cfg = cls(**values)
        cfg.alpha = check_alpha(cfg.alpha)
        if cfg.teacher_maps not in ("online", "cache"):
            raise LossConfigError(
                f"loss.teacher_maps must be 'online' or 'cache', got {cfg.teacher_maps!r}"
            )
        return cfg

    @property
    def kd_enabled(self) -> bool:
        return bool(self.kd.get("enabled", False))

    def options(self, side: str) -> dict[str, Any]:
        """CAM options for ``side`` ("student" or "teacher"): shared ``cam`` + side-specific."""
        return {**self.cam, **getattr(self, f"{side}_cam")}


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
    pass that produces its logits (one forward per step); the teacher's map comes from the
    teacher on the same augmented batch (``teacher_maps=online``) or from a precomputed cache,
    looked up by dataset index and pushed through the batch's crop/flip
    (``teacher_maps=cache``).
    """

    def __init__(
        self,
        net: nn.Module,
        teacher_net: nn.Module,
        loss: Mapping[str, Any],
        teacher_checkpoint: str | None = None,
        teacher_run_dir: str = "",
        teacher_command: str = "python train.py experiment=teacher",
        cache_root: str = "cache/teacher_maps",
        **kwargs: Any,
    ) -> None:
        super().__init__(net=net, **kwargs)
        self.loss_cfg = LossConfig.from_mapping(loss)
        self.teacher_checkpoint = resolve_teacher_checkpoint(
            teacher_checkpoint, teacher_run_dir, teacher_command
        )
        self.teacher = load_teacher(teacher_net, self.teacher_checkpoint)
        self.hparams.update(
            loss=dict(vars(self.loss_cfg)),
            teacher_checkpoint=self.teacher_checkpoint,
            teacher_arch=type(teacher_net).__name__,
        )
        self.cache_root = Path(cache_root)
        cfg = self.loss_cfg
        self.student_cam = self.teacher_cam = None
        if cfg.method is not None:
            self.student_cam = build_cam(
                cfg.method, self.net, cfg.student_layer, cfg.options("student")
            )
            self.teacher_cam = build_cam(
                cfg.method, self.teacher, cfg.teacher_layer, cfg.options("teacher")
            )
            self._check_map_shapes()
        self.run_seed = torch.initial_seed()  # seed_everything's seed: per-run ordering streams
        self.ordering_seed = getattr(self.student_cam, "seed", None)
        self.register_buffer("cached_maps", torch.empty(0), persistent=False)
        self.register_buffer("cache_position", torch.empty(0, dtype=torch.long), persistent=False)
        self._grid_batch: dict[str, Tensor] | None = None

    # ----------------------------------------------------------------- setup
    def _check_map_shapes(self) -> None:
        """Stop before training when student and teacher maps differ in size."""
        probe = torch.zeros(2, 3, 32, 32)
        cfg = self.loss_cfg
        outputs = {
            "student": _layer_output_shape(self.net, cfg.student_layer, probe),
            "teacher": _layer_output_shape(self.teacher, cfg.teacher_layer, probe),
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
                f"student layer {self.loss_cfg.student_layer!r} gives {shapes[0]} maps but teacher "
                f"layer {self.loss_cfg.teacher_layer!r} gives {shapes[1]}: choose layers of equal "
                "resolution (loss.student_layer=..., loss.teacher_layer=...)"
            )

    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage == "fit" and self.loss_cfg.method and self.loss_cfg.teacher_maps == "cache":
            try:
                self.load_cache(self.trainer.datamodule)
            except CacheError as err:
                command = precompute_command(drop_cache_dir=isinstance(err, ForeignCacheError))
                raise CacheError(
                    f"{err}\nPrecompute the teacher maps with:\n    {command}"
                ) from None

    @staticmethod
    def cached_indices(datamodule: Any) -> Tensor:
        """Dataset indices whose teacher maps are cached: the training split (sorted)."""
        return datamodule.train_indices.sort().values

    def map_cache(self, datamodule: Any) -> MapCache:
        """The cache of teacher maps this run needs (directory derived from its fingerprint)."""
        cfg = self.loss_cfg
        indices = self.cached_indices(datamodule)
        fingerprint = teacher_fingerprint(
            self.teacher_checkpoint,
            cfg.method,
            cfg.teacher_layer,
            cfg.options("teacher"),
            datamodule.dataset_id,
            indices,
        )
        cache = MapCache(Path(cfg.cache_dir or self.cache_root), fingerprint, len(indices))
        if cfg.cache_dir is None:
            cache.directory = cache.directory / cache.key[:16]
        return cache

    def load_cache(self, datamodule: Any) -> None:
        """Load the verified cache and the dataset-index -> cache-row table."""
        indices = self.cached_indices(datamodule)
        position = torch.full((datamodule.num_train_total,), -1, dtype=torch.long)
        position[indices] = torch.arange(len(indices))
        self.cached_maps = self.map_cache(datamodule).load().to(self.device)
        self.cache_position = position.to(self.device)

    def cached_teacher_maps(self, index: Tensor, aug: Any) -> Tensor:
        """Cached maps of dataset ``index`` pushed through the batch's crop/flip."""
        rows = self.cache_position[index]
        if bool((rows < 0).any()):
            missing = index[rows < 0][:5].tolist()
            raise CacheError(
                f"no cached teacher map for dataset indices {missing}: the cache was "
                "built for another training split; precompute it for this one"
            )
        return align_maps(self.cached_maps[rows], aug, mode=self.loss_cfg.map_align)

    def train(self, mode: bool = True) -> StudentModule:
        super().train(mode)
        self.teacher.eval()  # the teacher stays frozen in eval mode
        return self

    # ----------------------------------------------------------------- losses
    def teacher_outputs(
        self, batch: Mapping[str, Any], need_logits: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """Teacher logits (if needed) and maps (if the loss has an explanation term)."""
        x, y = batch["image"], batch["label"]
        if self.teacher_cam is not None and self.loss_cfg.teacher_maps == "online":
            out = self.teacher_cam.compute(x, y)
            return out.logits.detach(), out.maps.detach()
        maps = None
        if self.teacher_cam is not None:
            maps = self.cached_teacher_maps(batch["index"], batch.get("aug"))
        logits = None
        if need_logits:
            with torch.no_grad():
                logits = self.teacher(x)
        return logits, maps

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        cfg = self.loss_cfg
        x, y = batch["image"], batch["label"]
        if self.use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.student_cam is not None:
            self._seed_student_cam()
            out = self.student_cam.compute(x, y, create_graph=True)
            logits, student_maps = out.logits, out.maps
        else:
            logits, student_maps = self.net(x), None
        teacher_logits, teacher_maps = self.teacher_outputs(batch, need_logits=cfg.kd_enabled)
        ce = F.cross_entropy(logits, y)
        terms = {"ce": ce}
        loss = ce
        if cfg.kd_enabled:
            beta = float(cfg.kd.get("beta", 0.9))
            terms["kd"] = kd_loss(logits, teacher_logits, float(cfg.kd.get("temperature", 4.0)))
            loss = (1 - beta) * ce + beta * terms["kd"]
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
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        if batch_idx == 0 and self.student_cam is not None and self._grid_due():
            self._grid_batch = {"image": batch["image"][:8].detach(), "label": batch["label"][:8]}
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> Any:
        result = super().validation_step(batch, batch_idx)
        if self.student_cam is not None and batch_idx < self.loss_cfg.agreement_batches:
            x, y = batch["image"], batch["label"]
            agreement = map_agreement(self.student_cam(x, y), self.teacher_cam(x, y)).mean()
            self.log("val/map_agreement", agreement, on_epoch=True, batch_size=len(y))
        return result

    def _grid_due(self) -> bool:
        every = self.loss_cfg.grid_every_n_epochs
        last = (
            self.trainer.max_epochs is not None
            and self.current_epoch + 1 >= self.trainer.max_epochs
        )
        return every > 0 and ((self.current_epoch + 1) % every == 0 or last)

    def on_train_epoch_end(self) -> None:
        """Overlay grid of the epoch's first training images: input, teacher map, student map."""
        super().on_train_epoch_end()
        if self._grid_batch is None:
            return
        from distill.visualize import log_cam_grid

        x, y = self._grid_batch["image"], self._grid_batch["label"]
        log_cam_grid(self, x, self.teacher_cam(x, y), self.student_cam(x, y))
        self._grid_batch = None

    # ----------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep checkpoints student-only: the teacher is reloaded from ``teacher_checkpoint``."""
        super().on_save_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith("teacher.")]:
            del state[key]

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint["state_dict"]
        for key, value in self.teacher.state_dict().items():
            state.setdefault(f"teacher.{key}", value)
