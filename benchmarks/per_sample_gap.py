"""How far the batch-coupled train-mode map is from the per-sample map (the fix's size).

    python benchmarks/per_sample_gap.py [--batch 128] [--data ../shared/data/cifar10-jpeg]

A WRN-16-2 student (fresh initialisation, train mode, as at the start of distillation) at
``block3``. *Coupled* is the old definition: Grad-CAM weights from ``∂(Σ_j U_j)/∂A`` of an
ordinary train-mode forward, where the final BatchNorm's batch statistics couple the samples.
*Per-sample* is ``cams.GradCAM`` (statistics held for ``∂/∂A``). Prints the median / max
relative L2 difference and the min / median cosine similarity over the batch. Uses the first
``--batch`` training images of the image-folder copy when present, else random inputs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

import cams
from distill.models import WideResNet

MEAN = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1) / 255
STD = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1) / 255


def load_batch(root: Path, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not (root / "train").is_dir():
        print(f"{root} not found: random inputs")
        return torch.randn(batch, 3, 32, 32), torch.randint(0, 10, (batch,))
    from torchvision.datasets import ImageFolder
    from torchvision.transforms.functional import pil_to_tensor

    data = ImageFolder(str(root / "train"))
    picks = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))[:batch]
    images = torch.stack([pil_to_tensor(data[int(i)][0]) for i in picks]).float() / 255
    labels = torch.tensor([data.targets[int(i)] for i in picks])
    return (images - MEAN) / STD, labels


def coupled_gradcam(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    box = {}
    handle = model.block3.register_forward_hook(lambda m, i, o: box.setdefault("a", o))
    logits = model(x)
    handle.remove()
    a = box["a"]
    (g,) = torch.autograd.grad(logits.gather(1, y[:, None]).sum(), a)
    return torch.relu((g.mean((2, 3), keepdim=True) * a).sum(1)).detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10-jpeg"))
    args = parser.parse_args()
    torch.manual_seed(0)
    model = WideResNet(16, 2).train()
    x, y = load_batch(args.data, args.batch)
    coupled = coupled_gradcam(model, x, y)
    per_sample = cams.GradCAM(model, "block3")(x, y)
    norms = torch.stack([coupled.flatten(1).norm(dim=1), per_sample.flatten(1).norm(dim=1)])
    nonzero = (norms > 0).all(0)  # a ReLU can zero one definition's map entirely
    rel = (coupled - per_sample).flatten(1).norm(dim=1) / norms.amax(0).clamp_min(1e-12)
    cos = F.cosine_similarity(coupled.flatten(1), per_sample.flatten(1), dim=1)[nonzero]
    print(
        f"WRN-16-2 block3, train mode, batch {args.batch}: relative L2 difference (to the "
        f"larger map) median {rel.median():.1%}, max {rel.max():.1%}; cosine over the "
        f"{int(nonzero.sum())} samples where both maps are nonzero: min {cos.min():.3f}, "
        f"median {cos.median():.3f}; maps all-zero in one definition only: "
        f"{int((norms > 0).sum(0).eq(1).sum())}"
    )


if __name__ == "__main__":
    main()
