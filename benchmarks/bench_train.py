"""Teacher-training throughput (img/s) and the share of step time spent on data + augmentation.

Two measurements per model, on the same batches (batch 128, fp32 on CPU unless --device):
  * ``loop``: a plain loop -- gather the batch from the resident uint8 tensors, augment + normalize
    (timed as "data"), then forward / CE / backward / SGD step;
  * ``lightning``: ``pl.Trainer.fit`` with the real datamodule/module; "data" is the time between
    the end of one training batch and the start of the next (fetch, transfer, augmentation,
    Lightning bookkeeping).

    python benchmarks/bench_train.py                          # synthetic data, both models
    python benchmarks/bench_train.py --data folder --steps 40 # the shared JPEG copy (cached)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from _common import clock, device_sync, load_str, machine_line, stopwatch

from distill.data import CIFAR10DataModule
from distill.models import WideResNet
from distill.modules.classifier import ClassifierModule

REPO = Path(__file__).resolve().parents[1]
MODELS = {"wrn16_2": (16, 2), "wrn40_2": (40, 2)}


def make_datamodule(args: argparse.Namespace) -> CIFAR10DataModule:
    kwargs: dict = {"batch_size": args.batch_size, "device": args.device}
    if args.data == "folder":
        kwargs |= {"source": "folder", "root": args.root, "cache_dir": REPO / "data" / "cache"}
    else:
        kwargs |= {"source": "synthetic", "synthetic_size": 5000, "synthetic_test_size": 100}
    dm = CIFAR10DataModule(**kwargs)
    dm.setup("fit")
    return dm


def bench_loop(model: str, dm: CIFAR10DataModule, args: argparse.Namespace) -> dict:
    module = ClassifierModule(WideResNet(*MODELS[model])).to(args.device).train()
    optimizer = module.configure_optimizers()["optimizer"]
    loader = iter(dm.train_dataloader())
    sync = device_sync(args.device)
    data_t = total_t = 0.0
    for step in range(args.warmup + args.steps):
        with stopwatch(sync) as data:
            batch = dm.transform_batch(next(loader))
        with stopwatch(sync) as train:
            loss, _, _ = module.compute_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if step >= args.warmup:
            data_t += data.seconds
            total_t += data.seconds + train.seconds
    return _row(model, "loop", args, total_t, data_t)


class _StepTimer(pl.Callback):
    def __init__(self, warmup: int) -> None:
        self.warmup, self.last_end = warmup, None
        self.data_t = self.total_t = 0.0
        self.count = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # noqa: ANN001
        self.start = clock()
        if self.last_end is not None and batch_idx > self.warmup:
            self.data_t += self.start - self.last_end
            self.total_t += self.start - self.last_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        device_sync(pl_module.device)()
        end = clock()
        if batch_idx >= self.warmup:
            self.total_t += end - self.start
            self.count += 1
        self.last_end = end


def bench_lightning(model: str, dm: CIFAR10DataModule, args: argparse.Namespace) -> dict:
    timer = _StepTimer(args.warmup)
    trainer = pl.Trainer(
        accelerator="cpu" if args.device == "cpu" else "gpu", devices=1, max_epochs=1,
        limit_train_batches=args.warmup + args.steps, limit_val_batches=0, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[timer], use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(ClassifierModule(WideResNet(*MODELS[model])), datamodule=dm)
    return _row(model, "lightning", args, timer.total_t, timer.data_t, steps=timer.count)


def _row(
    model: str, mode: str, args: argparse.Namespace, total: float, data: float, steps: int = 0
) -> dict:
    steps = steps or args.steps
    return {
        "model": model, "mode": mode, "batch_size": args.batch_size, "steps": steps,
        "img_per_s": args.batch_size * steps / total, "step_ms": 1000 * total / steps,
        "data_share_pct": 100 * data / total, "data_ms": 1000 * data / steps,
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--modes", nargs="+", default=["loop", "lightning"], choices=["loop", "lightning"]
    )
    parser.add_argument("--data", default="synthetic", choices=["synthetic", "folder"])
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "cifar10-jpeg"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    torch.manual_seed(0)
    dm = make_datamodule(args)
    print("load average before:", load_str(), flush=True)
    rows = []
    for model in args.models:
        for mode in args.modes:
            rows.append((bench_loop if mode == "loop" else bench_lightning)(model, dm, args))
            print(json.dumps(rows[-1]), flush=True)
    machine, load = machine_line(), load_str()
    print(f"\nmachine: {machine}; data: {args.data}\n")
    print("| model | mode | batch | img/s | step (ms) | data+aug (ms) | data share |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        cells = [
            r["model"], r["mode"], r["batch_size"], f"{r['img_per_s']:.0f}",
            f"{r['step_ms']:.0f}", f"{r['data_ms']:.1f}", f"{r['data_share_pct']:.1f}%",
        ]  # fmt: skip
        print("| " + " | ".join(str(c) for c in cells) + " |")
    if args.json:
        blob = {"machine": machine, "load_after": load, "rows": rows}
        args.json.write_text(json.dumps(blob, indent=2) + "\n")


if __name__ == "__main__":
    main()
