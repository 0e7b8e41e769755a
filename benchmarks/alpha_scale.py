"""Evidence for the default alpha: size of the explanation term next to cross-entropy.

    python benchmarks/alpha_scale.py --teacher PATH.ckpt [--teacher-depth 40] [--batch 128]

For a freshly initialised WRN-16-2 student and a trained teacher, on one batch of real training
images (the shared image-folder copy; synthetic data if absent), prints per registered CAM method
(``cams.METHODS``) the value of the explanation term ||N(L_s) - N(L_t)||^2 (L2 normalization,
summed over positions, batch mean), the CE value, and the ratio of their gradient norms w.r.t. the
student's parameters. alpha = 1 balances the two terms when that ratio is near 1.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import cams
from distill.data import CIFAR10DataModule
from distill.data.augment import normalize_images
from distill.losses import explanation_loss
from distill.models import WideResNet
from distill.teacher import load_teacher
from distill.train import repo_root

# measurement choices that differ from a method's defaults; every other method runs as built
OPTIONS = {
    "scorecam": {"max_channels": 16},
    "shapleycam": {"utility": "rest"},
    "shapcam": {"n_permutations": 256},
}


def grad_norm(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> float:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return float(torch.sqrt(sum((g**2).sum() for g in grads if g is not None)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--teacher-depth", type=int, default=40)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--seeds", type=int, default=3, help="student initialisations")
    args = parser.parse_args()
    root = f"{repo_root()}/../shared/data/cifar10-jpeg"
    try:
        dm = CIFAR10DataModule(
            source="folder", root=root, download=False, cache_dir=f"{repo_root()}/data/cache"
        )
        dm.prepare_data()
        dm.setup("fit")
    except Exception:  # noqa: BLE001  (no shared copy: synthetic data)
        dm = CIFAR10DataModule(source="synthetic", download=False)
        dm.prepare_data()
        dm.setup("fit")
    idx = torch.randperm(len(dm.train_labels), generator=torch.Generator().manual_seed(0))
    idx = idx[: args.batch]
    x, y = normalize_images(dm.train_images[idx]), dm.train_labels[idx]
    teacher = load_teacher(WideResNet(args.teacher_depth, 2), args.teacher)
    print("| method | CE | cam term | ‖∇cam‖ / ‖∇CE‖ (mean over student seeds) |")
    print("|---|---|---|---|")
    for method in cams.METHODS:
        options = OPTIONS.get(method, {})
        t_maps = cams.build(method, teacher, "block3", **options)(x, y)
        ce_vals, cam_vals, ratios = [], [], []
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            student = WideResNet(16, 2).train()
            params = list(student.parameters())
            out = cams.build(method, student, "block3", **options).compute(x, y, create_graph=True)
            ce = F.cross_entropy(out.logits, y)
            cam = explanation_loss(out.maps, t_maps, "l2")
            ce_vals.append(ce.item())
            cam_vals.append(cam.item())
            ratios.append(grad_norm(cam, params) / grad_norm(ce, params))
        n = args.seeds
        print(
            f"| {method} | {sum(ce_vals) / n:.3f} | {sum(cam_vals) / n:.3f} | "
            f"{sum(ratios) / n:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
