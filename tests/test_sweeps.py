"""Hydra sweeps (basic multirun, joblib, submitit, Optuna configs) and Lightning DDP on CPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY as BASE_TINY
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
# the shared TINY config with batch 16 (several steps per epoch on 64 images, also per DDP rank)
TINY = [o for o in BASE_TINY if not o.startswith("data.batch_size=")] + ["data.batch_size=16"]


def test_launcher_and_sweeper_configs_compose():
    joblib = compose_cfg("hydra/launcher=joblib", hydra=True).hydra.launcher
    assert joblib._target_.endswith("JoblibLauncher")
    slurm = compose_cfg("hydra/launcher=submitit_slurm", hydra=True).hydra.launcher
    assert slurm._target_.endswith("SlurmLauncher")
    cfg = compose_cfg("hparams_search=alpha_optuna", "loss=shapleycam_kd", hydra=True)
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.optimized_metric == "val_error" and cfg.data.val_size > 0  # never the test set
    assert "loss.alpha" in cfg.hydra.sweeper.params


@pytest.mark.slow
def test_alpha_multirun_writes_one_result_per_job(tmp_path, teacher_ckpt):
    cmd = [
        sys.executable,
        "train.py",
        "-m",
        *TINY,
        "loss=gradcam",
        "loss.alpha=0.1,1",
        f"teacher.checkpoint={teacher_ckpt}",
        f"paths.log_dir={tmp_path}",
        "run_name=sweep",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted((tmp_path / "train" / "multirun_sweep").glob("*/metrics.json"))
    assert len(results) == 2
    alphas = {
        line.split("=")[1]
        for p in results
        for line in (p.parent / ".hydra" / "overrides.yaml").read_text().split()
        if line.startswith("loss.alpha=")
    }
    assert alphas == {"0.1", "1"}
    assert all(0 <= json.loads(p.read_text())["test_error"] <= 100 for p in results)
    # job folders named by the swept override; the summary table, printed and written
    assert [p.parent.name for p in results] == ["loss.alpha=0.1", "loss.alpha=1"]
    errors = [json.loads(p.read_text())["test_error"] for p in results]
    table = (tmp_path / "train" / "multirun_sweep" / "summary.md").read_text()
    assert table.splitlines()[0].startswith("| loss.alpha | test_error |")
    assert [row.split(" | ")[:2] for row in table.splitlines()[2:]] == [
        ["| 0.1", f"{errors[0]:.4g}"], ["| 1", f"{errors[1]:.4g}"],
    ]  # fmt: skip
    assert table in proc.stdout
    # the same command again: every job is found finished (resume by folder name)
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("is already finished") == 2


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_cached_teacher_maps(tmp_path, teacher_ckpt):
    common = [
        *TINY,
        "loss=shapcam",
        "++loss.teacher_cam.n_permutations=16",
        "++loss.student_cam.n_permutations=8",
        f"teacher.checkpoint={teacher_ckpt}",
        f"paths.log_dir={tmp_path}",
        f"module.cache_root={tmp_path}/cache",
        f"module.memo_root={tmp_path}/memo",
    ]
    pre = subprocess.run(
        [sys.executable, "-m", "distill.precompute", *common, f"hydra.run.dir={tmp_path}/pre"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pre.returncode == 0, pre.stderr[-3000:]
    cmd = [
        sys.executable,
        "train.py",
        *common,
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
        "run_name=ddp",
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "train" / "ddp" / "metrics.json").read_text())
    assert 0 <= metrics["test_error"] <= 100


@pytest.mark.slow
def test_ddp_ranks_share_the_teacher_memo(tmp_path, teacher_ckpt):
    """Two gloo ranks fill one memo (each its half of the batches); a second two-rank run of
    another preset with the same seed reads every view written by either rank."""
    import csv

    import numpy as np

    common = [
        *TINY,
        f"teacher.checkpoint={teacher_ckpt}",
        f"paths.log_dir={tmp_path}",
        f"module.memo_root={tmp_path}/memo",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.precision=32-true",
    ]
    for preset in ("gradcam", "gradcam_kd"):
        cmd = [sys.executable, "train.py", *common, f"loss={preset}", f"run_name={preset}"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (memo,) = (tmp_path / "memo").iterdir()
    (flags,) = memo.glob("maps-gradcam-*.filled")
    assert np.count_nonzero(np.fromfile(flags, dtype=np.uint8)) == 64  # one view per image
    with open(next((tmp_path / "train" / "gradcam_kd").glob("csv/**/metrics.csv"))) as fh:
        rates = [r["teacher/memo_hit_rate"] for r in csv.DictReader(fh)]
    assert [float(r) for r in rates if r] == [1.0]


def test_job_folder_names_are_safe_short_and_stable(monkeypatch):
    from omegaconf import OmegaConf

    from distill.sweeps import job_dirname

    def name(argv, task):
        monkeypatch.setattr(sys, "argv", ["train.py", *argv])
        return job_dirname(3, OmegaConf.create({"hydra": {"overrides": {"task": task}}}))

    argv = ["-m", "loss=gradcam,ce", "data.root=/a/b", "loss.alpha=1"]
    assert name(argv, ["loss=gradcam", "data.root=/a/b", "loss.alpha=1"]) == "loss=gradcam"
    # no sweep on the command line (Optuna, a launcher's worker): every override but paths
    task = ["paths.log_dir=/x", "loss.alpha=0.5", "loss.cam={a: 1}"]
    assert name(["hparams_search=alpha_optuna"], task) == "loss.alpha=0.5,loss.cam=_a__1_"
    long = name(["-m", "x=1,2"], [f"x={'v' * 300}"])
    assert len(long) == 120 and long == name(["-m", "x=1,2"], [f"x={'v' * 300}"])
    assert name(["-m", "x=1,2"], []) == "3"
