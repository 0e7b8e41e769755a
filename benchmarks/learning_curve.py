"""Validation error over epochs of finished runs (``val/err`` in their CSV logs), as a markdown
table and a PNG: the measurement a reduced protocol's epochs are chosen from.

    python train.py loss=ce data=cifar10_folder data.train_subset=10000 data.val_size=5000 \\
        trainer.max_epochs=30 logger=csv run_name=curve-ce
    python benchmarks/learning_curve.py logs/runs/curve-ce --out results/cpu/curve.png

Where the curve flattens: the first epoch whose error is within ``--tolerance`` points of the
best epoch's (``flat_epoch``), printed under the table.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path


def val_errors(run_dir: Path) -> dict[int, float]:
    """``epoch -> val/err`` (%) from every ``csv/version_*/metrics.csv`` of ``run_dir``."""
    errors: dict[int, float] = {}
    for path in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        with open(path) as handle:
            for row in csv.DictReader(handle):
                if row.get("val/err"):
                    errors[int(row["epoch"])] = float(row["val/err"])
    if not errors:
        raise SystemExit(f"{run_dir}: no val/err in csv/version_*/metrics.csv (data.val_size=0?)")
    return dict(sorted(errors.items()))


def flat_epoch(errors: dict[int, float], tolerance: float) -> int:
    """First epoch (1-based) whose error is within ``tolerance`` points of the minimum."""
    best = min(errors.values())
    return 1 + min(e for e, err in errors.items() if err <= best + tolerance)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories with csv logs")
    parser.add_argument("--out", type=Path, default=None, help="PNG of the curves")
    parser.add_argument("--tolerance", type=float, default=1.0, help="points (default 1.0)")
    args = parser.parse_args()
    curves = {run.name: val_errors(run) for run in args.runs}
    epochs = sorted({e for c in curves.values() for e in c})
    print("| epoch | " + " | ".join(curves) + " |")
    print("|---:|" + "---:|" * len(curves))
    for epoch in epochs:
        cells = [f"{c[epoch]:.2f}" if epoch in c else "" for c in curves.values()]
        print(f"| {epoch + 1} | " + " | ".join(cells) + " |")
    for name, curve in curves.items():
        print(
            f"{name}: flat from epoch {flat_epoch(curve, args.tolerance)} (within "
            f"{args.tolerance} points of the best, {min(curve.values()):.2f} %)"
        )
    if args.out is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
        for name, curve in curves.items():
            ax.plot([e + 1 for e in curve], list(curve.values()), marker="o", ms=3, label=name)
        ax.set(xlabel="epoch", ylabel="validation error (%)", title="Validation error")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
