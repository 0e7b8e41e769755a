"""Precompute the teacher's explanation maps for every training image (offline teacher maps).

    python -m distill.precompute loss=shapcam_kd data=cifar10_folder teacher.checkpoint=PATH

Takes the same overrides as ``train.py``, so the cache it writes has exactly the fingerprint the
training run will look for. Shards are written as they finish; rerunning after an interruption
computes only the missing shards.
"""

from __future__ import annotations

import sys

import hydra
import torch
from omegaconf import DictConfig

import distill.train  # noqa: F401  (registers the repo_root resolver)
from distill.data.augment import normalize
from distill.explain import TeacherError
from distill.teacher_maps import CacheError


def precompute(cfg: DictConfig) -> str:
    """Build the cache for ``cfg`` and return its directory."""
    if cfg.loss.method is None:
        raise CacheError(f"loss={cfg.loss.name} has no explanation term: nothing to precompute")
    datamodule = hydra.utils.instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    module = hydra.utils.instantiate(cfg.module, net=hydra.utils.instantiate(cfg.model))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    teacher_cam = module.teacher_cam
    module.teacher.to(device)
    cache = module.map_cache(datamodule)

    def compute(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        x = normalize(images.to(device))
        return teacher_cam(x, labels.to(device))

    indices = module.cached_indices(datamodule)
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


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    try:
        precompute(cfg)
    except (CacheError, TeacherError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
