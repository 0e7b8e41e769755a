"""Reproduction harness for the Shap-CAM paper's CIFAR-10 table (WRN-40-2 -> WRN-16-2): what
it does and its commands are in :mod:`distill.harness.cli` (``python -m distill.harness -h``).

Modules, one job each: :mod:`~distill.harness.profiles` (the profiles, Hydra configs in
``configs/harness/`` with the schema :class:`Profile`; the overrides of each step and cell),
:mod:`~distill.harness.runs` (a run directory's saved config and metrics),
:mod:`~distill.harness.lock` (the results-folder lock), :mod:`~distill.harness.processes` (starting
a step's process in a device's environment), :mod:`~distill.harness.devices` (local workers, one
per device), :mod:`~distill.harness.slurm` (SLURM job arrays through Hydra's submitit launcher),
:mod:`~distill.harness.runner` (the protocol's steps), :mod:`~distill.harness.reporting` (table
and chart),
:mod:`~distill.harness.cost_model` (the cost model) and :mod:`~distill.harness.cli`.
"""

from distill.harness.cli import main
from distill.harness.cost_model import cost, estimate, flops_scale, forward_flops
from distill.harness.devices import Device, Local, parse_devices, round_robin
from distill.harness.lock import LOCK_NAME, results_lock, running_holder
from distill.harness.processes import LOG_NAME, Runner, Step
from distill.harness.profiles import (
    PROFILE_DIR,
    RESULTS_ROOT,
    ROOT,
    HarnessError,
    Pair,
    Profile,
    compose_profile,
    table_cells,
)
from distill.harness.reporting import (
    PAPER_ERRORS,
    NoRunsError,
    check_report_configs,
    collect,
    other_config_runs,
    paired_diff,
    pooled_sd,
    rank_correlation,
    report,
    rerun_command,
    unstable_cells,
)
from distill.harness.runner import (
    Failure,
    deviating_runs,
    failure_summary,
    pending_cells,
    placement,
    run,
    run_cells,
    run_precompute,
    run_teacher,
)
from distill.harness.runs import (
    IGNORED_KEYS,
    check_same_config,
    compose,
    config_mismatch,
    deviation,
    read_metrics,
    saved_config,
)
from distill.harness.slurm import Slurm

__all__ = [
    "NoRunsError",
    "other_config_runs",
    "paired_diff",
    "rank_correlation",
    "IGNORED_KEYS",
    "LOCK_NAME",
    "LOG_NAME",
    "PAPER_ERRORS",
    "PROFILE_DIR",
    "RESULTS_ROOT",
    "ROOT",
    "Device",
    "Failure",
    "HarnessError",
    "Local",
    "Pair",
    "Profile",
    "Runner",
    "Slurm",
    "Step",
    "check_report_configs",
    "check_same_config",
    "collect",
    "compose",
    "compose_profile",
    "config_mismatch",
    "cost",
    "estimate",
    "flops_scale",
    "forward_flops",
    "deviating_runs",
    "deviation",
    "failure_summary",
    "main",
    "parse_devices",
    "pending_cells",
    "placement",
    "pooled_sd",
    "read_metrics",
    "report",
    "rerun_command",
    "results_lock",
    "round_robin",
    "run",
    "run_cells",
    "run_precompute",
    "run_teacher",
    "running_holder",
    "saved_config",
    "table_cells",
    "unstable_cells",
]
