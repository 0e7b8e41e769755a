"""Reproduction harness for the Shap-CAM paper's CIFAR-10 table (WRN-40-2 -> WRN-16-2).

``python -m distill.harness run --profile cpu-mini`` trains (or reuses) the teacher, precomputes the
cached teacher maps, and trains every cell of the table for every seed, each as its own
``train.py`` process whose output goes to ``<run dir>/harness.log``. ``--devices`` places them on
this machine: ``auto`` (one worker per visible GPU, else one CPU worker), ``0,1`` (GPUs) or
``cpu:N`` (N CPU workers); each worker starts the next pending run (table order, seed by seed)
when its last one ends (``--n-jobs N``, deprecated, is ``--devices cpu:N``). ``--launcher slurm``
submits them instead as SLURM job arrays through Hydra's submitit launcher
(``hydra/launcher=harness_slurm``) and waits for them. ``--dry-run`` prints the plan (which run on
which worker, or each sweep command and which job index is which run) and starts nothing.
A cell that dies does not stop the others: the failed ones are listed at the end (with their log)
and the exit status is 1. Finished runs are skipped, interrupted runs resume from ``last.ckpt``, and
a run directory made with a different configuration is refused (by ``run``, ``status`` and
``report``); a finished run continued with a changed config or trained for other epochs than the
profile's is kept, listed by ``status`` and ``run`` and left out of the table's means with a
footnote (a NaN test error is named in the table). One ``run`` at a time per results folder (a
lock file, ``.harness.lock``). Paths under the results folder are stored relative to it
(``${paths.log_dir}/...``), so a copied or moved results folder stays valid.
``python -m distill.harness report --profile cpu-mini`` writes ``results/<profile>/table.md``,
``table.csv``, ``chart.png`` and ``explain.png`` (columns: docs/harness.md); runs of another
configuration are listed by ``status`` and ``report``, not counted; a report without runs exits 1.
A profile with ``pairs`` (``configs/harness/cifar100.yaml``) runs each command once per teacher ->
student pair, into ``results/<profile>/<pair>/`` (``--pair NAME``: only that one); ``cost`` adds
the total over the pairs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from distill.harness.cost_model import estimate, total_line
from distill.harness.lock import running_holder
from distill.harness.profiles import ROOT, HarnessError, Profile
from distill.harness.records import GitRecorder
from distill.harness.reporting import NoRunsError, other_config_runs, report, rerun_command
from distill.harness.runner import deviation_lines, failure_summary, pending_cells, run
from distill.harness.slurm import override_value

# the step times docs/harness.md quotes (fp32, 2-core CPU, memo hits and misses)
STEP_TIMES = ROOT / "benchmarks" / "results" / "step_times_cpu_memo.json"


def _other_lines(profile: Profile) -> list[str]:
    """One line per run of another configuration (listed, not counted, kept on disk)."""
    return [
        f"{name}: another configuration, not counted ({why}); to train it as the profile asks, "
        "move it away or use another --results-dir"
        for name, _, why in other_config_runs(profile)
    ]


def _slurm_options(args: argparse.Namespace) -> list[str]:
    """The ``--slurm-*`` flags as ``KEY=VALUE`` launcher options."""
    flags = {
        "partition": args.slurm_partition,
        "timeout_min": args.slurm_timeout_min,
        "gpus_per_node": args.slurm_gpus,
    }
    named = [f"{k}={override_value(v)}" for k, v in flags.items() if v is not None]
    return [*named, *args.slurm_option]


def _deviations(profile: Profile, profile_arg: str) -> list[str]:
    """Lines for the finished runs that differ from the profile (see ``deviating_runs``)."""
    return deviation_lines(profile, rerun_command(profile, profile_arg))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distill.harness", description=__doc__)
    parser.add_argument("command", choices=["run", "report", "status", "cost"])
    parser.add_argument(
        "--profile", default="cpu-mini", help="a name in configs/harness/ or a .yaml"
    )
    parser.add_argument(
        "--devices", default=None, help="auto | GPU indices 0,1 | cpu:N (default: the profile's)"
    )
    parser.add_argument("--n-jobs", type=int, default=None, help="deprecated: --devices cpu:N")
    parser.add_argument("--launcher", default=None, help="local | slurm (default: the profile's)")
    parser.add_argument("--slurm-partition", default=None, help="with --launcher slurm")
    parser.add_argument("--slurm-timeout-min", type=int, default=None, help="per job")
    parser.add_argument("--slurm-gpus", type=int, default=None, help="GPUs per job (default 1)")
    parser.add_argument(
        "--slurm-option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any hydra.launcher key of submitit_slurm (account=..., qos=...); repeatable",
    )
    parser.add_argument(
        "--pair", default=None, help="a profile with pairs: only this pair (default: every pair)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, start nothing")
    parser.add_argument(
        "--commit",
        action="store_true",
        help="run: git-commit each finished run's records, the teacher's weights and the report "
        "as they finish (survives a restart that keeps only committed files)",
    )
    parser.add_argument("--results-dir", default=None, help="default: the profile's (results)")
    parser.add_argument(
        "--step-times",
        default=str(STEP_TIMES),
        help="cost: JSON from benchmarks/bench_distill.py --memo --json (default: the README's)",
    )
    args = parser.parse_args(argv)
    try:
        loaded = Profile.load(args.profile, results_dir=args.results_dir)
        profiles = loaded.expand(args.pair)
        codes, totals = [], []
        for profile in profiles:
            if len(profiles) > 1:
                print(f"== pair {profile.pair} ({profile.out})", flush=True)
            if args.command == "cost":
                text, hours = estimate(profile, Path(args.step_times))
                print(text)
                totals.append((str(profile.pair), hours))
            else:
                codes.append(_command(args, profile))
        if len(totals) > 1:
            print(total_line(loaded.name, totals))
        return max(codes, default=0)
    except HarnessError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _command(args: argparse.Namespace, profile: Profile) -> int:
    """Run ``args.command`` for one (single-pair) profile; its exit status."""
    try:
        if args.command == "run":
            failures = run(
                profile,
                args.n_jobs,
                args.dry_run,
                devices=args.devices,
                launcher=args.launcher,
                slurm=_slurm_options(args),
                commit=args.commit,
            )
            for line in _deviations(profile, args.profile):
                print(f"warning: {line} (kept, not retrained)", file=sys.stderr, flush=True)
            if not args.dry_run:
                print(f"report: {report(profile, args.profile)}")
                if args.commit:
                    GitRecorder(profile.out).commit_results(f"results: {profile.name} report")
            if failures:
                print(failure_summary(failures), file=sys.stderr)
                return 1
        elif args.command == "report":
            for line in _other_lines(profile):
                print(line)
            print(report(profile, args.profile).read_text())
        else:
            if holder := running_holder(profile.out):
                print(f"a harness run is in progress in {profile.out} ({holder})")
            pending, differ = pending_cells(profile, True), _deviations(profile, args.profile)
            other = _other_lines(profile)
            for seed, cells in pending.items():
                print(f"seed {seed}: pending {cells}")
            for line in [*other, *differ]:
                print(line)
            if not pending:
                also = f"; {len(differ)} differ from the profile (above)" if differ else ""
                also += f"; {len(other)} of another configuration (above)" if other else ""
                print(f"every run of profile {profile.name!r} is finished{also}")
    except NoRunsError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
