"""Cost of the explanation-fidelity measurement against a ``cpu-mini`` student run.

    python benchmarks/bench_fidelity.py [--cells ce gradcam shapcam scorecam] [--rounds 8]
                                        [--max-images 250 500 1000] [--no-bf16]

Per cell (WRN-16-2 student, random-weight WRN-40-2 teacher, bf16 autocast + channels_last as a
``cpu-mini`` run on a bf16-native CPU; ``--no-bf16``: fp32), in one process and in turns, so that
load from other jobs hits every part alike: a training step (batch 128, teacher online: a memo
miss, the common case in a fresh ``cpu-mini`` run; :func:`bench_distill.step_fn`), a test batch
(student forward, 128 images), half of the rounds before and half after ``FidelityCallback``'s
whole test pass (``on_test_batch_end`` on the 79 batches of the 10,000-image test set, then the
last partial batch) for each ``--max-images`` (0 = all). Random images (the costs do not depend
on the pixels).

Extrapolated to a ``cpu-mini`` run: training 3 epochs x 40 steps of 128 images (5,000-image
subset) + the test pass (79 batches), against 79 fidelity batches; the run's other costs (data,
Lightning, checkpoints) are left out, which overstates the share. ``scorecam`` uses the profile's
``max_channels=8`` (student and teacher, in training and in the own maps), ``shapcam`` its cached
teacher maps in training (an in-memory stand-in) and the callback's 256 antithetic permutations
for the own maps.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import types

from _common import clock, load_avg, machine_line, timed
from bench_distill import PRESETS, Mode, step_fn

STEPS, TEST_BATCHES, N_TEST, BATCH = 120, 79, 10_000, 128
EIGHT = {"max_channels": 8}  # the cpu-mini profile's Score-CAM setting, both sides
PRESETS["scorecam (cpu-mini: 8 channels)"] = (
    "scorecam",
    {"student_cam": EIGHT, "teacher_cam": EIGHT},
)
CELL_PRESET = {
    "ce": "ce",
    "gradcam": "gradcam",
    "shapcam": "shapcam",
    "scorecam": "scorecam (cpu-mini: 8 channels)",
}


def fidelity_run(module, max_images: int | None, bf16: bool):  # -> (callback, fake trainer)
    from pytorch_lightning.plugins.precision import MixedPrecision, Precision

    from distill.fidelity import FidelityCallback

    own_cam = {"shapcam": {"n_permutations": 256, "antithetic": True}}  # configs/callbacks
    callback = FidelityCallback(max_images=max_images, own_cam=own_cam)
    trainer = types.SimpleNamespace(
        test_dataloaders=types.SimpleNamespace(dataset=range(N_TEST)),
        precision_plugin=MixedPrecision("bf16-mixed", "cpu") if bf16 else Precision(),
        datamodule=None,
    )
    callback.setup(trainer, module, "test")
    callback.on_test_start(trainer, module)
    return callback, trainer


def bench_cell(cell: str, rounds: int, limits: list[int | None], bf16: bool) -> dict:
    import torch

    mode = Mode(bf16=bf16, channels_last=bf16)
    step = step_fn(CELL_PRESET[cell], BATCH, "cpu", mode)
    module = step.module.eval()  # type: ignore[attr-defined]
    runs = {n: fidelity_run(module, n, bf16) for n in limits}
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(BATCH, 3, 32, 32, generator=gen)
    if bf16:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (BATCH,), generator=gen)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def test_batch() -> None:
        with torch.inference_mode(), autocast:
            module(images)

    def fidelity_pass(n: int | None) -> float:
        """The callback over the 79 batches of a test pass (+ the last partial batch)."""
        callback, trainer = runs[n]
        callback.on_test_start(trainer, module)  # fresh state
        start = clock()
        with torch.inference_mode():  # as in the test loop
            for b in range(TEST_BATCHES):
                index = torch.arange(b * BATCH, min((b + 1) * BATCH, N_TEST))
                batch = {"image": images[: len(index)], "label": labels[: len(index)]}
                callback.on_test_batch_end(trainer, module, None, {**batch, "index": index}, b)
            if callback.pending:
                callback._flush(trainer, module, full_only=False)
        return clock() - start

    def training(rounds: int) -> tuple[float, float]:
        steps = tests = 0.0
        for _ in range(rounds):
            module.train()
            steps += timed(step)
            module.eval()
            tests += timed(test_batch)
        return steps, tests

    module.train()
    step()  # warm-up
    module.eval()
    test_batch()
    first = training(rounds - rounds // 2)  # before and after the fidelity passes (load drift)
    fid = {n: fidelity_pass(n) for n in limits}
    second = training(rounds // 2)
    step_s = (first[0] + second[0]) / rounds
    run_s = STEPS * step_s + TEST_BATCHES * (first[1] + second[1]) / rounds
    return {"cell": cell, "step_s": step_s, "run_s": run_s, "fidelity_s": fid}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", nargs="+", default=list(CELL_PRESET), choices=list(CELL_PRESET))
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--max-images", nargs="+", type=int, default=[250, 500, 1000])
    parser.add_argument("--no-bf16", action="store_true")
    args = parser.parse_args()
    limits = [n or None for n in args.max_images]
    print(machine_line(), f"| load {load_avg()}", flush=True)
    head = " | ".join(f"{n or 'all'} img: s (share)" for n in limits)
    print(f"| cell | step (s) | cpu-mini run (s) | {head} |")
    print("|---|---|---|" + "---|" * len(limits))
    for cell in args.cells:
        res = bench_cell(cell, args.rounds, limits, not args.no_bf16)
        cols = " | ".join(
            f"{res['fidelity_s'][n]:.1f} ({100 * res['fidelity_s'][n] / res['run_s']:.1f} %)"
            for n in limits
        )
        print(f"| {cell} | {res['step_s']:.3f} | {res['run_s']:.0f} | {cols} |", flush=True)
    print(
        f"load after: {load_avg()}; images per limit: "
        + ", ".join(
            f"{n or 'all'}: {math.ceil(N_TEST / math.ceil(N_TEST / (n or N_TEST)))}" for n in limits
        )
    )


if __name__ == "__main__":
    main()
