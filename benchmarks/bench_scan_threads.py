"""Shap-CAM estimator threads inside a training step: ``num_threads=1`` vs torch's setting.

    python benchmarks/bench_scan_threads.py [--processes 3] [--rounds 4] [--batch 128]

Each process builds one online Shap-CAM ``shapcam_kd`` step (teacher 1,000 permutations, student
1,000, see bench_distill.py) and alternates steps with the estimator's scans at ``num_threads=1``
(the default) and ``None`` (torch's thread count), timing the step and the estimator's forward
and backward (``_InteriorShapley``, wrapped for timing). Several fresh processes, because the
slow cases seen on a 2-core VM held for a whole process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections import defaultdict

from _common import device_sync, stopwatch, timed

PRESET = "shapcam_kd (online teacher 1000 perm., student 1000 perm.)"
SETTINGS = {"1": 1, "torch": None}


def timed_estimator(totals: dict[str, float]) -> None:
    """Add the wall time of every estimator forward/backward to ``totals['fwd'/'bwd']``."""
    from cams._additive_shapley import _InteriorShapley

    for name, key in (("forward", "fwd"), ("backward", "bwd")):
        original = getattr(_InteriorShapley, name)

        def wrapper(*args, _original=original, _key=key):
            sw = stopwatch()
            try:
                with sw:
                    return _original(*args)
            finally:
                totals[_key] += sw.seconds

        setattr(_InteriorShapley, name, staticmethod(wrapper))


def one_process(batch: int, rounds: int) -> dict[str, dict[str, float]]:
    import bench_distill

    estimator: dict[str, float] = defaultdict(float)
    timed_estimator(estimator)
    step = bench_distill.step_fn(PRESET, batch, "cpu", bench_distill.Mode())
    cams_ = (step.module.teacher_cam, step.module.student_cam)
    sums: dict[str, dict[str, float]] = {k: defaultdict(float) for k in SETTINGS}
    for round_ in range(rounds + 1):  # round 0 warms both settings up
        for label, threads in SETTINGS.items():
            for cam in cams_:
                cam.num_threads = threads
            estimator.clear()
            seconds = timed(step, device_sync("cpu"))
            if round_:
                sums[label]["step"] += seconds
                for key in ("fwd", "bwd"):
                    sums[label][key] += estimator[key]
    return {k: {m: v / rounds for m, v in d.items()} for k, d in sums.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_process(args.batch, args.rounds)))
        return
    print("| process | scan threads | step (s) | estimator fwd (ms) | estimator bwd (ms) |")
    print("|---|---|---|---|---|")
    for proc in range(1, args.processes + 1):
        cmd = [sys.executable, __file__, "--child", "--batch", str(args.batch)]
        out = subprocess.run([*cmd, "--rounds", str(args.rounds)], capture_output=True, text=True)
        if out.returncode:
            sys.exit(out.stderr)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        for label, r in result.items():
            print(
                f"| {proc} | {label} | {r['step']:.3f} | {1000 * r['fwd']:.0f} | "
                f"{1000 * r['bwd']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
