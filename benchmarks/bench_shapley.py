"""Shap-CAM estimator benchmark: throughput on WRN-40-2 games and error vs exact Shapley.

Usage (results go to BENCHMARKS.md, section "Shap-CAM estimator")::

    python benchmarks/bench_shapley.py                       # both parts
    python benchmarks/bench_shapley.py --part throughput --maps 1024 --perms 10000
    python benchmarks/bench_shapley.py --part accuracy --reps 10
    git show REV:cams/_additive_shapley.py > /tmp/shapley_old.py   # cams/_shapley.py before 2026-12
    python benchmarks/bench_shapley.py --part kernel --baseline-module /tmp/shapley_old.py

Kernel: the estimator alone on one WRN-40-2 game batch, in the training step's settings (teacher
forward 1,000 orderings; student forward + backward, 256 antithetic or 1,000), with the scans at
``num_threads=1`` (default) and at torch's thread count, optionally against another version of
``cams/_additive_shapley.py`` (``--baseline-module``, run with torch's threads); calls alternate,
medians.

Throughput: a WRN-40-2 (random weights unless ``--checkpoint``) on random 32x32 inputs;
the game of each image has the 8x8 = 64 positions of ``block3`` (the last conv output) as
players, absent positions at the per-channel spatial mean, and the class probability of the
predicted class as worth.  BN (eval) and ReLU act per position before the global average
pool, so coalition logits are additive: ``y(S) = fc(h(m)) + sum_{j in S} W (h(a_j) - h(m))
/ 64`` with ``h = relu(bn(.))`` and ``m`` the mean feature; this is the fast path
``additive_game_shapley`` serves.  The forward pass and the estimator are timed separately.

Accuracy: a 12-player game (a 3x4 feature map, a per-position ReLU layer, average pool,
linear, softmax probability of the predicted class; 8 images), exact Shapley values by
enumerating 4096 coalitions; relative L2 error (over all images and players) of plain and
antithetic permutation sampling and of captum's ``ShapleyValueSampling`` at equal numbers
of permutations.  captum is given the per-image mean feature as its baseline so absent
positions mean the same thing in both (captum's default baseline is 0).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
from collections.abc import Callable

import torch
from _common import load_str, machine_line, stopwatch
from torch import Tensor, nn

from cams._additive_shapley import additive_game_shapley
from cams._shapley import exact_shapley, utility_fn

# ------------------------------------------------------------------------- throughput


def wrn_block3_game(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Base logits (B, K), contributions (B, 64, K) and logits of a WRN at ``block3``."""
    feats: list[Tensor] = []
    handle = model.block3.register_forward_hook(lambda m, i, o: feats.append(o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = feats[0]  # (B, C, 8, 8)
    h = model.relu(model.bn(a)).flatten(2)  # (B, C, P), per position
    h_mean = model.relu(model.bn(a.mean((2, 3), keepdim=True))).flatten(2)  # (B, C, 1)
    w = model.fc.weight
    base = model.fc(h_mean[..., 0])
    contrib = (h - h_mean).transpose(1, 2) @ w.T / h.shape[-1]
    return base, contrib, logits


def run_throughput(args: argparse.Namespace) -> dict[str, float]:
    from distill.models.wrn import wrn40_2

    model = wrn40_2().eval()
    if args.checkpoint:
        state = torch.load(args.checkpoint, map_location="cpu")
        model.load_state_dict(state.get("state_dict", state))
    gen = torch.Generator().manual_seed(0)
    t_fwd = t_shap = cpu_shap = 0.0
    done, check = 0, 0.0
    while done < args.maps:
        x = torch.randn(args.batch, 3, 32, 32, generator=gen)
        with stopwatch() as fwd, torch.no_grad():
            base, contrib, logits = wrn_block3_game(model, x)
        t_fwd += fwd.seconds
        check = max(check, float((base + contrib.sum(1) - logits).abs().max()))
        targets = logits.argmax(1)
        with stopwatch() as est, torch.no_grad():
            phi = additive_game_shapley(
                base,
                contrib,
                targets,
                "prob",
                args.perms,
                generator=done,
                chunk_size=args.chunk,
                num_threads=None,  # --threads sets them
            )
        t_shap += est.seconds
        cpu_shap += est.cpu_seconds
        assert torch.isfinite(phi).all()
        done += args.batch
        print(f"  {done} maps: estimator {t_shap:.1f} s, forward {t_fwd:.1f} s", flush=True)
    rate = done / t_shap
    return {
        "maps": done,
        "permutations": args.perms,
        "batch": args.batch,
        "threads": torch.get_num_threads(),
        "additivity_max_abs_err": check,
        "estimator_s": t_shap,
        "estimator_cpu_s": cpu_shap,
        "forward_s": t_fwd,
        "estimator_maps_per_s": rate,
        "prefix_evals_per_s": rate * args.perms * 64,
        "extrapolated_50k_estimator_s": 50_000 / rate,
        "extrapolated_50k_total_s": 50_000 * (t_shap + t_fwd) / done,
    }


# ----------------------------------------------------------------------------- kernel

KERNEL_CASES = {  # name -> (permutations, antithetic, backward)
    "teacher forward, 1,000 perm.": (1000, False, False),
    "student fwd+bwd, 256 antithetic": (256, True, True),
    "student fwd+bwd, 1,000 perm.": (1000, False, True),
    "forward, 10^4 perm. (precompute)": (10_000, False, False),
}


def load_estimator(path: str) -> Callable[..., Tensor]:
    """``additive_game_shapley`` from another copy of its module (``cams/_additive_shapley.py``, or
    ``cams/_shapley.py`` of commits before the split)."""
    spec = importlib.util.spec_from_file_location("baseline_shapley", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.additive_game_shapley


def run_kernel(args: argparse.Namespace) -> str:
    from distill.models.wrn import wrn40_2

    model = wrn40_2().eval()
    x = torch.randn(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base, contrib, logits = wrn_block3_game(model, x)
    targets = logits.argmax(1)
    impls: dict[str, Callable[..., Tensor]] = {
        "this checkout, 1 scan thread": additive_game_shapley,
        "this checkout, torch's threads": lambda *a, **k: additive_game_shapley(
            *a, **k, num_threads=None
        ),
    }
    if args.baseline_module:
        impls[f"baseline {args.baseline_module}"] = load_estimator(args.baseline_module)
    lines = ["| case | " + " | ".join(impls) + " |", "|---" * (len(impls) + 1) + "|"]
    for case, (perms, antithetic, backward) in KERNEL_CASES.items():
        times: dict[str, list[float]] = {name: [] for name in impls}
        for rep in range(args.reps + 1):
            for name, impl in impls.items():
                c = contrib.clone().requires_grad_(backward)
                with stopwatch() as sw:
                    phi = impl(base, c, targets, "prob", perms, antithetic=antithetic, generator=0)
                    if backward:
                        phi.square().sum().backward()
                if rep:  # the first round warms up
                    times[name].append(sw.seconds)
        cells = [f"{1000 * statistics.median(t):.1f}" for t in times.values()]
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


# --------------------------------------------------------------------------- accuracy


class TinyHead(nn.Module):
    """Per-position linear + ReLU, global average pool, linear, softmax: (B, C, P) -> (B, K)."""

    def __init__(self, channels: int = 8, hidden: int = 16, classes: int = 10) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(1)
        self.w1 = torch.randn(hidden, channels, generator=gen, dtype=torch.float64)
        self.b1 = torch.randn(hidden, 1, generator=gen, dtype=torch.float64)
        self.w2 = torch.randn(classes, hidden, generator=gen, dtype=torch.float64) * 0.8

    def hidden(self, f: Tensor) -> Tensor:
        return torch.relu(torch.einsum("hc,...cp->...hp", self.w1, f) + self.b1)

    def logits(self, f: Tensor) -> Tensor:
        return self.hidden(f).mean(-1) @ self.w2.T

    def forward(self, f: Tensor) -> Tensor:
        return torch.softmax(self.logits(f), -1)


def accuracy_game(n_images: int = 8, p: int = 12) -> tuple[TinyHead, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(2)
    feats = torch.randn(n_images, 8, p, generator=gen, dtype=torch.float64)
    head = TinyHead()
    return head, feats, head.logits(feats).argmax(-1)


def masked_value_fn(head: TinyHead, feats: Tensor, targets: Tensor) -> Callable[[Tensor], Tensor]:
    mean = feats.mean(-1, keepdim=True)
    prob = utility_fn("prob")

    def value_fn(masks: Tensor) -> Tensor:
        m = masks.to(feats.dtype)[None, :, None, :]
        f = feats[:, None] * m + mean[:, None] * (1 - m)
        return prob(head.logits(f), targets[:, None].expand(-1, masks.shape[0]))

    return value_fn


def additive_parts(head: TinyHead, feats: Tensor) -> tuple[Tensor, Tensor]:
    mean = feats.mean(-1, keepdim=True)
    base = head.logits(mean.expand_as(feats))
    delta = (head.hidden(feats) - head.hidden(mean)) / feats.shape[-1]
    return base, delta.transpose(1, 2) @ head.w2.T


def captum_estimate(head: TinyHead, feats: Tensor, targets: Tensor, n: int, seed: int) -> Tensor:
    from captum.attr import ShapleyValueSampling

    p = feats.shape[-1]
    mask = (
        torch.arange(p).expand(1, feats.shape[1], p).contiguous()
    )  # all channels of a position together
    baseline = feats.mean(-1, keepdim=True).expand_as(feats).contiguous()
    torch.manual_seed(seed)
    svs = ShapleyValueSampling(head)
    attr = svs.attribute(
        feats,
        baselines=baseline,
        target=targets,
        feature_mask=mask,
        n_samples=n,
        perturbations_per_eval=p,
    )
    return attr[:, 0, :]  # every channel of a position carries the position's value


def run_accuracy(args: argparse.Namespace) -> list[dict[str, float]]:
    head, feats, targets = accuracy_game()
    p = feats.shape[-1]
    exact = exact_shapley(masked_value_fn(head, feats, targets), p)
    base, contrib = additive_parts(head, feats)
    rows = []
    for n in args.n_list:
        row: dict[str, float] = {"permutations": n}
        for name in ("plain", "antithetic", "captum"):
            errs, secs = [], 0.0
            for rep in range(args.reps):
                seed = 1000 * n + rep
                with stopwatch() as sw:
                    if name == "captum":
                        est = captum_estimate(head, feats, targets, n, seed)
                    else:
                        est = additive_game_shapley(
                            base, contrib, targets, "prob", n,
                            antithetic=name == "antithetic", generator=seed,
                        )  # fmt: skip
                secs += sw.seconds
                errs.append(float((est - exact).norm() / exact.norm()))
            row[f"{name}_err"] = statistics.mean(errs)
            row[f"{name}_err_sd"] = statistics.stdev(errs) if len(errs) > 1 else 0.0
            row[f"{name}_ms"] = 1e3 * secs / args.reps
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown_table(rows: list[dict[str, float]]) -> str:
    lines = [
        "| permutations | plain rel. L2 err | antithetic | captum SVS "
        "| ms plain / antithetic / captum |",
        "|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['permutations']} | {r['plain_err']:.4f} ± {r['plain_err_sd']:.4f} "
            f"| {r['antithetic_err']:.4f} ± {r['antithetic_err_sd']:.4f} "
            f"| {r['captum_err']:.4f} ± {r['captum_err_sd']:.4f} "
            f"| {r['plain_ms']:.1f} / {r['antithetic_ms']:.1f} / {r['captum_ms']:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--part", choices=["all", "throughput", "accuracy", "kernel"], default="all"
    )
    parser.add_argument("--baseline-module", default=None, help="another cams/_additive_shapley.py")
    parser.add_argument("--maps", type=int, default=1024)
    parser.add_argument("--perms", type=int, default=10_000)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--n-list", type=int, nargs="+", default=[10, 30, 100, 300, 1000, 3000])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {machine_line()}")
    if args.part in ("all", "throughput"):
        print(json.dumps(run_throughput(args), indent=1), flush=True)
    if args.part in ("all", "accuracy"):
        print(markdown_table(run_accuracy(args)))
    if args.part == "kernel":
        print(run_kernel(args))
    print(f"load after: {load_str()}")


if __name__ == "__main__":
    main()
