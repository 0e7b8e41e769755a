"""CAM maps under bf16 autocast vs float32: per-sample cosine, time, and what the fp32 parts buy.

For every method of :data:`cams.METHODS` (with the options of its loss preset, teacher or student
side) the maps of the true class are computed twice on the same test images, in float32 and under
``torch.autocast("cpu", dtype=torch.bfloat16)``, and compared per sample (cosine of the flattened
maps). Two networks, used as in training:

* the teacher (WRN-40-2, eval mode, under ``no_grad``), from ``--teacher`` (a ``{"state_dict"}``
  checkpoint with ``net.`` keys, e.g. a Lightning ``last.ckpt``);
* a student (WRN-16-2, train mode, ``create_graph=True``; ``--student`` or a random init), for
  which the gradient of the explanation loss ``||N(L_s) - N(L_t)||²`` (fp32 teacher maps as the
  target) w.r.t. the student's parameters is compared too (cosine of the whole gradient vector,
  per batch).

``naive`` repeats the bf16 run with the fp32 parts of :mod:`cams._precision` switched off
(``fp32_parts(False)``: no float32 copies, the map arithmetic left to autocast): the difference
is what they buy. The "network rounding" lines give the rounding of the network itself (cosine
of the target activation, largest logit error), the floor no CAM arithmetic can beat.

    python benchmarks/amp_maps.py --teacher runs/teacher/<run>/checkpoints/last.ckpt \\
        --root ../shared/data/cifar10-jpeg --images 512
"""

from __future__ import annotations

import argparse
import contextlib
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine_line, stopwatch
from torch import Tensor, nn

import cams
from cams._base import preserve_state
from cams._precision import fp32_parts
from distill.losses import explanation_loss

ROOT = Path(__file__).resolve().parents[1]


def bf16() -> torch.autocast:
    return torch.autocast("cpu", dtype=torch.bfloat16)


def load_net(depth: int, ckpt: str | None) -> nn.Module:
    from distill.models import WideResNet

    torch.manual_seed(0)
    net = WideResNet(depth, 2)
    if ckpt:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        net.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("net.")})
    return net


def preset_options(method: str, side: str) -> dict:
    from hydra import compose, initialize_config_dir

    import distill.train  # noqa: F401  (resolvers)
    from distill.loss_config import LossConfig

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"loss={method}"])
    return LossConfig.from_mapping(cfg.loss).options(side)


def test_images(root: str, n: int) -> tuple[Tensor, Tensor]:
    """``n`` test images, stratified over the classes (the folder copy is sorted by class)."""
    from distill.data import CIFAR10DataModule
    from distill.data.augment import normalize_images

    dm = CIFAR10DataModule(source="folder", root=root, cache_dir="/tmp/amp_cache", download=False)
    images, labels = dm.test_images, dm.test_labels
    idx = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))[:n]
    return normalize_images(images[idx]), labels[idx]


def accuracy(net: nn.Module, x: Tensor, y: Tensor) -> float:
    net.eval()
    with torch.no_grad():
        return float(torch.cat([net(b).argmax(1) for b in x.split(256)]).eq(y).float().mean())


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """Per-sample cosine of flattened maps; 1 where both maps are all zero (the same map)."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    both_zero = ~a.any(1) & ~b.any(1)
    return torch.where(both_zero, 1.0, F.cosine_similarity(a, b, dim=1, eps=1e-30))


def stats(c: Tensor) -> dict[str, float]:
    return {
        "mean": float(c.mean()),
        "p5": float(torch.quantile(c, 0.05)),
        "min": float(c.min()),
    }


def ce_gradient_cosine(net: nn.Module, x: Tensor, y: Tensor, batch: int) -> float:
    """The reference for the explanation term: smallest cosine over batches between the bf16
    and fp32 gradients of the cross-entropy alone (train mode)."""
    params = [p for p in net.parameters() if p.requires_grad]
    out = []
    for xb, yb in zip(x.split(batch), y.split(batch), strict=True):
        grads = []
        for ctx in (contextlib.nullcontext, bf16):
            with ctx():
                loss = F.cross_entropy(net(xb), yb)
            g = torch.autograd.grad(loss, params)
            grads.append(torch.cat([t.flatten() for t in g]))
        out.append(float(F.cosine_similarity(grads[1].double(), grads[0].double(), dim=0)))
    return min(out)


def network_rounding(net: nn.Module, x: Tensor, layer: str) -> dict[str, float]:
    """Cosine of the target activation and the largest logit error, bf16 vs fp32."""
    out: dict[str, Tensor] = {}
    handle = dict(net.named_modules())[layer].register_forward_hook(
        lambda m, i, o: out.__setitem__("a", o.float())
    )
    try:
        with torch.no_grad():
            ref = net(x)
            a_ref = out["a"]
            with bf16():
                low = net(x).float()
            a_low = out["a"]
    finally:
        handle.remove()
    return {**{f"A_{k}": v for k, v in stats(cosine(a_low, a_ref)).items()},
            "logit_max_err": float((low - ref).abs().max()),
            "logit_scale": float(ref.abs().max())}  # fmt: skip


Run = Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, list[Tensor]]]


def signed(cam: cams.BaseCAM) -> tuple[cams.BaseCAM, bool]:
    """``cam`` switched to signed maps, and whether its preset applies the final ReLU (applied
    by the runs below, so one computation gives both maps)."""
    relu, cam.relu = cam.relu, False
    return cam, relu


def teacher_run(cam: cams.BaseCAM) -> Run:
    """Signed maps under ``no_grad`` (the teacher's maps are constants)."""
    cam, _ = signed(cam)

    def run(x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        with torch.no_grad():
            return cam(x, y), []

    return run


def student_run(cam: cams.BaseCAM) -> Run:
    """Signed maps with ``create_graph=True`` and the gradient of the explanation loss on the
    preset's maps w.r.t. the parameters (backward outside autocast, as Lightning does)."""
    cam, relu = signed(cam)
    params = [p for p in cam.model.parameters() if p.requires_grad]

    def run(x: Tensor, y: Tensor, target: Tensor | None) -> tuple[Tensor, list[Tensor]]:
        maps = cam(x, y, create_graph=True)
        loss = explanation_loss(torch.relu(maps) if relu else maps, target, "l2")
        with torch.autocast("cpu", enabled=False):
            grads = torch.autograd.grad(loss, params, allow_unused=True)
        flat = torch.cat([g.flatten() for g in grads if g is not None])
        return maps.detach(), [flat]

    return run


def measure(run: Run, x: Tensor, y: Tensor, target: Tensor | None, batch: int, ctx) -> tuple:
    maps, grads = [], []
    with ctx():  # warm-up (head detection, first-call allocations), untimed
        run(x[:2], y[:2], None if target is None else target[:2])
    targets = target.split(batch) if target is not None else [None] * len(x.split(batch))
    with stopwatch() as sw:
        for xb, yb, tb in zip(x.split(batch), y.split(batch), targets, strict=True):
            with ctx():
                m, g = run(xb, yb, tb)
            maps.append(m.float())
            grads += g
    return torch.cat(maps), grads, sw.seconds, m.dtype


def naive_bf16() -> contextlib.ExitStack:
    """bf16 autocast with the fp32 parts of :mod:`cams._precision` switched off."""
    stack = contextlib.ExitStack()
    stack.enter_context(bf16())
    stack.enter_context(fp32_parts(False))
    return stack


def grad_cosines(grads: list[Tensor], ref: list[Tensor]) -> float:
    """The smallest cosine over batches between whole-gradient vectors."""
    pairs = zip(grads, ref, strict=True)
    return min(float(F.cosine_similarity(a.double(), b.double(), dim=0)) for a, b in pairs)


def compare(
    name: str, role: str, run: Run, relu: bool, x: Tensor, y: Tensor, target: Tensor | None,
    batch: int,
) -> tuple[dict, Tensor]:  # fmt: skip
    """The row of one method and network, and the fp32 maps as the preset defines them.

    Order fp32, bf16, naive, fp32, bf16: the times are the faster of the two runs of each."""
    ref, g_ref, t_ref, _ = measure(run, x, y, target, batch, contextlib.nullcontext)
    low, g_low, t_low, dtype = measure(run, x, y, target, batch, bf16)
    nai, g_nai, _, _ = measure(run, x, y, target, batch, naive_bf16)
    t_ref = min(t_ref, measure(run, x, y, target, batch, contextlib.nullcontext)[2])
    t_low = min(t_low, measure(run, x, y, target, batch, bf16)[2])
    row = {"role": role, "method": name, "n": len(x), "dtype": str(dtype).replace("torch.", "")}
    pre_ref, pre_low = (torch.relu(ref), torch.relu(low)) if relu else (ref, low)
    zero_ref, zero_low = ~pre_ref.flatten(1).any(1), ~pre_low.flatten(1).any(1)
    row |= {f"preset_{k}": v for k, v in stats(cosine(pre_low, pre_ref)).items()}
    row["zero_flips"] = int((zero_ref != zero_low).sum())
    row |= {f"signed_{k}": v for k, v in stats(cosine(low, ref)).items()}
    row |= {f"naive_{k}": v for k, v in stats(cosine(nai, ref)).items()}
    row |= {"t_fp32": t_ref, "t_bf16": t_low}
    if g_ref:
        row |= {"grad_cos_ours": grad_cosines(g_low, g_ref),
                "grad_cos_naive": grad_cosines(g_nai, g_ref)}  # fmt: skip
    return row, pre_ref


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="WRN-40-2 checkpoint")
    parser.add_argument("--student", default=None, help="WRN-16-2 checkpoint (default: random)")
    parser.add_argument("--root", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--scorecam-images", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--methods", nargs="*", default=list(cams.METHODS))
    parser.add_argument("--out", default=None, help="also write the rows as JSON lines here")
    args = parser.parse_args()

    x, y = test_images(args.root, args.images)
    teacher, student = load_net(40, args.teacher), load_net(16, args.student)
    print(f"# teacher test accuracy on these {len(y)} images: {accuracy(teacher, x, y):.3f}")
    print(f"# student test accuracy: {accuracy(student, x, y):.3f}")
    for role, net in (("teacher", teacher), ("student", student)):
        print(f"# {role} network rounding at block3: {network_rounding(net.eval(), x, 'block3')}")
    with preserve_state(student.train()):
        ce_cos = ce_gradient_cosine(student, x, y, args.batch)
    print(f"# student CE gradient cosine bf16 vs fp32 (min over batches): {ce_cos:.4f}")
    teacher.eval()
    student.train()
    rows = []
    for name in args.methods:
        n = min(len(x), args.scorecam_images) if name == "scorecam" else len(x)
        xs, ys = x[:n], y[:n]
        t_cam = cams.build(name, teacher, "block3", **preset_options(name, "teacher"))
        relu = t_cam.relu  # read before teacher_run switches the CAM to signed maps
        row, t_maps = compare(name, "teacher", teacher_run(t_cam), relu, xs, ys, None, args.batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
        s_cam = cams.build(name, student, "block3", **preset_options(name, "student"))
        relu = s_cam.relu
        row, _ = compare(name, "student", student_run(s_cam), relu, xs, ys, t_maps, args.batch)
        rows.append(row)
        print(json.dumps(row), flush=True)
    print()
    print(f"machine: {machine_line()}")
    print()
    print("| network | method | n | preset maps: mean / p5 / min (zero-map flips) "
          "| signed maps: mean / p5 / min | naive, signed: mean / p5 / min "
          "| loss-gradient cosine ours / naive | fp32 s | bf16 s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        grad = (
            f"{r['grad_cos_ours']:.4f} / {r['grad_cos_naive']:.4f}" if "grad_cos_ours" in r else "—"
        )
        print(
            f"| {r['role']} | {r['method']} | {r['n']} "
            f"| {r['preset_mean']:.5f} / {r['preset_p5']:.5f} / {r['preset_min']:.5f} "
            f"({r['zero_flips']}) "
            f"| {r['signed_mean']:.5f} / {r['signed_p5']:.5f} / {r['signed_min']:.5f} "
            f"| {r['naive_mean']:.5f} / {r['naive_p5']:.5f} / {r['naive_min']:.5f} "
            f"| {grad} | {r['t_fp32']:.1f} | {r['t_bf16']:.1f} |"
        )
    if args.out:
        Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
