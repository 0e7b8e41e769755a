"""Student training step time per loss preset, relative to ce_kd, and peak memory.

    python benchmarks/bench_distill.py [--batch 128] [--steps 5] [--presets ce_kd gradcam ...]

Each preset runs in a fresh subprocess (so peak RSS is its own): WRN-16-2 student, WRN-40-2
teacher (random weights), one training step = loss (student forward + CAMs + teacher) + backward +
SGD step, on a fixed random batch with random crop/flip parameters. ``shapcam`` (cache) reads
teacher maps from an in-memory cache exactly as training does (lookup + alignment); the online
variants compute them from the teacher. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# preset name -> (loss config name, extra loss options)
PRESETS: dict[str, tuple[str, dict]] = {
    "ce": ("ce", {}),
    "ce_kd": ("ce_kd", {}),
    "gradcam_kd": ("gradcam_kd", {}),
    "gradcampp_kd": ("gradcampp_kd", {}),
    "shapleycam_kd": ("shapleycam_kd", {}),
    "shapcam_kd (cache, student 256 perm.)": ("shapcam_kd", {}),
    "shapcam_kd (online, 1000 perm.)": (
        "shapcam_kd",
        {
            "teacher_maps": "online",
            "teacher_cam": {"n_permutations": 1000, "seed": 0},
            "student_cam": {"n_permutations": 1000},
        },
    ),
    "scorecam_kd (cache, all 128 channels)": ("scorecam_kd", {"teacher_maps": "cache"}),
    "scorecam_kd (cache, max_channels=8)": (
        "scorecam_kd",
        {"teacher_maps": "cache", "student_cam": {"max_channels": 8}},
    ),
}


def load_loss(name: str, extra: dict) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    import distill.train  # noqa: F401  (resolver)

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=[f"loss={name}"])
    loss = OmegaConf.to_container(cfg.loss, resolve=True)
    for key, value in extra.items():
        loss[key] = {**loss.get(key, {}), **value} if isinstance(value, dict) else value
    return loss


def run_one(preset: str, batch: int, steps: int) -> dict:
    import torch

    from distill.data.augment import AugParams
    from distill.models import WideResNet
    from distill.modules.student import StudentModule

    torch.manual_seed(0)
    name, extra = PRESETS[preset]
    loss_cfg = load_loss(name, extra)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "teacher.ckpt"
        teacher = WideResNet(40, 2)
        torch.save({"state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()}}, ckpt)
        module = StudentModule(
            WideResNet(16, 2), WideResNet(40, 2), loss_cfg, teacher_checkpoint=str(ckpt)
        )
    module.train()
    if loss_cfg["method"] and loss_cfg["teacher_maps"] == "cache":
        module.cached_maps = torch.rand(50_000, 8, 8)
        module.cache_position = torch.arange(50_000)
    opt = torch.optim.SGD(module.net.parameters(), lr=0.01, momentum=0.9)
    gen = torch.Generator().manual_seed(0)
    data = {
        "image": torch.randn(batch, 3, 32, 32, generator=gen),
        "label": torch.randint(0, 10, (batch,), generator=gen),
        "index": torch.randint(0, 50_000, (batch,), generator=gen),
        "aug": AugParams.sample(batch, generator=gen),
    }

    def step() -> None:
        loss, _, _ = module.compute_loss(data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return {
        "preset": preset,
        "step_s": times[len(times) // 2],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--presets", nargs="*", default=list(PRESETS))
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.steps)))
        return
    results = []
    for preset in args.presets:
        steps = max(1, args.steps // 3) if "all 128" in preset else args.steps
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--one",
                preset,
                "--batch",
                str(args.batch),
                "--steps",
                str(steps),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"# {preset}: {results[-1]['step_s']:.3f} s", file=sys.stderr, flush=True)
    base = next((r["step_s"] for r in results if r["preset"] == "ce_kd"), None)
    print(f"| preset (batch {args.batch}) | step (s) | x ce_kd | img/s | peak RSS (MB) |")
    print("|---|---|---|---|---|")
    for r in results:
        ratio = f"{r['step_s'] / base:.2f}" if base else "—"
        print(
            f"| {r['preset']} | {r['step_s']:.3f} | {ratio} | {args.batch / r['step_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
