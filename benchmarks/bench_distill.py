"""Training step time per loss preset (relative to ce_kd), peak memory, and the cost-model input.

    python benchmarks/bench_distill.py [--batch 64] [--steps 3] [--presets ce_kd gradcam_kd ...]
                                       [--json benchmarks/results/step_times_cpu.json]
    python benchmarks/bench_distill.py --alternated 6 --presets gradcam_kd shapleycam_kd ...

Each preset runs in a fresh subprocess (so peak RSS is its own): WRN-16-2 student, WRN-40-2
teacher (random weights), one training step = loss (student forward + CAMs + teacher) + backward +
SGD step, on a fixed random batch with random crop/flip parameters, median of ``--steps`` steps
after one warm-up. The table cells (``distill.presets.table_methods()``: ``ce`` and every
registered CAM method with both loss presets, each without and with ``_kd``; twelve today) and
the baseline objectives' presets (``distill.presets.baseline_presets()``: AT, CAT-KD, DKD) use
their presets' defaults (the ``paper`` profile's settings); ``shapcam`` (cache) reads teacher
maps from an in-memory cache exactly as training does (lookup + alignment). Extra rows:
``teacher`` (a WRN-40-2 cross-entropy step), ``precompute`` (offline Shap-CAM teacher maps for
one batch, 10^4 permutations) and variants (online Shap-CAM teacher maps, Score-CAM
``max_channels``). Prints a Markdown table; ``--json`` also writes the step times that
``python -m distill.harness cost`` turns into a cost model.

``--verify-overhead R`` times the memo's CRC check: one process per preset alternates memo-hit
steps of two copies of the preset, one verifying every row read against its CRC-32 (the
default) and one not, for ``R`` rounds; the ratio is verified over unverified.

``--alternated R`` is the robust ratio on a noisy machine: one process per preset builds both the
preset's and ``ce_kd``'s modules and alternates their steps for ``R`` rounds after a warm-up, so
load drifts hit both sides alike; the ratio is the preset's summed time over ``ce_kd``'s.

Execution flags (applied to every preset, and to the ``ce_kd`` baseline unless
``--baseline-fp32``): ``--bf16`` (bf16 autocast), ``--channels-last`` (student and teacher),
``--memo`` (teacher logits and online maps served by a filled teacher-output memo: the warm-up
step fills it, the timed steps hit it). ``--baseline-fp32`` keeps the alternated ``ce_kd``
baseline at today's default before issue 14 (fp32, NCHW, no memo), for the "x faster than fp32
ce_kd" goal.
"""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

from _common import device_sync, load_avg, machine_info, peak_rss_mb, timed

from distill.presets import baseline_presets, table_methods

ROOT = Path(__file__).resolve().parents[1]
# the paper's table cells: ce and every registered CAM method with both loss presets; then the
# presets of the registered baseline objectives (at, at_kd, catkd, dkd, ...)
CELLS = [f"{m}{kd}" for m in table_methods() for kd in ("", "_kd")] + baseline_presets()
ONLINE_1000 = {"teacher_maps": "online", "teacher_cam": {"n_permutations": 1000, "seed": 0}}
# label -> (loss preset, extra loss options); cells use their defaults
PRESETS: dict[str, tuple[str, dict]] = {
    **{cell: (cell, {}) for cell in CELLS},
    "shapcam_kd (online teacher 1000 perm., student 256 antithetic)": ("shapcam_kd", ONLINE_1000),
    "shapcam_kd (online teacher 1000 perm., student 1000 perm.)": (
        "shapcam_kd",
        {**ONLINE_1000, "student_cam": {"n_permutations": 1000, "antithetic": False}},
    ),
    "scorecam_kd (cache, max_channels=8)": (
        "scorecam_kd",
        {"teacher_maps": "cache", "student_cam": {"max_channels": 8}},
    ),
}
SPECIAL = ("teacher", "precompute")
DEFAULT_ORDER = ["ce_kd", *SPECIAL, *[p for p in PRESETS if p != "ce_kd"]]


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


def make_batch(batch: int) -> dict:
    import torch

    from distill.data.augment import AugParams

    gen = torch.Generator().manual_seed(0)
    return {
        "image": torch.randn(batch, 3, 32, 32, generator=gen),
        "label": torch.randint(0, 10, (batch,), generator=gen),
        "index": torch.randint(0, 50_000, (batch,), generator=gen),
        "aug": AugParams.sample(batch, generator=gen),
    }


@dataclass(frozen=True)
class Mode:
    """How a step runs: bf16 autocast, channels_last, teacher outputs from a filled memo
    (rows CRC-checked unless ``verify`` is off)."""

    bf16: bool = False
    channels_last: bool = False
    memo: bool = False
    verify: bool = True


class _MemoData:
    """The datamodule facts the teacher memo reads (CIFAR-10 training set, pad 4)."""

    dataset_id, num_train_total, view_pad = "bench-random", 50_000, 4


_TMP = tempfile.mkdtemp(prefix="bench_distill_")  # teacher checkpoint and memo of this process
atexit.register(shutil.rmtree, _TMP, ignore_errors=True)


def student_module(name: str, extra: dict, mode: Mode = Mode()):  # -> StudentModule
    import torch

    from distill.models import WideResNet
    from distill.modules.student import StudentModule

    loss_cfg = load_loss(name, extra)
    ckpt = Path(_TMP) / "teacher.ckpt"
    if not ckpt.exists():
        teacher = WideResNet(40, 2)
        torch.save({"state_dict": {f"net.{k}": v for k, v in teacher.state_dict().items()}}, ckpt)
    module = StudentModule(
        WideResNet(16, 2),
        WideResNet(40, 2),
        loss_cfg,
        teacher_checkpoint=str(ckpt),
        memo_root=f"{_TMP}/memo",
        channels_last=mode.channels_last,
    )
    if loss_cfg["method"] and loss_cfg["teacher_maps"] == "cache":
        module.teacher.cached_maps = torch.rand(50_000, 8, 8)
        module.teacher.cache_position = torch.arange(50_000)
    if mode.channels_last:
        module.net.to(memory_format=torch.channels_last)
        module.teacher.net.to(memory_format=torch.channels_last)
    if mode.memo:
        module.teacher.enable_memo(_MemoData(), "bf16-mixed" if mode.bf16 else "32-true")
        module.teacher.memo.set_verify(mode.verify)
    return module


def step_fn(preset: str, batch: int, device: str, mode: Mode):  # -> Callable[[], None]
    import contextlib

    import torch

    bf16 = mode.bf16

    torch.manual_seed(0)
    data = {k: v.to(device) for k, v in make_batch(batch).items()}
    autocast = (
        torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        if bf16
        else contextlib.nullcontext()
    )
    if preset == "precompute":  # the offline cache's teacher maps (un-augmented images)
        module = student_module("shapcam_kd", {}).to(device)

        def maps() -> None:
            with autocast:
                module.teacher_cam.compute(data["image"], data["label"])

        return maps
    if preset == "teacher":
        from distill.models import WideResNet
        from distill.modules.classifier import ClassifierModule

        module = ClassifierModule(WideResNet(40, 2), channels_last=mode.channels_last)
        if mode.channels_last:
            module.net.to(memory_format=torch.channels_last)
    else:
        module = student_module(*PRESETS[preset], mode)
    module.to(device).train()
    opt = torch.optim.SGD(module.net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with autocast:
            loss, _, _ = module.compute_loss(data)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step.module = module  # type: ignore[attr-defined]  (for bench_scan_threads.py)
    step.data = data  # type: ignore[attr-defined]
    return step


def run_one(preset: str, batch: int, steps: int, device: str, mode: Mode) -> dict:
    import torch

    cuda = torch.device(device).type == "cuda"
    sync = device_sync(device)
    step = step_fn(preset, batch, device, mode)
    step()  # warm-up
    times = sorted(timed(step, sync) for _ in range(steps))
    peak = torch.cuda.max_memory_allocated() if cuda else 0
    return {
        "preset": preset,
        "step_s": times[len(times) // 2],
        "peak_rss_mb": peak_rss_mb(),
        "peak_gpu_mb": peak / 2**20,
    }


def run_alternated(
    preset: str, batch: int, rounds: int, device: str, mode: Mode, baseline: Mode
) -> dict:
    """Steps of ``preset`` (``mode``) and ``ce_kd`` (``baseline``) in turn, ``rounds`` times each
    after one warm-up."""
    sync = device_sync(device)
    steps = {
        "ce_kd": step_fn("ce_kd", batch, device, baseline),
        preset: step_fn(preset, batch, device, mode),
    }
    totals = dict.fromkeys(steps, 0.0)
    for step in steps.values():
        step()
    for _ in range(rounds):
        for name, step in steps.items():
            totals[name] += timed(step, sync)
    return {
        "preset": preset,
        "rounds": rounds,
        "step_s": totals[preset] / rounds,
        "ce_kd_step_s": totals["ce_kd"] / rounds,
        "ratio": totals[preset] / totals["ce_kd"],
    }


def run_verify_overhead(preset: str, batch: int, rounds: int, device: str, mode: Mode) -> dict:
    """Memo-hit steps of ``preset`` with and without the CRC check, alternated (ABBA) ``rounds``
    times after one warm-up each (the first fills the memo both read); then the memo read alone
    (``Teacher.outputs`` of the batch, all hits) ``20 * rounds`` times each."""
    sync = device_sync(device)
    modes = {
        "verified": replace(mode, memo=True),
        "unverified": replace(mode, memo=True, verify=False),
    }
    steps = {name: step_fn(preset, batch, device, m) for name, m in modes.items()}
    totals = dict.fromkeys(steps, 0.0)
    for step in steps.values():
        step()
    for i in range(rounds):  # ABBA: neither side always runs first
        for name, step in list(steps.items())[:: 1 if i % 2 == 0 else -1]:
            totals[name] += timed(step, sync)
    lookups = dict.fromkeys(steps, 0.0)  # the memo read alone: teacher outputs of the batch
    for i in range(20 * rounds):
        for name, step in list(steps.items())[:: 1 if i % 2 == 0 else -1]:
            teacher, data = step.module.teacher, step.data  # type: ignore[attr-defined]
            need = bool(step.module.loss_cfg.kd.enabled)  # type: ignore[attr-defined]
            lookups[name] += timed(lambda t=teacher, d=data, k=need: t.outputs(d, k), sync)
    return {
        "preset": preset,
        "rounds": rounds,
        "lookup_verified_ms": 1e3 * lookups["verified"] / (20 * rounds),
        "lookup_unverified_ms": 1e3 * lookups["unverified"] / (20 * rounds),
        "verified_s": totals["verified"] / rounds,
        "unverified_s": totals["unverified"] / rounds,
        "ratio": totals["verified"] / totals["unverified"],
    }


def verify_overhead(args: argparse.Namespace) -> None:
    """One subprocess per preset; verified / unverified memo-hit steps as a Markdown table."""
    print(
        f"| preset (batch {args.batch}, {args.verify_overhead} alternated rounds, memo hits) "
        "| CRC checked (s) | not checked (s) | ratio | memo read, checked (ms) | not checked (ms) |"
    )
    print("|---|---|---|---|---|---|")
    for preset in args.presets:
        if preset in SPECIAL:
            continue
        r = child(args, "--verify-pair", preset, "--verify-overhead", str(args.verify_overhead))
        print(
            f"| {preset} | {r['verified_s']:.4f} | {r['unverified_s']:.4f} | {r['ratio']:.3f} "
            f"| {r['lookup_verified_ms']:.2f} | {r['lookup_unverified_ms']:.2f} |",
            flush=True,
        )
    print(f"machine: {machine()}", file=sys.stderr)


def child(args: argparse.Namespace, *flags: str, memo: bool | None = None) -> dict:
    """Run this script with ``flags`` (+ batch/device/precision/memo flags) in a fresh process;
    its JSON line. ``memo`` overrides ``args.memo``."""
    cmd = [sys.executable, __file__, *flags, "--batch", str(args.batch), "--device", args.device]
    cmd += ["--bf16"] if args.bf16 else []
    cmd += ["--channels-last"] if args.channels_last else []
    cmd += ["--memo"] if (args.memo if memo is None else memo) else []
    cmd += ["--baseline-fp32"] if args.baseline_fp32 else []
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def alternated(args: argparse.Namespace) -> None:
    """One subprocess per preset (fresh allocator), ratios printed as a Markdown table."""
    print(
        f"| preset (batch {args.batch}, {args.alternated} alternated rounds) "
        "| step (s) | ce_kd step (s) | x ce_kd |"
    )
    print("|---|---|---|---|")
    for preset in args.presets:
        if preset in ("ce_kd", *SPECIAL):
            continue
        r = child(args, "--pair", preset, "--alternated", str(args.alternated))
        print(
            f"| {preset} | {r['step_s']:.3f} | {r['ce_kd_step_s']:.3f} | {r['ratio']:.2f} |",
            flush=True,
        )
    print(f"machine: {machine()}", file=sys.stderr)


def steps_for(preset: str, steps: int) -> int:
    """Score-CAM with all channels and the 10^4-permutation precompute are slow: fewer steps."""
    slow = preset in ("scorecam", "scorecam_kd", "precompute")
    return max(1, steps // 3) if slow else steps


def machine() -> dict:
    return {**machine_info(), "load_avg_start": load_avg()[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--presets", nargs="*", default=DEFAULT_ORDER)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (precision=bf16-mixed)")
    parser.add_argument("--channels-last", action="store_true", help="student+teacher NHWC")
    parser.add_argument("--memo", action="store_true", help="teacher outputs from a filled memo")
    parser.add_argument(
        "--baseline-fp32",
        action="store_true",
        help="alternated ce_kd baseline in fp32, NCHW, without memo (whatever the other flags)",
    )
    parser.add_argument("--json", default=None, help="write step times for `harness cost` here")
    parser.add_argument(
        "--alternated",
        type=int,
        default=0,
        metavar="R",
        help="ratios to ce_kd from R rounds of alternated steps in one process per preset",
    )
    parser.add_argument(
        "--verify-overhead",
        type=int,
        default=0,
        metavar="R",
        help="memo-hit steps with / without the memo's CRC check, R alternated rounds",
    )
    parser.add_argument("--verify-pair", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--pair", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    mode = Mode(args.bf16, args.channels_last, args.memo)
    baseline = Mode() if args.baseline_fp32 else mode
    if args.verify_pair:
        r = run_verify_overhead(
            args.verify_pair, args.batch, args.verify_overhead, args.device, mode
        )
        print(json.dumps(r))
        return
    if args.pair:
        result = run_alternated(args.pair, args.batch, args.alternated, args.device, mode, baseline)
        print(json.dumps(result))
        return
    if args.one:
        print(json.dumps(run_one(args.one, args.batch, args.steps, args.device, mode)))
        return
    unknown = [p for p in args.presets if p not in PRESETS and p not in SPECIAL]
    if unknown:
        parser.error(f"unknown presets {unknown}; choose from {[*SPECIAL, *PRESETS]}")
    if args.verify_overhead:
        verify_overhead(args)
        return
    if args.alternated:
        alternated(args)
        return
    info = {**machine(), "device": args.device, **asdict(mode)}
    results, online = [], {}
    for preset in args.presets:
        flags = ("--one", preset, "--steps", str(steps_for(preset, args.steps)))
        results.append(child(args, *flags))
        print(f"# {preset}: {results[-1]['step_s']:.3f} s", file=sys.stderr, flush=True)
        if args.memo and preset not in SPECIAL:  # the same step computing the teacher
            online[preset] = child(args, *flags, memo=False)["step_s"]
            print(f"# {preset} (teacher computed): {online[preset]:.3f} s", file=sys.stderr)
    info["load_avg_end"] = load_avg()[0]
    base = next((r["step_s"] for r in results if r["preset"] == "ce_kd"), None)
    memo_col = " teacher computed (s) |" if args.memo else ""
    print(f"| preset (batch {args.batch}) | step (s) | x ce_kd | img/s | peak RSS (MB) |{memo_col}")
    print("|---|---|---|---|---|" + ("---|" if args.memo else ""))  # peak GPU memory: --json
    for r in results:
        ratio = f"{r['step_s'] / base:.2f}" if base else "—"
        extra = (
            f" {online[r['preset']]:.3f} |"
            if r["preset"] in online
            else (" — |" if args.memo else "")
        )
        print(
            f"| {r['preset']} | {r['step_s']:.3f} | {ratio} | {args.batch / r['step_s']:.0f} | "
            f"{r['peak_rss_mb']:.0f} |{extra}"
        )
    print(f"machine: {info}", file=sys.stderr)
    if args.json:
        record = {
            "date": date.today().isoformat(),
            "command": " ".join(["python", "benchmarks/bench_distill.py", *sys.argv[1:]]),
            "machine": info,
            "batch": args.batch,
            "step_s": {r["preset"]: r["step_s"] for r in results},
            **({"step_s_online": online} if online else {}),
            "peak_gpu_mb": {r["preset"]: r["peak_gpu_mb"] for r in results},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
