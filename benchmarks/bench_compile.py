"""torch.compile on CPU: the teacher's no-grad forward, the student's CE step, a CAM student step.

Every variant runs in one process on the same inputs; after a first call (timed separately as
the compile time: tracing, Inductor code generation and the C++ build) the variants are timed in
``--reps`` alternated rounds of ``--iters`` calls each, so load changes hit them alike; the table
gives the median seconds per call and the speed-up over eager.

* teacher: WRN-40-2, eval, ``torch.no_grad()``, batch 128 -- fp32, and bf16 autocast with
  channels_last; compiled as is, and with Inductor's ``freezing`` (weights as constants: BN
  folded into the convolutions, weights pre-packed; inference only);
* student: WRN-16-2, train mode, CE step (forward, backward, SGD step), fp32 and bf16 autocast
  with channels_last;
* CAM student step: ``cams.build(method, net, "block3").compute(x, y, create_graph=True)``, CE
  + ``||N(L_s) - N(L_t)||²``, backward, SGD step, with the net compiled in place
  (``net.compile()``, what ``module.compile=true`` does): the time for Grad-CAM
  (``cam-step``); for every method (``cam-check``, batch ``--cam-batch``) whether it runs,
  whether its loss and gradients match eager and how many graphs Dynamo compiled.

    python benchmarks/bench_compile.py                       # everything, batch 128
    python benchmarks/bench_compile.py --parts teacher student cam-step --reps 7   # timings only
    python benchmarks/bench_compile.py --parts cam-check     # which CAM steps run compiled
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import machine_line, stopwatch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's packages first

import cams  # noqa: E402
from distill.compile import maybe_compile_forward  # noqa: E402
from distill.models import WideResNet  # noqa: E402

Step = Callable[[], object]


PRECISIONS: tuple[bool, ...] = (False, True)  # bf16 off / on; --no-bf16 keeps fp32 only


def autocast(bf16: bool) -> contextlib.AbstractContextManager:
    return torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def inputs(batch: int, channels_last: bool) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, 32, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def net_for(depth: int, channels_last: bool, train: bool) -> nn.Module:
    torch.manual_seed(0)
    net = WideResNet(depth, 2).train(train)
    return net.to(memory_format=torch.channels_last) if channels_last else net


def teacher_steps(batch: int) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    for bf16 in PRECISIONS:
        tag = "bf16+CL" if bf16 else "fp32"
        x, _ = inputs(batch, bf16)
        # the frozen variant compiles first: Dynamo reuses a graph compiled for another instance
        # of the same architecture (weights are graph inputs), so compiled after the plain
        # variant it would silently run the unfrozen graph
        for how in ("eager", "compiled+freezing", "compiled"):
            net = net_for(40, bf16, False)
            if how == "compiled":
                fwd = torch.compile(net)
            elif how == "compiled+freezing":
                fwd = maybe_compile_forward(net, enabled=True)
            else:
                fwd = net

            def step(fwd: Callable = fwd, x: Tensor = x, bf16: bool = bf16) -> Tensor:
                with torch.no_grad(), autocast(bf16):
                    return fwd(x)

            steps[f"teacher {tag} {how}"] = step
    return steps


def ce_step(net: nn.Module, fwd: Callable, x: Tensor, y: Tensor, bf16: bool) -> Step:
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> float:
        with autocast(bf16):
            loss = F.cross_entropy(fwd(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def student_variants(batch: int, name: str, make: Callable[..., Step]) -> dict[str, Step]:
    """``make(net, compiled, x, y, bf16)`` for a fresh WRN-16-2 in fp32 / bf16+CL, eager /
    compiled."""
    steps: dict[str, Step] = {}
    for bf16 in PRECISIONS:
        tag = "bf16+CL" if bf16 else "fp32"
        x, y = inputs(batch, bf16)
        for how in ("eager", "compiled"):
            net = net_for(16, bf16, True)
            steps[f"{name} {tag} {how}"] = make(net, how == "compiled", x, y, bf16)
    return steps


def student_steps(batch: int) -> dict[str, Step]:
    def make(net: nn.Module, compiled: bool, x: Tensor, y: Tensor, bf16: bool) -> Step:
        return ce_step(net, torch.compile(net) if compiled else net, x, y, bf16)

    return student_variants(batch, "student CE", make)


def cam_step(net: nn.Module, method: str, x: Tensor, y: Tensor, bf16: bool) -> Step:
    cam = cams.build(method, net, "block3", **cams.METHODS[method].quick_options)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    target = torch.rand(x.shape[0], 8, 8, generator=torch.Generator().manual_seed(1))

    def step() -> float:
        with autocast(bf16):
            out = cam.compute(x, y, create_graph=True)
            maps = cams.normalize(out.maps, "l2")
            loss = F.cross_entropy(out.logits, y) + (maps - cams.normalize(target)).square().sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss)

    return step


def _grads(net: nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])


def check_cam(method: str, batch: int, bf16: bool) -> dict:
    """One CAM student step with the net compiled in place vs eager: runs? same loss and grads?"""
    import torch._dynamo
    from torch._dynamo.utils import counters

    x, y = inputs(batch, False)
    eager = net_for(16, False, True)
    compiled = copy.deepcopy(eager)
    compiled.compile()
    torch._dynamo.reset()
    counters.clear()
    row: dict = {"method": method, "precision": "bf16" if bf16 else "fp32"}
    try:
        with stopwatch() as sw:
            loss_c = cam_step(compiled, method, x, y, bf16)()
        row["first_call_s"] = sw.seconds
        loss_e = cam_step(eager, method, x, y, bf16)()
        g_c, g_e = _grads(compiled), _grads(eager)
        row |= {
            "ok": True,
            "loss_compiled": loss_c,
            "loss_eager": loss_e,
            "grad_rel_err": float((g_c - g_e).norm() / g_e.norm()),
            "graphs": int(counters["stats"].get("unique_graphs", 0)),
        }
        if bf16:  # how far each bf16 gradient is from the fp32 one (the scale of bf16 noise)
            ref = net_for(16, False, True)
            cam_step(ref, method, x, y, False)()
            g_ref = _grads(ref)
            row["grad_rel_err_vs_fp32"] = {
                "compiled": float((g_c - g_ref).norm() / g_ref.norm()),
                "eager": float((g_e - g_ref).norm() / g_ref.norm()),
            }
    except Exception as err:  # noqa: BLE001 - recorded, the benchmark goes on
        lines = "".join(traceback.format_exception_only(err)).strip().splitlines()
        row |= {"ok": False, "error": f"{type(err).__name__}: " + " | ".join(lines[:4])[:800]}
    return row


def cam_steps(batch: int, method: str) -> dict[str, Step]:
    def make(net: nn.Module, compiled: bool, x: Tensor, y: Tensor, bf16: bool) -> Step:
        if compiled:
            net.compile()  # in place, as module.compile=true does
        return cam_step(net, method, x, y, bf16)

    return student_variants(batch, f"student {method}", make)


def run(steps: dict[str, Step], reps: int, iters: int) -> list[dict]:
    first = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        first[name] = time.perf_counter() - t0
        print(f"# first call {name}: {first[name]:.1f} s", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(reps):
        for name, step in steps.items():
            with stopwatch() as sw:
                for _ in range(iters):
                    step()
            times[name].append(sw.seconds / iters)
    rows = []
    for name in steps:
        group, how = name.rsplit(" ", 1)
        eager = statistics.median(times[f"{group} eager"])
        med = statistics.median(times[name])
        row = {"name": name, "first_call_s": first[name], "median_s": med}
        rows.append(row | {"min_s": min(times[name]), "speedup": eager / med})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument(
        "--parts", nargs="*", default=["teacher", "student", "cam-step", "cam-check"]
    )
    parser.add_argument("--cam-methods", nargs="*", default=list(cams.METHODS))
    parser.add_argument("--cam-batch", type=int, default=32)
    parser.add_argument("--no-bf16", action="store_true", help="fp32 variants only")
    args = parser.parse_args()
    global PRECISIONS
    if args.no_bf16:
        PRECISIONS = (False,)
    print(f"# machine: {machine_line()}")
    rows: list[dict] = []
    if "teacher" in args.parts:
        rows += run(teacher_steps(args.batch), args.reps, args.iters)
    if "student" in args.parts:
        rows += run(student_steps(args.batch), args.reps, args.iters)
    if "cam-step" in args.parts:
        rows += run(cam_steps(args.batch, "gradcam"), args.reps, args.iters)
    checks = []
    if "cam-check" in args.parts:
        for method in args.cam_methods:
            for bf16 in PRECISIONS:
                checks.append(check_cam(method, args.cam_batch, bf16))
                print(json.dumps(checks[-1]), flush=True)
    print(f"\n# machine at the end: {machine_line()}\n")
    print("| variant | first call (s) | s/call (median) | min | speed-up vs eager |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['first_call_s']:.1f} | {r['median_s']:.3f} | {r['min_s']:.3f} "
            f"| {r['speedup']:.2f}x |"
        )
    if checks:
        print("\n| CAM step, net compiled in place | precision | result |")
        print("|---|---|---|")
        for c in checks:
            if c["ok"]:
                result = (
                    f"runs; loss {c['loss_compiled']:.6f} vs eager {c['loss_eager']:.6f}, "
                    f"grad rel. err {c['grad_rel_err']:.1e}, {c['graphs']} graphs, "
                    f"first call {c['first_call_s']:.0f} s"
                )
                if "grad_rel_err_vs_fp32" in c:
                    vs = c["grad_rel_err_vs_fp32"]
                    result += (
                        f"; vs fp32 eager: compiled {vs['compiled']:.1e}, eager {vs['eager']:.1e}"
                    )
            else:
                result = f"fails: `{c['error']}`"
            print(f"| {c['method']} | {c['precision']} | {result} |")


if __name__ == "__main__":
    main()
