"""Image grids of inputs with teacher and student CAM overlays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torchvision.utils import make_grid, save_image

import cams
from distill.data.augment import denormalize_images


def cam_grid(images: Tensor, teacher: Tensor, student: Tensor) -> Tensor:
    """Three rows: the images, teacher overlays, student overlays; images in [0, 1]."""
    size = images.shape[-2:]
    rows = [images]
    for maps in (teacher, student):
        heat = cams.upsample(cams.normalize(maps.detach().float(), "minmax"), size)
        rows.append(cams.overlay(images, heat))
    return make_grid(torch.cat(rows), nrow=len(images), padding=1)


def log_cam_grid(module: Any, image: Tensor, teacher: Tensor, student: Tensor) -> Path:
    """Save the grid as PNG in the run directory and send it to image-capable loggers."""
    images = denormalize_images(image.float().cpu()).clamp(0, 1)
    grid = cam_grid(images, teacher.cpu(), student.cpu())
    epoch = module.current_epoch
    path = Path(module.trainer.default_root_dir) / "cam_grids" / f"epoch_{epoch:03d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path)
    for logger in module.loggers:
        experiment = getattr(logger, "experiment", None)
        if hasattr(logger, "log_image"):  # wandb
            logger.log_image(key="cam_grid", images=[grid], step=module.global_step)
        elif hasattr(experiment, "add_image"):  # tensorboard
            experiment.add_image("cam_grid", grid, global_step=module.global_step)
    return path
