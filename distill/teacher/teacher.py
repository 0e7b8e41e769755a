"""The teacher of a student run as one object: frozen network, its CAM, and its map source.

Both :class:`distill.modules.student.StudentModule` and ``python -m distill.precompute`` build a
:class:`Teacher` from the same config keys (``module.teacher_net``, ``module.teacher_checkpoint``,
``module.teacher_run_dir``, ``module.teacher_command``, ``module.cache_root`` and ``loss``), so
the cache the precompute writes is exactly the one training looks for (:meth:`Teacher.cache_for`).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.loss_config import LossConfig, build_cam
from distill.objectives import teacher_needs
from distill.objectives.base import TeacherOutput, capture, check_layers, declared_layer
from distill.teacher.cache import (
    CacheError,
    ForeignCacheError,
    MapCache,
    align_maps,
    teacher_fingerprint,
)
from distill.teacher.loading import load_teacher, resolve_teacher_checkpoint, teacher_digest
from distill.teacher.memo import (
    EXECUTION_OPTIONS,
    FULL_DISK,
    MemoTable,
    TeacherMemo,
    memo_fingerprint,
    view_ids,
)

__all__ = ["Teacher", "cached_indices", "precompute_command"]

DEFAULT_CACHE_ROOT = "cache/teacher_maps"
DEFAULT_MEMO_ROOT = "cache/teacher_memo"


def cached_indices(datamodule: Any) -> Tensor:
    """Dataset indices whose teacher maps are cached: the training split, sorted (row ``i`` of
    the cache holds the map of dataset index ``cached_indices(dm)[i]``)."""
    return datamodule.train_indices.sort().values


def precompute_command(drop_cache_dir: bool = False, drop: str = "loss.cache_dir") -> str:
    """The precompute command with this run's own Hydra overrides (without ``drop``, e.g.
    ``loss.cache_dir``, when that directory holds another configuration's data: repeating it
    would fail again)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        return "python -m distill.precompute <the same overrides as this run>"
    if drop_cache_dir:
        task = [o for o in task if not o.lstrip("+~").startswith(f"{drop}=")]
    return f"python -m distill.precompute {' '.join(task)}"


class Teacher(nn.Module):
    """A frozen teacher: ``net`` (eval mode, no grad, never trained), the CAM of ``loss.method``
    at ``loss.teacher_layer`` (null: the network's declared ``cam_layer``; None without an
    explanation term), and where its maps come from
    (``loss.teacher_maps``):

    * ``online`` — the CAM on the student's (augmented) batch;
    * ``cache`` — precomputed maps of the un-augmented training images, looked up by dataset
      index and pushed through the batch's crop/flip (:func:`~distill.teacher.cache.align_maps`).

    The cache identity is the fingerprint (checkpoint SHA-256, method, layer, CAM options without
    execution options, dataset identity, indices covered); its directory is
    ``<cache_root>/<key[:16]>`` or ``loss.cache_dir`` when set.

    Besides its logits and maps the teacher gives the outputs the run's objectives declare
    (:meth:`require`: e.g. attention maps of its groups, pooled all-class CAMs), all from one
    forward (:meth:`collect`), and through the memo when it is enabled.
    """

    def __init__(
        self,
        net: nn.Module,
        checkpoint: str | Path,
        loss: LossConfig | Mapping[str, Any],
        cache_root: str | Path = DEFAULT_CACHE_ROOT,
        memo_root: str | Path = DEFAULT_MEMO_ROOT,
    ) -> None:
        super().__init__()
        cfg = loss if isinstance(loss, LossConfig) else LossConfig.from_mapping(loss)
        self.checkpoint = str(checkpoint)
        self.net = load_teacher(net, self.checkpoint)
        self.method = cfg.method
        # null loss.teacher_layer: the network's declared cam_layer (needed only with a CAM)
        layer = cfg.teacher_layer
        if cfg.method is not None:
            self.layer: str | None = declared_layer(self.net, layer, "loss.teacher_layer")
        else:
            self.layer = layer or getattr(self.net, "cam_layer", None)
        self.options = cfg.options("teacher")
        self.source, self.map_align = cfg.teacher_maps, cfg.map_align
        self.cache_dir = cfg.cache_dir
        self.cache_root = Path(cache_root)
        self.use_memo, self.memo_dir, self.memo_root = cfg.teacher_memo, cfg.memo_dir, memo_root
        self.memo: TeacherMemo | None = None
        self.memo_lookups = self.memo_hits = 0
        self.cam = build_cam(cfg.method, self.net, self.layer, self.options) if cfg.method else None
        self.extra: dict[str, TeacherOutput] = {}  # objectives' outputs (require())
        self._output_shapes: dict[str, tuple[int, ...]] = {}
        self.needs: list[str] = teacher_needs(cfg)  # what a training step collects
        self.register_buffer("cached_maps", torch.empty(0), persistent=False)
        self.register_buffer("cache_position", torch.empty(0, dtype=torch.long), persistent=False)

    # ----------------------------------------------------------------- construction
    @classmethod
    def load(
        cls,
        net: nn.Module,
        loss: LossConfig | Mapping[str, Any],
        checkpoint: str | None = None,
        run_dir: str = "",
        train_command: str = "python train.py experiment=teacher",
        cache_root: str | Path = DEFAULT_CACHE_ROOT,
        memo_root: str | Path = DEFAULT_MEMO_ROOT,
    ) -> Teacher:
        """``checkpoint``, or the finished teacher run in ``run_dir`` (else a
        :class:`~distill.teacher.loading.TeacherError` with ``train_command``), loaded into
        ``net``."""
        path = resolve_teacher_checkpoint(checkpoint, run_dir, train_command)
        return cls(net, path, loss, cache_root, memo_root)

    @classmethod
    def from_config(cls, cfg: Any) -> Teacher:
        """The teacher of a composed training config (``cfg.module`` of a student run)."""
        import hydra

        from distill.objectives import build_objectives

        module = cfg.module
        teacher = cls.load(
            hydra.utils.instantiate(module.teacher_net),
            cfg.loss,
            module.get("teacher_checkpoint"),
            module.teacher_run_dir,
            module.teacher_command,
            module.cache_root,
            module.get("memo_root", DEFAULT_MEMO_ROOT),
        )
        objectives = build_objectives(cfg.loss, hydra.utils.instantiate(cfg.model), teacher.net)
        teacher.require(objectives)
        return teacher

    def train(self, mode: bool = True) -> Teacher:
        """The teacher stays in eval mode whatever its parent does."""
        return super().train(False)

    # ----------------------------------------------------------------- outputs
    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        return self.net(x)

    def explain(self, x: Tensor, y: Tensor) -> Tensor:
        """Online maps (B, h, w) of the classes ``y`` for images ``x`` (detached)."""
        return self.cam(x, y).detach()

    def require(self, objectives: Iterable[Any]) -> None:
        """Serve the :class:`~distill.objectives.TeacherOutput` s that ``objectives``
        (:class:`~distill.objectives.Objective` s) declare, besides logits and maps; a training
        step collects :attr:`needs` (what the loss config's objectives read)."""
        for objective in objectives:
            for output in objective.teacher_outputs():
                check_layers(self.net, output.layers, f"{objective.name} (teacher layers)")
                self.extra[output.name] = output

    def outputs(
        self, batch: Mapping[str, Any], need_logits: bool
    ) -> tuple[Tensor | None, Tensor | None]:
        """Teacher logits (if ``need_logits``) and maps (if it has a CAM) for a training batch
        (:meth:`collect`)."""
        names = (["logits"] if need_logits else []) + (["maps"] if self.cam is not None else [])
        out = self.collect(batch, names)
        return out.get("logits"), out.get("maps")

    def collect(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, Tensor]:
        """The teacher outputs ``names`` for a training batch: ``"logits"``, ``"maps"`` (its CAM
        of the true class) and the :meth:`require` d outputs. Online ones come from one pass
        (the CAM's forward when maps are online), or from the memo when it is enabled (misses
        are computed and stored); cached maps from the offline cache, aligned to the batch. Computed
        outputs are float32 under autocast (bf16/fp16 upcast exactly): the memo stores float32, so
        a run computes the same with and without it."""
        names = list(dict.fromkeys(names))
        unknown = [n for n in names if n not in ("logits", "maps", *self.extra)]
        if unknown or ("maps" in names and self.cam is None):
            raise ValueError(f"the teacher does not provide {unknown or ['maps']}")
        cached = "maps" in names and self.source == "cache"
        live = [n for n in names if not (cached and n == "maps")]
        out: dict[str, Tensor] = {}
        if live and self.memo is not None:
            out.update(self._memo_outputs(batch, live))
        elif live:
            out.update(self._compute(batch["image"], batch["label"], live))
        if cached:
            out["maps"] = self.cached(batch["index"], batch.get("aug"))
        return {n: out[n] for n in names}

    # ----------------------------------------------------------------- offline cache
    def fingerprint(self, datamodule: Any) -> dict[str, Any]:
        """Everything a cached map of ``datamodule``'s training split depends on."""
        return teacher_fingerprint(
            self.checkpoint,
            self.method,
            self.layer,
            self.options,
            datamodule.dataset_id,
            cached_indices(datamodule),
            teacher_sha256=self.sha256,
        )

    def cache_for(self, datamodule: Any) -> MapCache:
        """The cache of this teacher's maps for ``datamodule`` (directory from the fingerprint
        unless ``loss.cache_dir`` is set)."""
        fingerprint = self.fingerprint(datamodule)
        root = Path(self.cache_dir or self.cache_root)
        cache = MapCache(root, fingerprint, fingerprint["num_samples"])
        if self.cache_dir is None:
            cache.directory = cache.directory / cache.key[:16]
        return cache

    def load_cache(self, datamodule: Any) -> None:
        """Load the verified cache and the dataset-index -> cache-row table; a missing, foreign
        or broken cache raises :class:`CacheError` ending with the precompute command."""
        indices = cached_indices(datamodule)
        try:
            maps = self.cache_for(datamodule).load()
        except CacheError as err:
            command = precompute_command(drop_cache_dir=isinstance(err, ForeignCacheError))
            raise CacheError(f"{err}\nPrecompute the teacher maps with:\n    {command}") from None
        position = torch.full((datamodule.num_train_total,), -1, dtype=torch.long)
        position[indices] = torch.arange(len(indices))
        device = self.cached_maps.device
        self.cached_maps, self.cache_position = maps.to(device), position.to(device)

    def cached(self, index: Tensor, aug: Any) -> Tensor:
        """Cached maps of dataset ``index`` pushed through the batch's crop/flip ``aug``."""
        if self.cache_position.numel() == 0:
            raise CacheError("teacher maps come from the cache, but no cache is loaded")
        rows = self.cache_position[index]
        if bool((rows < 0).any()):
            missing = index[rows < 0][:5].tolist()
            raise CacheError(
                f"no cached teacher map for dataset indices {missing}: the cache was "
                "built for another training split; precompute it for this one"
            )
        return align_maps(self.cached_maps[rows], aug, mode=self.map_align)

    # ----------------------------------------------------------------- memo
    @cached_property
    def sha256(self) -> str:
        """SHA-256 of the checkpoint (computed once)."""
        return teacher_digest(self.checkpoint)

    def memo_blocker(self, datamodule: Any) -> str | None:
        """Why a memo would not be exact for this run (None: it is)."""
        if getattr(datamodule, "view_pad", None) is None:
            return (
                "the training augmentation is not in the finite crop/flip view set "
                "(data.extra_augment)"
            )
        seed = getattr(self.cam, "seed", 0)
        if self.cam is not None and self.source == "online" and seed is None:
            return f"the teacher's {self.method} samples without a seed (loss.teacher_cam.seed)"
        return None

    def enable_memo(self, datamodule: Any, precision: str) -> None:
        """Serve logits and online maps from the memo of this teacher, dataset, view policy and
        ``precision``, opening (or creating) its tables now. Refused (a
        :class:`~distill.teacher.cache.CacheError` naming the fix): a memo built for another
        configuration, a damaged table, a directory that cannot be written (read-only file
        system, permissions). Off with a one-line warning: when it could not be exact, or the
        disk is full."""
        if not self.use_memo:
            return
        blocker = self.memo_blocker(datamodule)
        if blocker is not None:
            warnings.warn(f"teacher memo off: {blocker}", stacklevel=2)
            return
        fingerprint = memo_fingerprint(
            self.sha256,
            datamodule.dataset_id,
            datamodule.num_train_total,
            datamodule.view_pad,
            precision,
        )
        hint = (
            "Rerun without loss.memo_dir (every teacher, dataset and precision gets its own memo "
            f"under {self.memo_root}) or point it to an empty directory; it fills during "
            f"training, or ahead of it with:\n    {precompute_command(True, 'loss.memo_dir')}"
        )
        directory = self.memo_dir or Path(self.memo_root) / TeacherMemo.key_of(fingerprint)[:16]
        try:
            self.memo = TeacherMemo(
                directory, fingerprint, rebuild_hint=hint, fill_hint=precompute_command()
            )
            self._memo_tables: dict[str, MemoTable] = {}
            for kind in self._memo_kinds():  # opened now: a damaged one is refused at start
                self._table(kind)
        except OSError as err:
            self.memo = None
            reason = err.strerror or str(err)
            if err.errno in FULL_DISK:
                warnings.warn(
                    f"teacher memo off: cannot write {directory} ({reason})", stacklevel=2
                )
                return
            option = "loss.memo_dir" if self.memo_dir else "module.memo_root"
            raise CacheError(
                f"teacher memo {directory} cannot be written ({reason}): set {option} to a "
                "writable directory, or run without the memo (loss.teacher_memo=false)"
            ) from None

    def _memo_kinds(self) -> list[str]:
        """The memo tables this teacher reads: logits (every miss stores them), online maps and
        the required outputs."""
        maps = ["maps"] if self.cam is not None and self.source == "online" else []
        return ["logits", *maps, *self.extra]

    def _table(self, kind: str) -> MemoTable:
        """The memo's ``logits`` table, the ``maps`` table of this teacher's CAM settings, or
        the table of a required output (named after it and a hash of its description)."""
        assert self.memo is not None
        if kind not in self._memo_tables:
            if kind == "logits":
                name, desc, size = "logits", {"kind": "logits"}, self.num_classes
            elif kind == "maps":
                options = {
                    k: self.options[k] for k in sorted(self.options) if k not in EXECUTION_OPTIONS
                }
                desc = {
                    "kind": "maps",
                    "method": self.method,
                    "layer": self.layer,
                    "options": options,
                }
                name = f"maps-{self.method}-{TeacherMemo.key_of(desc)[:12]}"
                size = self.map_size[0] * self.map_size[1]
            else:
                desc = {"kind": kind, **self.extra[kind].description}
                name = f"{kind}-{TeacherMemo.key_of(desc)[:12]}"
                size = math.prod(self.output_shape(kind))
            self._memo_tables[kind] = self.memo.table(name, size, desc)
        return self._memo_tables[kind]

    def _compute(self, x: Tensor, y: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """The outputs ``names`` of a batch, computed now in one teacher pass (detached)."""
        extras = [self.extra[n] for n in names if n in self.extra]
        layers = [layer for output in extras for layer in output.layers]
        with capture(self.net, layers) as features:
            if "maps" in names:
                out = self.cam.compute(x, y)
                result = {"logits": out.logits.detach(), "maps": out.maps.detach()}
            else:
                result = {"logits": self.logits(x)}
        with torch.no_grad():
            for output in extras:
                found = [features[layer].detach() for layer in output.layers]
                result[output.name] = output.compute(found, result["logits"])
        return {name: _upcast(value) for name, value in result.items()}

    def _memo_outputs(self, batch: Mapping[str, Any], names: Sequence[str]) -> dict[str, Tensor]:
        """``names`` from the memo; the views it lacks are computed (with the logits, which
        every pass gives) and stored."""
        assert self.memo is not None
        x, y = batch["image"], batch["label"]
        rows = self.memo.rows_of(batch["index"], view_ids(batch.get("aug"), len(y), self.memo.pad))
        tables = {n: self._table(n) for n in dict.fromkeys(["logits", *names])}
        hit = torch.ones(len(rows), dtype=torch.bool)
        read: dict[str, Tensor] = {}
        for name in names:
            ok, read[name] = self.memo.read(tables[name], rows)  # CRC-verified; damaged rows miss
            hit &= ok
        miss = (~hit).nonzero().squeeze(1)
        self.memo_lookups += len(rows)
        self.memo_hits += len(rows) - len(miss)
        out = {n: torch.empty(len(rows), *self.output_shape(n), device=x.device) for n in names}
        if len(miss):
            dev_miss = miss.to(x.device)
            new = self._compute(x[dev_miss], y[dev_miss], names)
            self.memo.store({tables[n]: v.float().flatten(1) for n, v in new.items()}, rows[miss])
            for name in names:
                out[name][dev_miss] = new[name].float()
        found = hit.nonzero().squeeze(1)
        if len(found):
            dev_found = found.to(x.device)
            for name in names:
                values = read[name][found].to(x.device)
                out[name][dev_found] = values.view(-1, *self.output_shape(name))
        return out

    @cached_property
    def _probe(self) -> tuple[int, tuple[int, int]]:
        """(classes, (h, w) at the CAM layer; (0, 0) without one) from one 32x32 input."""
        layers = [self.layer] if self.layer is not None else []
        device = next(self.net.parameters()).device
        with capture(self.net, layers) as found:
            logits = self.logits(torch.zeros(1, 3, 32, 32, device=device))
        shape = tuple(found[self.layer].shape) if layers else (0, 0)
        return int(logits.shape[1]), (int(shape[-2]), int(shape[-1]))

    @property
    def num_classes(self) -> int:
        return self._probe[0]

    @property
    def map_size(self) -> tuple[int, int]:
        """(h, w) of the teacher's maps at ``loss.teacher_layer``."""
        return self._probe[1]

    def output_shape(self, name: str) -> tuple[int, ...]:
        """Per-sample shape of output ``name`` (a probe on one 32x32 input, eval mode)."""
        if name == "logits":
            return (self.num_classes,)
        if name == "maps":
            return self.map_size
        if name not in self._output_shapes:
            param = next(self.net.parameters())
            probe = torch.zeros(1, 3, 32, 32, device=param.device, dtype=param.dtype)
            found = self._compute(probe, None, [name])  # type: ignore[arg-type]
            self._output_shapes[name] = tuple(found[name].shape[1:])
        return self._output_shapes[name]

    def memo_hit_rate(self, reset: bool = True) -> float | None:
        """Fraction of memo lookups served from disk since the last reset (None: no lookups)."""
        rate = self.memo_hits / self.memo_lookups if self.memo_lookups else None
        if reset:
            self.memo_lookups = self.memo_hits = 0
        return rate


def _upcast(value: Tensor) -> Tensor:
    """Half-precision values as float32 (exact); float32/float64 ones as they are."""
    return value.float() if value.dtype in (torch.bfloat16, torch.float16) else value
