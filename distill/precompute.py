"""Precompute what a run's teacher provides: offline maps, or every view of the output memo.

    python -m distill.precompute loss=shapcam_kd data=cifar10_folder teacher.checkpoint=PATH
    python -m distill.precompute loss=gradcam_kd data=cifar10_folder teacher.checkpoint=PATH

With ``loss.teacher_maps=cache`` (Shap-CAM's presets) it builds the offline map cache described
below. Otherwise it fills the teacher-output memo (:mod:`distill.teacher.memo`) for every
training image and every one of its crop/flip views (162 with ``pad=4``), in the precision and
memory format training will use: every teacher output the preset's objectives read (the logits,
online CAM maps, AT's attention maps, CAT-KD's pooled CAMs, ...). The memo also fills lazily
during training, so this is optional (on a GPU it takes minutes; on a CPU hours); an
interrupted fill resumes where it stopped.

Takes the same overrides as ``train.py`` and builds only the teacher
(:meth:`distill.teacher.Teacher.from_config`, the object training uses), so the cache it writes
has exactly the fingerprint the training run will look for. Shards are written as they finish;
rerunning after an interruption computes only the missing shards (and any whose checksum no
longer matches). "teacher maps ready" is printed only after every shard has been verified. Bad
input (no data, no teacher, a cache directory holding another configuration's maps) prints one
message naming the fix, exit status 2.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from distill.integrity import IntegrityError
from distill.objectives import teacher_needs
from distill.precision import use_channels_last
from distill.teacher import CacheError, ForeignCacheError, Teacher, cached_indices
from distill.teacher.memo import num_views, view_params
from distill.train import USER_ERRORS, instantiate


def precompute(cfg: DictConfig) -> str:
    """Build (or finish, or repair) the cache, or fill the memo, for ``cfg``; its directory."""
    if not teacher_needs(OmegaConf.to_container(cfg.loss, resolve=True)):  # type: ignore[arg-type]
        raise CacheError(f"loss={cfg.loss.name} uses no teacher: nothing to precompute")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = Teacher.from_config(cfg).to(device)
    if cfg.loss.method is None or cfg.loss.teacher_maps != "cache":
        return fill_memo(cfg, teacher, datamodule, device)
    cache = teacher.cache_for(datamodule)

    def compute(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return teacher.explain(datamodule.normalize(images.to(device)), labels.to(device))

    indices = cached_indices(datamodule)
    print(
        f"teacher maps: {cfg.loss.method} at {teacher.layer}, "
        f"{len(indices)} training images -> {cache.directory}"
    )
    cache.build(
        compute,
        datamodule.train_images[indices],
        datamodule.train_labels[indices],
        batch_size=int(cfg.get("precompute_batch_size", 256)),
    )
    print(f"teacher maps ready: {cache.directory}")
    return str(cache.directory)


def lightning_precision(precision: Any) -> str:
    """Lightning's name of a ``trainer.precision`` value (``bf16`` -> ``bf16-mixed``, ...)."""
    aliases = {"32": "32-true", "16": "16-mixed", "bf16": "bf16-mixed", "64": "64-true"}
    return aliases.get(str(precision), str(precision))


def fill_memo(cfg: DictConfig, teacher: Teacher, datamodule: Any, device: torch.device) -> str:
    """Every (training image, view) of the teacher-output memo, in training's precision."""
    precision = lightning_precision(cfg.trainer.precision)
    if not cfg.loss.get("teacher_memo", True):
        raise CacheError("loss.teacher_memo=false: there is no memo to fill")
    teacher.enable_memo(datamodule, precision)
    if teacher.memo is None:
        raise CacheError("the teacher memo is off for this configuration (see the warning)")
    channels_last = use_channels_last(cfg.module.get("channels_last", False), precision)
    if channels_last:
        teacher.net.to(memory_format=torch.channels_last)
    indices = datamodule.train_indices.sort().values
    pad, size = datamodule.view_pad, int(cfg.get("precompute_batch_size", 256))
    needs = list(dict.fromkeys(["logits", *teacher.needs]))  # the logits always (as KD reads)
    outputs = ", ".join(f"{teacher.method} maps" if n == "maps" else n for n in needs)
    print(
        f"teacher memo: {outputs} ({precision}), {len(indices)} training "
        f"images x {num_views(pad)} views -> {teacher.memo.directory}",
        flush=True,
    )
    autocast = _autocast(precision, device)
    n_views = num_views(pad)
    total = len(indices) * n_views
    for start in range(0, total, size):  # (index, view) pairs, view-major
        pair = torch.arange(start, min(start + size, total))
        idx, aug = indices[pair % len(indices)], view_params(pair // len(indices), pad)
        images = datamodule.normalize(aug.apply(datamodule.train_images[idx]).to(device))
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = datamodule.train_labels[idx].to(device)
        with autocast:
            batch = {"image": images, "label": labels, "index": idx, "aug": aug}
            teacher.collect(batch, needs)
        if not (teacher.memo.writable and teacher.memo.readable):  # full disk, ... (warned)
            raise CacheError(
                f"teacher memo {teacher.memo.directory} could not be written; the views done "
                "so far are kept: make room and run this command again to finish it"
            )
        if (start // size) % 200 == 199:
            print(f"  {start + len(pair)}/{total} views done", flush=True)
    print(f"teacher memo ready: {teacher.memo.directory}", flush=True)
    return str(teacher.memo.directory)


def _autocast(precision: str, device: torch.device) -> Any:
    if precision == "bf16-mixed":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "16-mixed":
        return torch.autocast(device.type, dtype=torch.float16)
    return contextlib.nullcontext()


def error_message(err: Exception, cache_dir: str | None) -> str:
    """The one message printed for a user error; a cache directory of another configuration
    named by ``loss.cache_dir`` gets the fix spelled as overrides."""
    if isinstance(err, ForeignCacheError) and cache_dir:
        return (
            f"error: loss.cache_dir={cache_dir} holds teacher maps built for another "
            f"configuration ({err.diff}); it is left untouched. Rerun without loss.cache_dir "
            "(each configuration then gets its own directory under cache/teacher_maps/, which "
            "training finds without the option too) or with loss.cache_dir=<an empty directory>"
        )
    return f"error: {err}"


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        precompute(cfg)
    except (*USER_ERRORS, IntegrityError) as err:
        print(error_message(err, cfg.loss.get("cache_dir")), file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main()
