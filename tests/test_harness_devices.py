"""The harness beyond one process: local workers per device (``--devices``), SLURM job arrays
through Hydra's submitit launcher (``--launcher slurm``), the dry-run plan, and bad input."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from distill import harness
from distill.harness import HarnessError, Profile
from distill.harness import devices as devices_module
from distill.harness import slurm as slurm_module
from tests.conftest import REPO_ROOT, compose_cfg
from tests.test_harness import finish_teacher, hydra_config

SLURM_TARGET = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
LOG_LINE = re.compile(r"^=== (\S+ \S+) \[(\S+)\] (.*)$")


def tiny(tmp_path: Path, cells: list[str], seeds: list[int], gpu: bool = False) -> Profile:
    """The smoke profile (synthetic data, seconds per run) with these cells and seeds."""
    profile = Profile.load("smoke", results_dir=str(tmp_path / "res"))
    profile.cells, profile.seeds = cells, seeds
    if gpu:
        profile.common = ["trainer=gpu" if o == "trainer=cpu" else o for o in profile.common]
    return profile


def fake_finished(profile: Profile, cell: str, seed: int) -> None:
    """A finished run as train.py leaves it (saved config and metrics.json), without training."""
    run_dir = profile.run_dir(cell, seed)
    (run_dir / ".hydra").mkdir(parents=True)
    config = hydra_config(profile.cell_overrides(cell, seed))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run_dir / "metrics.json").write_text(json.dumps({"test_error": 50.0, "run_name": "fake"}))


def log_spans(log: Path) -> list[tuple[str, datetime, datetime, str]]:
    """(worker, start, end, command) of every process the harness logged in ``log``."""
    spans, start = [], None
    for line in log.read_text().splitlines():
        if match := LOG_LINE.match(line):
            when, worker, rest = match.groups()
            if rest.startswith("$ "):
                start = (worker, datetime.fromisoformat(when), rest[2:])
            else:
                assert start is not None and start[0] == worker
                spans.append((worker, start[1], datetime.fromisoformat(when), start[2]))
    return spans


def plan_of(out: str) -> list[tuple[str, str, str]]:
    """(step, worker, CUDA_VISIBLE_DEVICES of its command) from a local dry run's output."""
    lines = out.splitlines()
    plan = []
    for line, command in zip(lines, lines[1:], strict=False):
        if " -> " in line and command.startswith("$ "):
            step, worker = line.split(" -> ")
            visible = re.match(r"\$ CUDA_VISIBLE_DEVICES=(\S*) ", command)
            assert visible, command
            plan.append((step, worker, visible.group(1)))
    return plan


# ----------------------------------------------------------------------------- local devices
@pytest.mark.slow
def test_two_cpu_workers_train_concurrently_then_rerun_finds_all_finished(
    tmp_path, capsys, monkeypatch
):
    """``--devices cpu:2``: two worker processes at once, each with its own CPU threads; the
    third run starts on a worker once its previous run has ended; every run finishes and a
    rerun starts nothing."""
    profile = tiny(tmp_path, ["ce"], [0, 1, 2])
    finish_teacher(profile)  # CE students do not load the teacher
    monkeypatch.setattr(Profile, "load", classmethod(lambda cls, *a, **k: profile))
    assert harness.main(["run", "--profile", "smoke", "--devices", "cpu:2"]) == 0
    spans = {s: log_spans(profile.run_dir("ce", s) / "harness.log") for s in profile.seeds}
    assert all(len(v) == 1 for v in spans.values())
    (w0, start0, end0, cmd0), (w1, start1, end1, _), (w2, start2, _, _) = (
        spans[s][0] for s in profile.seeds
    )
    assert {w0, w1} == {"cpu:0", "cpu:1"}  # the first two went to different workers...
    assert start0 < end1 and start1 < end0  # ...and overlapped in time
    assert start2 >= (end0 if w2 == w0 else end1)  # the third waited for its worker
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert cmd0.startswith(f"CUDA_VISIBLE_DEVICES= OMP_NUM_THREADS={threads} ")
    assert all(harness.read_metrics(profile.run_dir("ce", s)) for s in profile.seeds)
    out = capsys.readouterr().out
    assert re.search(r"ce-s0 -> cpu:\d", out) and "ce-s2: finished" in out
    assert harness.main(["run", "--profile", "smoke", "--devices", "cpu:2"]) == 0
    out = capsys.readouterr().out
    assert "is finished" in out and "$ " not in out


def test_dry_run_plans_gpus_round_robin_and_writes_nothing(tmp_path, capsys, monkeypatch):
    """``--devices 0,1 --dry-run`` without CUDA: the teacher on the first GPU, then the cells in
    table order (seed by seed) alternating between the GPUs, each process seeing only its GPU
    (visible indices mapped through the parent's CUDA_VISIBLE_DEVICES)."""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,7")
    monkeypatch.setattr(devices_module, "visible_gpus", lambda: 2)  # CUDA shows both
    profile = tiny(tmp_path, ["ce", "gradcam"], [0, 1], gpu=True)
    assert harness.run(profile, dry_run=True, devices="0,1") == []
    out = capsys.readouterr().out
    assert plan_of(out) == [
        ("teacher", "gpu:0", "4"),
        ("ce-s0", "gpu:0", "4"),
        ("gradcam-s0", "gpu:1", "7"),
        ("ce-s1", "gpu:0", "4"),
        ("gradcam-s1", "gpu:1", "7"),
    ]
    assert "round robin" in out
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"CUDA_VISIBLE_DEVICES=7 OMP_NUM_THREADS={threads} " in out
    assert not profile.out.exists()


def test_auto_devices_follow_the_visible_gpus_and_the_trainer(tmp_path, monkeypatch):
    """``auto``: one worker per visible GPU for a GPU profile; one CPU worker (all cores, no GPU)
    for a CPU profile or without GPUs. The pending cells are only planned, never run."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices_module, "visible_gpus", lambda: 2)
    pending = {0: ["ce"]}
    gpu = harness.Local.parse("auto").prepare(tiny(tmp_path, ["ce"], [0], gpu=True), pending)
    assert [(d.label, d.env()["CUDA_VISIBLE_DEVICES"]) for d in gpu.devices] == [
        ("gpu:0", "0"),
        ("gpu:1", "1"),
    ]
    cpu = harness.Local.parse("auto").prepare(tiny(tmp_path, ["ce"], [0]), pending)
    assert [(d.label, d.env()) for d in cpu.devices] == [("cpu:0", {"CUDA_VISIBLE_DEVICES": ""})]
    monkeypatch.setattr(devices_module, "visible_gpus", lambda: 0)
    with pytest.raises(HarnessError, match="trains on GPU .* workers are CPUs"):
        harness.Local.parse("auto").prepare(tiny(tmp_path, ["ce"], [0], gpu=True), pending)


# ----------------------------------------------------------------------------- SLURM
def sweep_jobs(overrides: list[str]) -> list[list[str]]:
    """The jobs of a multirun, in job-index order, as Hydra's basic sweeper expands them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    return BasicSweeper.split_arguments(parsed, None)[0]


def parsed(overrides: list[str]) -> list[tuple[str, object]]:
    """Overrides as (key, value) as Hydra reads them (``false`` and ``False`` alike)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [
        (o.get_key_element(), o.value())
        for o in OverridesParser.create().parse_overrides(overrides)
    ]


def test_slurm_sweeps_compose_to_exactly_the_pending_runs(tmp_path):
    """``--launcher slurm``: composed with Hydra (``return_hydra_config=True``), every job of every
    sweep uses the submitit SLURM launcher with the given partition and time limit and one GPU,
    has the overrides, run name and run directory of the local path (so the config check accepts
    its saved config), and the jobs are exactly the pending runs; cached maps and every other
    root directory are the same for all jobs, none under a job's directory."""
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    profile = tiny(tmp_path, ["ce", "gradcam", "shapcam"], [0, 1])
    fake_finished(profile, "ce", 0)
    pending = harness.pending_cells(profile)
    place = harness.placement(
        profile, launcher="slurm", slurm=["partition=gpu", "timeout_min=600"]
    ).prepare(profile, pending)
    steps = place.cells(profile, pending)
    # ce (only seed 1 pending), gradcam, shapcam (own method overrides): three job arrays
    assert [[name for name, _ in step.runs] for step in steps] == [
        ["ce-s1"],
        ["gradcam-s0", "gradcam-s1"],
        ["shapcam-s0", "shapcam-s1"],
    ]
    roots = set()
    for step in steps:
        assert step.args[:2] == ["train.py", "-m"]
        jobs = sweep_jobs(step.args[2:])
        assert len(jobs) == len(step.runs)
        for job, (name, run_dir) in zip(jobs, step.runs, strict=True):
            cell, seed = name.rsplit("-s", 1)
            expected = profile.cell_overrides(cell, int(seed))
            swept = [f"run_name={name}" if o.startswith("run_name=") else o for o in job]
            assert parsed([o for o in swept if not o.startswith("hydra")]) == parsed(expected)
            cfg = compose_cfg(*job, hydra=True)
            launcher = cfg.hydra.launcher
            assert launcher._target_ == SLURM_TARGET
            assert (launcher.partition, launcher.timeout_min, launcher.gpus_per_node) == (
                "gpu",
                600,
                1,
            )
            assert launcher.name == f"smoke-{step.name}"
            HydraConfig.instance().set_config(cfg)  # as in the job: ${hydra:...} resolves
            job_dir = os.path.abspath(os.path.join(cfg.hydra.sweep.dir, cfg.hydra.sweep.subdir))
            assert job_dir == str(run_dir) and cfg.run_name == name
            assert Path(cfg.hydra.launcher.submitit_folder).parent.parent == (
                profile.out / "slurm" / step.name
            )
            job_roots = {str(v) for k, v in cfg.module.items() if k.endswith("_root")}
            assert not any(r.startswith(str(run_dir)) for r in job_roots)
            roots |= job_roots
            saved = OmegaConf.to_container(cfg, resolve=False)
            del saved["hydra"]
            (run_dir / ".hydra").mkdir(parents=True)
            (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved))
            harness.check_same_config(run_dir, expected)  # a SLURM-made run is accepted
    assert len(roots) == len({Path(r).name for r in roots})  # one directory per kind of cache


def test_slurm_dry_run_prints_commands_and_job_indices(tmp_path, capsys):
    """The SLURM plan: the teacher's sweep, the cached maps' sweep, then each cell sweep's exact
    command and which job index trains which run; nothing is written."""
    profile = tiny(tmp_path, ["ce", "ce_kd", "shapcam"], [0, 1])
    harness.run(profile, dry_run=True, launcher="slurm", slurm=["partition=gpu"])
    out = capsys.readouterr().out
    commands = [line for line in out.splitlines() if line.startswith("$ ")]
    assert len(commands) == 4  # teacher, precompute shapcam, two cell sweeps
    assert " train.py -m " in commands[0] and " -m distill.precompute -m " in commands[1]
    assert all("hydra/launcher=harness_slurm" in c for c in commands)
    assert all("hydra.launcher.partition=gpu" in c for c in commands)
    assert " seed=0,1 loss=ce,ce_kd " in commands[2] and " loss=shapcam " in commands[3]
    assert "'run_name=${hydra:runtime.choices.loss}-s${seed}'" in commands[2]
    jobs = re.findall(r"^  job (\d+): (\S+) -> (\S+)$", out, re.M)
    run = {name: (int(i), Path(d)) for i, name, d in jobs}
    assert [name for name in run if name not in ("teacher", "shapcam")] == [
        "ce-s0",
        "ce_kd-s0",
        "ce-s1",
        "ce_kd-s1",
        "shapcam-s0",
        "shapcam-s1",
    ]
    assert run["ce-s1"] == (2, profile.run_dir("ce", 1))
    assert run["shapcam-s1"][0] == 1
    assert not profile.out.exists()


@pytest.mark.slow
def test_slurm_path_through_submitits_local_executor_resumes_a_local_table(
    tmp_path, capsys, monkeypatch
):
    """The ``--launcher slurm`` path for real, with submitit's local executor in place of sbatch
    (``hydra/launcher=submitit_local``, same launcher code): only the pending run is submitted, it
    lands in the run directory a local run would use (run_name ``ce-s1``), and the table made
    partly locally, partly through the launcher is complete."""
    profile = tiny(tmp_path, ["ce"], [0, 1])
    finish_teacher(profile)
    fake_finished(profile, "ce", 0)
    monkeypatch.setattr(Profile, "load", classmethod(lambda cls, *a, **k: profile))
    monkeypatch.setattr(slurm_module, "LAUNCHER", "submitit_local")
    assert harness.main(["run", "--profile", "smoke", "--launcher", "slurm"]) == 0
    out = capsys.readouterr().out
    assert "ce-s1: finished" in out and "ce-s0" not in out
    metrics = harness.read_metrics(profile.run_dir("ce", 1))
    assert metrics["run_name"] == "ce-s1" and metrics["run_dir"] == str(profile.run_dir("ce", 1))
    assert list((profile.out / "slurm" / "cells-0" / ".submitit").glob("*/*_log.out"))
    assert harness.pending_cells(profile) == {}


# ----------------------------------------------------------------------------- bad input
BAD_INPUT = {
    "unknown spec": (["--devices", "gpu0"], "unknown --devices 'gpu0': use auto, GPU indices"),
    "zero cpus": (["--devices", "cpu:0"], "cpu:N needs a whole number N >= 1"),
    "gpu twice": (["--devices", "0,0"], "names a GPU twice"),
    "gpu not visible": (["--devices", "0,2"], "GPU 2 is not visible"),
    "slurm and devices": (
        ["--launcher", "slurm", "--devices", "0,1"],
        "--devices places runs on this machine; with --launcher slurm each run is a SLURM job",
    ),
    "slurm and n-jobs": (["--launcher", "slurm", "--n-jobs", "2"], "--n-jobs places runs"),
    "slurm flag, local": (["--slurm-partition", "gpu"], "need --launcher slurm"),
    "unknown launcher": (["--launcher", "pbs"], "unknown launcher 'pbs': use local or slurm"),
    "slurm key typo": (
        ["--launcher", "slurm", "--slurm-option", "partiton=gpu"],
        "unknown SLURM launcher option 'partiton'",
    ),
    "slurm option form": (["--launcher", "slurm", "--slurm-option", "qos"], "expected KEY=VALUE"),
    "devices and n-jobs": (["--devices", "cpu:2", "--n-jobs", "2"], "not both"),
    "gpus, cpu trainer": (["--devices", "0,1"], "trains on CPU .* use --devices cpu:N"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_placement_is_one_line_naming_the_fix(tmp_path, capsys, monkeypatch, case):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setattr(devices_module, "visible_gpus", lambda: 2)
    profile = tiny(tmp_path, ["ce"], [0])
    monkeypatch.setattr(Profile, "load", classmethod(lambda cls, *a, **k: profile))
    flags, message = BAD_INPUT[case]
    assert harness.main(["run", "--profile", "smoke", *flags]) == 2
    out, err = capsys.readouterr()
    assert "$ " not in out and err.count("\n") == 1
    assert re.match(f"error: .*{message}", err.replace("(", "").replace(")", "")), err


@pytest.mark.parametrize(
    ("common", "flags", "message"),
    [
        ("trainer=gpu", ["--devices", "cpu:2"], "trains on GPU trainer.accelerator=gpu"),
        ("trainer=ddp", ["--devices", "0,1"], "trains on 2 devices per run"),
    ],
)
def test_workers_that_cannot_run_the_trainer_are_refused(
    tmp_path, capsys, monkeypatch, common, flags, message
):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices_module, "visible_gpus", lambda: 2)
    profile = tiny(tmp_path, ["ce"], [0])
    profile.common = [common if o == "trainer=cpu" else o for o in profile.common]
    monkeypatch.setattr(Profile, "load", classmethod(lambda cls, *a, **k: profile))
    assert harness.main(["run", "--profile", "smoke", "--dry-run", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err.replace("(", "").replace(")", "") and err.count("\n") == 1


def test_gpu_index_that_cuda_does_not_show_is_refused_before_anything_starts(tmp_path):
    """``--devices 7`` with a GPU profile, CUDA_VISIBLE_DEVICES unset: CUDA shows no GPU 7 here
    (none on a CPU machine), so the CLI says so in one line and exits 2; no teacher is started
    (before: the teacher's log held Lightning's traceback), the results folder is not even
    created."""
    smoke = (REPO_ROOT / "configs" / "harness" / "smoke.yaml").read_text()
    assert "  - trainer=cpu\n" in smoke
    (tmp_path / "gpu.yaml").write_text(smoke.replace("  - trainer=cpu\n", "  - trainer=gpu\n"))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    proc = subprocess.run(
        [sys.executable, "-m", "distill.harness", "run", "--profile", str(tmp_path / "gpu.yaml")]
        + ["--results-dir", str(tmp_path / "res"), "--devices", "7"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: --devices: GPU 7 is not visible: this machine shows ")
    assert proc.stderr.count("\n") == 1 and "$ " not in proc.stdout
    assert not (tmp_path / "res").exists()


def test_gpu_beyond_the_visible_count_is_refused(tmp_path, capsys, monkeypatch):
    """One visible GPU, ``--devices 0,1``: GPU 1 is refused naming the count (also in a dry run,
    whose plan is what ``run`` would do)."""
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.setattr(devices_module, "visible_gpus", lambda: 1)
    profile = tiny(tmp_path, ["ce"], [0], gpu=True)
    monkeypatch.setattr(Profile, "load", classmethod(lambda cls, *a, **k: profile))
    assert harness.main(["run", "--profile", "smoke", "--dry-run", "--devices", "0,1"]) == 2
    out, err = capsys.readouterr()
    assert err == (
        "error: --devices: GPU 1 is not visible: this machine shows 1 "
        "(torch.cuda.device_count()); use indices below 1, or cpu:N\n"
    )
    assert "$ " not in out
    assert harness.main(["run", "--profile", "smoke", "--dry-run", "--devices", "0"]) == 0
    assert plan_of(capsys.readouterr().out)[0] == ("teacher", "gpu:0", "0")


def test_n_jobs_is_a_deprecated_cpu_spec(tmp_path, capsys):
    profile = tiny(tmp_path, ["ce"], [0])
    place = harness.placement(profile, n_jobs=2)
    assert [d.label for d in place.devices] == ["cpu:0", "cpu:1"]
    assert "--n-jobs is deprecated: use --devices cpu:N" in capsys.readouterr().err
    profile.n_jobs = 3
    assert len(harness.placement(profile).devices) == 3
    assert "profile key n_jobs is deprecated" in capsys.readouterr().err
