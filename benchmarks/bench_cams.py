"""Throughput and peak memory of :mod:`cams` vs pytorch-grad-cam 1.5.7, side by side.

Settings (random weights, eval mode, fixed seeds):

* ``resnet18``: torchvision resnet18, 224x224, batch 16, target ``layer4``;
* ``wrn``: WRN-40-2 (``distill.models.wrn``), 32x32, batch 128, target ``block3``;
* ``resnet56``, ``resnet8x4``, ``vgg13``, ``mobilenetv2``, ``shufflenetv2``: the registry's
  models (``distill.models.build_model``), 32x32, batch 128, target their ``cam_layer``.

Every measurement runs in a fresh subprocess (``--worker``) so that its peak resident memory
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``) belongs to that method alone; ``base`` is the RSS
after building the model and the input, ``peak - base`` the method's own memory. One warm-up call
on 2 samples precedes the timed calls (best of ``--repeats``; ScoreCAM and Shap-CAM once).
``bare`` is ScoreCAM's unavoidable cost: forwards of ``B·K`` inputs in chunks of the same size
(64) with nothing else. Utilities match pytorch-grad-cam's targets: logit for Grad-CAM, Grad-CAM++
and Score-CAM, ReST for ShapleyCAM. Shap-CAM (10^4 permutations, utility prob) is timed on
``--shapcam-maps`` WRN maps and extrapolated to 50,000.

    python benchmarks/bench_cams.py                      # everything (~30 min on 2 cores)
    python benchmarks/bench_cams.py --skip-pgc-scorecam-resnet18 --only wrn
    python benchmarks/bench_cams.py --paired   # ScoreCAM / bare K-forward, alternated
    python benchmarks/bench_cams.py --alternated   # speed-ups of the gradient methods, alternated
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from _common import load_avg, machine_info, machine_line, peak_rss_mb, timed

import cams

SETTINGS = {
    "resnet18": {"batch": 16, "size": 224, "layer": "layer4"},
    "wrn": {"batch": 128, "size": 32, "layer": "block3"},
    # the other registered CIFAR families (distill.models.build_model), at their declared
    # cam_layer: a teacher and a student of each (issue 22)
    "resnet56": {"batch": 128, "size": 32, "layer": "block3"},
    "resnet8x4": {"batch": 128, "size": 32, "layer": "block3"},
    "vgg13": {"batch": 128, "size": 32, "layer": "block4"},
    "mobilenetv2": {"batch": 128, "size": 32, "layer": "head"},
    "shufflenetv2": {"batch": 128, "size": 32, "layer": "head"},
}
# every registered method, by its class name (pytorch-grad-cam's names), in registry order
CLASSES = {cls.__name__: cls for cls in cams.METHODS.values()}
OURS = list(CLASSES)
# utilities matching pytorch-grad-cam's targets: logit (ClassifierOutputTarget) except these
UTILITY = {"ShapleyCAM": "rest", "ShapCAM": "prob"}
SLOW = ("ScoreCAM", "ShapCAM")  # timed once, not best of --repeats
CHUNK = 64


def _theirs() -> list[str]:
    """The registered methods pytorch-grad-cam also has (same class name)."""
    import pytorch_grad_cam as pgc

    return [m for m in OURS if hasattr(pgc, m)]


def _model(setting: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if setting == "resnet18":
        import torchvision

        return torchvision.models.resnet18(weights=None).eval()
    from distill.models import build_model

    return build_model("wrn40_2" if setting == "wrn" else setting).eval()


def x_size(spec: dict[str, Any]) -> int:
    return SETTINGS[spec["setting"]]["size"]


def _channels(model: torch.nn.Module, layer: str, size: int) -> int:
    """K: the channels of ``layer``'s output (ScoreCAM's forwards per sample)."""
    found: list[int] = []
    handle = dict(model.named_modules())[layer].register_forward_hook(
        lambda m, i, o: found.append(o.shape[1])
    )
    with torch.no_grad():
        model(torch.zeros(1, 3, size, size))
    handle.remove()
    return found[0]


def _runner(spec: dict[str, Any], model: torch.nn.Module) -> Any:
    """A callable ``f(x, targets)`` computing the maps of ``spec``."""
    layer, impl, method = SETTINGS[spec["setting"]]["layer"], spec["impl"], spec["method"]
    if impl == "ours":
        opts: dict[str, Any] = {"utility": UTILITY.get(method, "logit")}
        if method == "ScoreCAM":
            opts["batch_size"] = CHUNK
        if method == "ShapCAM":
            opts["n_permutations"] = spec["n_permutations"]
        cam = CLASSES[method](model, layer, **opts)
        return lambda x, t: cam(x, t)
    if impl == "bare":  # B·K forwards of masked-input-sized chunks, nothing else
        k = _channels(model, SETTINGS[spec["setting"]]["layer"], x_size(spec))

        def bare(x: torch.Tensor, t: torch.Tensor) -> None:
            total = x.shape[0] * k
            chunk = x[:1].expand(CHUNK, *x.shape[1:]).contiguous()
            with torch.no_grad():
                for start in range(0, total, CHUNK):
                    model(chunk[: min(CHUNK, total - start)])

        return bare
    import pytorch_grad_cam as pgc
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputReST, ClassifierOutputTarget

    cam = getattr(pgc, method)(model, [dict(model.named_modules())[layer]])
    if method == "ScoreCAM":
        cam.batch_size = 16  # its default
    target = ClassifierOutputReST if method == "ShapleyCAM" else ClassifierOutputTarget
    return lambda x, t: cam(x, [target(int(c)) for c in t])


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one measurement in this (fresh) process."""
    setting = SETTINGS[spec["setting"]]
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    model = _model(spec["setting"])
    torch.manual_seed(1)
    batch = spec.get("batch") or setting["batch"]
    x = torch.randn(batch, 3, setting["size"], setting["size"])
    with torch.no_grad():
        targets = model(x[:2]).argmax(1).repeat(batch)[:batch]
    base = peak_rss_mb()
    if spec["impl"] == "paired":
        return _paired(spec, model, x, targets)
    if spec["impl"] == "alternated":
        return _alternated(spec, model, x, targets)
    run = _runner(spec, model)
    if spec["impl"] != "bare" and spec["method"] not in ("ScoreCAM",):
        run(x[:2], targets[:2])  # warm-up (also traces the fast path once)
    best = min(timed(lambda: run(x, targets)) for _ in range(spec["repeats"]))
    return {
        **spec,
        "batch": batch,
        "seconds": best,
        "maps_per_s": batch / best,
        "base_mb": base,
        "peak_mb": peak_rss_mb(),
        "extra_mb": peak_rss_mb() - base,
        "load": load_avg()[0],
    }


def _paired(
    spec: dict[str, Any], model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor
) -> dict[str, Any]:
    """ScoreCAM vs its bare K-forward cost, alternated on slices of ``n`` samples so that a
    changing machine load affects both alike; returns the ratio of the summed times."""
    ours = _runner({**spec, "impl": "ours"}, model)
    bare = _runner({**spec, "impl": "bare"}, model)
    n, total = spec["n"], {"ours": 0.0, "bare": 0.0}
    for r in range(spec["rounds"]):
        sl = slice(r * n, (r + 1) * n)
        for name, fn in (
            (("ours", ours), ("bare", bare)) if r % 2 == 0 else (("bare", bare), ("ours", ours))
        ):
            total[name] += timed(lambda fn=fn, sl=sl: fn(x[sl], targets[sl]))
    return {
        **spec,
        "ours_s": total["ours"],
        "bare_s": total["bare"],
        "ratio": total["ours"] / total["bare"],
        "load": load_avg()[0],
    }


def _alternated(
    spec: dict[str, Any], model: torch.nn.Module, x: torch.Tensor, targets: torch.Tensor
) -> dict[str, Any]:
    """cams vs pytorch-grad-cam on the same batch, calls alternated for ``rounds`` rounds (a
    changing machine load affects both alike); the ratio of the summed times."""
    import copy

    ours = _runner({**spec, "impl": "ours"}, model)
    theirs = _runner({**spec, "impl": "pytorch-grad-cam"}, copy.deepcopy(model))
    ours(x[:2], targets[:2])
    theirs(x[:2], targets[:2])
    total = {"ours": 0.0, "theirs": 0.0}
    for r in range(spec["rounds"]):
        order = (("ours", ours), ("theirs", theirs))
        for name, fn in order if r % 2 == 0 else order[::-1]:
            total[name] += timed(lambda fn=fn: fn(x, targets))
    return {
        **spec,
        "ours_s": total["ours"],
        "theirs_s": total["theirs"],
        "speedup": total["theirs"] / total["ours"],
        "load": load_avg()[0],
    }


def _measure(spec: dict[str, Any]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", json.dumps(spec)]
    out = subprocess.run(
        cmd, capture_output=True, text=True, check=False, env={**os.environ, "TQDM_DISABLE": "1"}
    )
    if out.returncode != 0:
        return {**spec, "error": out.stderr.strip().splitlines()[-1:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _plan(args: argparse.Namespace) -> list[dict[str, Any]]:
    plan = []
    for setting in args.only or list(SETTINGS):
        for method in OURS:
            spec = {
                "setting": setting,
                "impl": "ours",
                "method": method,
                "repeats": 1 if method in SLOW else args.repeats,
            }
            if method == "ShapCAM":
                if setting != "wrn":
                    continue
                spec.update(n_permutations=10_000, batch=args.shapcam_maps)
            plan.append(spec)
        plan.append({"setting": setting, "impl": "bare", "method": "ScoreCAM", "repeats": 1})
        for method in _theirs():
            if method == "ScoreCAM" and setting == "resnet18" and args.skip_pgc_scorecam_resnet18:
                continue
            plan.append(
                {
                    "setting": setting,
                    "impl": "pytorch-grad-cam",
                    "method": method,
                    "repeats": 1 if method == "ScoreCAM" else args.repeats,
                }
            )
    return plan


def _table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| setting | method | cams maps/s | pytorch-grad-cam maps/s | speed-up | "
        "cams peak / extra MB | pgc peak / extra MB |",
        "|---|---|---|---|---|---|---|",
    ]
    get = {(r["setting"], r["impl"], r["method"]): r for r in results}
    for setting in SETTINGS:
        for method in OURS:
            ours = get.get((setting, "ours", method))
            if ours is None:
                continue
            theirs = get.get((setting, "pytorch-grad-cam", method))
            bare = get.get((setting, "bare", method))

            def fmt(r: dict | None) -> tuple[str, str]:
                if r is None:
                    return "—", "—"
                if "error" in r:
                    return "error", "—"
                return f"{r['maps_per_s']:.3g}", f"{r['peak_mb']:.0f} / {r['extra_mb']:.0f}"

            (o_speed, o_mem), (t_speed, t_mem) = fmt(ours), fmt(theirs)
            ratio = "—"
            if theirs and "error" not in theirs and "error" not in ours:
                ratio = f"{ours['maps_per_s'] / theirs['maps_per_s']:.2f}x"
            name = method
            if bare and "error" not in bare and "error" not in ours:
                name += (
                    f" (bare K-forward: {bare['maps_per_s']:.3g} maps/s, "
                    f"cams/bare time {bare['maps_per_s'] / ours['maps_per_s']:.3f})"
                )
            if method == "ShapCAM" and "error" not in ours:
                name += (
                    f" (10^4 perms, {ours['batch']} maps; 50,000 maps ≈ "
                    f"{50_000 / ours['maps_per_s'] / 60:.1f} min)"
                )
            lines.append(
                f"| {setting} | {name} | {o_speed} | {t_speed} | {ratio} | {o_mem} | {t_mem} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--shapcam-maps", type=int, default=1024)
    parser.add_argument(
        "--skip-pgc-scorecam-resnet18",
        action="store_true",
        help="skip pytorch-grad-cam's ScoreCAM on resnet18 (~209 s, ~9 GB)",
    )
    parser.add_argument(
        "--paired",
        action="store_true",
        help="only the alternated ScoreCAM vs bare K-forward comparison",
    )
    parser.add_argument(
        "--alternated",
        action="store_true",
        help="only cams vs pytorch-grad-cam speed-ups, calls alternated",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch threads per measurement (0: torch's default)"
    )
    parser.add_argument("--methods", nargs="*", help="only these methods (e.g. ScoreCAM)")
    parser.add_argument("--json", type=Path, help="write all results here")
    parser.add_argument(
        "--table",
        type=Path,
        nargs="*",
        help="print the table of earlier --json files (no measurement)",
    )
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    if args.table:
        print(_table([r for f in args.table for r in json.loads(f.read_text())]))
        return
    if args.paired:
        for setting, n in (("wrn", 8), ("resnet18", 1)):
            if args.only and setting not in args.only:
                continue
            spec = {
                "setting": setting,
                "impl": "paired",
                "method": "ScoreCAM",
                "n": n,
                "rounds": 4,
                "threads": args.threads,
                "repeats": 1,
            }
            print(json.dumps(_measure(spec)), flush=True)
        return
    if args.alternated:
        for setting in args.only or list(SETTINGS):
            for method in args.methods or [m for m in _theirs() if m not in SLOW]:
                spec = {
                    "setting": setting,
                    "impl": "alternated",
                    "method": method,
                    "rounds": 6,
                    "threads": args.threads,
                    "repeats": 1,
                }
                print(json.dumps(_measure(spec)), flush=True)
        return
    results = []
    for spec in _plan(args):
        if args.methods and spec["method"] not in args.methods:
            continue
        spec["threads"] = args.threads
        res = _measure(spec)
        print(json.dumps(res), flush=True)
        results.append(res)
    info = {**machine_info(), "threads": args.threads or torch.get_num_threads()}
    print(f"\nmachine: {machine_line(info)} (at end)\n")
    print(_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
