"""Precompute the teacher's explanation maps for every training image (offline teacher maps).

    python -m distill.precompute loss=shapcam_kd data=cifar10_folder teacher.checkpoint=PATH

Takes the same overrides as ``train.py`` and builds only the teacher
(:meth:`distill.teacher.Teacher.from_config`, the object training uses), so the cache it writes
has exactly the fingerprint the training run will look for. Shards are written as they finish;
rerunning after an interruption computes only the missing shards (and any whose checksum no
longer matches). "teacher maps ready" is printed only after every shard has been verified. Bad
input (no data, no teacher, a cache directory holding another configuration's maps) prints one
message naming the fix, exit status 2.
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

from distill.data.augment import normalize_images
from distill.integrity import IntegrityError
from distill.teacher import CacheError, ForeignCacheError, Teacher, cached_indices
from distill.train import USER_ERRORS, instantiate


def precompute(cfg: DictConfig) -> str:
    """Build (or finish, or repair) the cache for ``cfg`` and return its directory."""
    if cfg.loss.method is None:
        raise CacheError(f"loss={cfg.loss.name} has no explanation term: nothing to precompute")
    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher = Teacher.from_config(cfg).to(device)
    cache = teacher.cache_for(datamodule)

    def compute(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return teacher.explain(normalize_images(images.to(device)), labels.to(device))

    indices = cached_indices(datamodule)
    print(
        f"teacher maps: {cfg.loss.method} at {cfg.loss.teacher_layer}, "
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
