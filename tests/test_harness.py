"""Reproduction harness: profiles (Hydra configs with a schema), refusal of foreign runs, report
values, and a smoke run."""

from __future__ import annotations

import csv
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from distill import harness
from distill.harness import HarnessError, Profile
from distill.harness.reporting import _noise_note

ROOT = Path(__file__).resolve().parents[1]


def write_run(profile: Profile, cell: str, seed: int, error: float | None) -> Path:
    run_dir = profile.run_dir(cell, seed)
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    if error is not None:
        (run_dir / "metrics.json").write_text(json.dumps({"test_error": error}))
    return run_dir


def test_unknown_profile_and_cell_are_refused(tmp_path):
    with pytest.raises(HarnessError, match="unknown profile 'nope'.*smoke"):
        Profile.load("nope")
    (tmp_path / "bad.yaml").write_text(
        yaml.safe_dump({"name": "bad", "seeds": [0], "cells": ["ce", "gradkam"]})
    )
    with pytest.raises(HarnessError, match="unknown cells \\['gradkam'\\]"):
        Profile.load("bad", directory=tmp_path)


def test_report_values_and_missing_runs(tmp_path):
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.cells = ["ce", "gradcam", "ce_kd", "shapcam_kd"]
    errors = {
        "ce": [10.0, 12.0],
        "gradcam": [9.0, 9.5],
        "ce_kd": [8.0, 8.5],
        "shapcam_kd": [7.0, None],
    }
    for cell, values in errors.items():
        for seed, err in zip(profile.seeds, values, strict=True):
            write_run(profile, cell, seed, err)
    harness.report(profile)
    with open(tmp_path / "smoke" / "table.csv") as handle:
        rows = {r["cell"]: r for r in csv.DictReader(handle)}
    assert float(rows["ce"]["mean"]) == pytest.approx(11.0)
    assert float(rows["ce"]["std"]) == pytest.approx(statistics.stdev([10.0, 12.0]))
    assert float(rows["gradcam"]["diff_baseline"]) == pytest.approx(9.25 - 11.0)
    assert float(rows["gradcam"]["diff_paper"]) == pytest.approx(9.25 - 6.86)
    # a run that died is reported as missing, never as a zero error
    assert rows["shapcam_kd"]["n_seeds"] == "1" and rows["shapcam_kd"]["missing_seeds"] == "1"
    assert float(rows["shapcam_kd"]["mean"]) == pytest.approx(7.0)
    table = (tmp_path / "smoke" / "table.md").read_text()
    assert "missing seeds [1]" in table
    assert (tmp_path / "smoke" / "chart.png").stat().st_size > 1000


def test_noise_is_pooled_over_cells():
    rows = [
        {"cell": "ce", "errors": [10.0, 10.2, 9.8], "mean": 10.0},
        {"cell": "gradcam", "errors": [9.0, 9.6], "mean": 9.3},
        {"cell": "scorecam", "errors": [7.0], "mean": 7.0},  # one seed: no noise information
    ]
    sd, dof = harness.pooled_sd(rows)
    assert dof == 3
    assert sd == pytest.approx(math.sqrt((0.04 + 0.0 + 0.04 + 0.09 + 0.09) / 3))
    assert harness.pooled_sd([rows[2]])[1] == 0
    # 2 sd sqrt(1/2 + 1/3) = 0.537: a 0.7 difference is beyond noise, 0.5 is not
    base = rows[0]
    assert _noise_note({**rows[1], "mean": 9.5}, base, sd) == "within seed noise"
    assert _noise_note(rows[1], base, sd) == "beyond 2 standard errors"
    assert _noise_note(rows[2], base, float("nan")) == "single seeds: noise unknown"
    assert _noise_note(base, base, sd) == ""


def test_a_cell_with_a_collapsed_seed_is_left_out_of_the_pooled_noise():
    """catkd of the cpu profile: seeds 66.4, 67.8 and 90.0 (chance); pooled with the rest it
    made the noise 3.5 points and every other difference "within seed noise"."""
    rows = [
        {"cell": "ce", "errors": [36.0, 37.0, 36.5], "mean": 36.5},
        {"cell": "shapcam", "errors": [32.5, 33.0, 32.9], "mean": 32.8},
        {"cell": "catkd", "errors": [66.4, 67.8, 90.0], "mean": 74.7},
    ]
    assert harness.unstable_cells(rows) == ["catkd"]
    sd, dof = harness.pooled_sd(rows, ["catkd"])
    squares = 0.25 + 0.25 + 0 + 0.09 + 0.04 + 0.01
    assert dof == 4 and sd == pytest.approx(math.sqrt(squares / 4))
    rows[0]["unstable"], rows[1]["unstable"], rows[2]["unstable"] = False, False, True
    rows[2]["std"] = statistics.stdev(rows[2]["errors"])  # as collect() writes it
    assert _noise_note(rows[1], rows[0], sd) == "beyond 2 standard errors"
    assert harness.pooled_sd(rows)[0] > 5  # pooled with it: shapcam's 3.7 points would hide
    assert _noise_note(rows[2], rows[0], sd) == "catkd: seeds unstable (sd 13.24)"
    # a wider but ordinary spread (sd 0.64, pooled others 0.40: under 3x) stays in the pool
    rows[2]["errors"], rows[2]["mean"] = [35.0, 36.2, 36.0], 35.73
    assert harness.unstable_cells(rows) == []


def test_run_with_a_different_config_is_refused(tmp_path):
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    run_dir = write_run(profile, "gradcam", 0, 50.0)
    other = harness.compose([*profile.cell_overrides("gradcam", 0), "loss.alpha=0.5"])
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(HarnessError, match="loss.alpha"):
        harness.pending_cells(profile)
    same = harness.compose(profile.cell_overrides("gradcam", 0))
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(same))
    assert "gradcam" not in harness.pending_cells(profile)[0]


def test_finished_table_needs_no_teacher_or_precompute(tmp_path, capsys):
    """A committed table (no checkpoints, no cache) resumes to nothing; a pending cached cell
    precomputes only its own method."""
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.seeds = [0]
    for cell in profile.cells:
        write_run(profile, cell, 0, 50.0)
    harness.run(profile, dry_run=True)
    assert "$" not in capsys.readouterr().out
    (profile.run_dir("shapcam_kd", 0) / "metrics.json").unlink()
    harness.run(profile, dry_run=True)
    commands = [line for line in capsys.readouterr().out.splitlines() if line.startswith("$")]
    assert len(commands) == 3  # teacher, Shap-CAM precompute, the one pending cell
    assert "distill.precompute" in commands[1] and "loss=shapcam " in commands[1] + " "
    assert "loss=shapcam_kd" in commands[2] and "scorecam" not in " ".join(commands)


def _cost_rows(table: str) -> dict[str, list[str]]:
    lines = [line for line in table.splitlines() if line.startswith("| ")][1:]
    return {line.split("|")[1].strip(): line.split("|") for line in lines}


def test_cost_model_arithmetic(tmp_path):
    """Paper profile: 50k images x 200 epochs x 3 seeds; times scale per image from batch 64."""
    times = {"teacher": 1.0, "precompute": 2.0, "ce": 0.5, "ce_kd": 0.8}
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"batch": 64, "step_s": times, "machine": {"cpu": "X"}}))
    table = harness.cost(Profile.load("paper"), path)
    rows = _cost_rows(table)
    teacher_h = 1.0 / 64 * 50_000 * 200 / 3600
    assert float(rows["teacher"][7]) == pytest.approx(teacher_h, abs=0.005)
    assert float(rows["cached teacher maps (shapcam)"][7]) == pytest.approx(
        2.0 / 64 * 50_000 / 3600, abs=0.005
    )
    assert float(rows["ce_kd"][8]) == pytest.approx(3 * 0.8 / 64 * 50_000 * 200 / 3600, abs=0.005)
    assert "not measured" in rows["gradcam"][5]
    expected = teacher_h * (1 + 3 * 0.5 + 3 * 0.8) + 2.0 / 64 * 50_000 / 3600
    assert f"**Total: {expected:.1f} h**" in table
    assert "gradcam, gradcam_kd" in table.splitlines()[-1]
    path.write_text("{}")
    with pytest.raises(HarnessError, match="bench_distill.py --json"):
        harness.cost(Profile.load("paper"), path)


def test_memo_miss_fraction_matches_a_simulation() -> None:
    """Closed form of the cost model against drawn views: 4,000 images, 30 epochs, after
    20 epochs of an earlier seed."""
    from distill.harness.cost_model import miss_fraction

    gen = torch.Generator().manual_seed(0)
    draws = torch.randint(0, 162, (4000, 50), generator=gen)
    seen = torch.zeros(4000, 162, dtype=torch.bool)
    misses = 0
    for epoch in range(50):
        view = draws[:, epoch]
        fresh = ~seen[torch.arange(4000), view]
        misses += int(fresh.sum()) if epoch >= 20 else 0
        seen[torch.arange(4000), view] = True
    assert misses / (4000 * 30) == pytest.approx(miss_fraction(20, 30), abs=0.01)


def test_cost_model_with_the_memo(tmp_path):
    """The first cell of a seed that needs a memo table pays computed-teacher steps for its
    misses; the later cells of the seed hit; later seeds miss less."""
    from distill.harness.cost_model import miss_fraction

    hit = {"teacher": 1.0, "ce": 0.5, "ce_kd": 0.5, "gradcam": 0.6, "gradcam_kd": 0.6}
    online = {**hit, "ce_kd": 0.9, "gradcam": 1.0, "gradcam_kd": 1.0}
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"batch": 64, "step_s": hit, "step_s_online": online}))
    profile = Profile.load("paper")
    profile.cells = ["ce", "ce_kd", "gradcam", "gradcam_kd"]
    rows = _cost_rows(harness.cost(profile, path))
    per_step_h = 50_000 * 200 / 64 / 3600
    first, later = miss_fraction(0, 200), [miss_fraction(200 * k, 200) for k in (1, 2)]
    ce_kd = sum(m * 0.9 + (1 - m) * 0.5 for m in [first, *later]) * per_step_h
    gradcam = sum(m * 1.0 + (1 - m) * 0.6 for m in [first, *later]) * per_step_h
    assert float(rows["ce_kd"][8]) == pytest.approx(ce_kd, abs=0.01)
    assert float(rows["gradcam"][8]) == pytest.approx(gradcam, abs=0.01)
    assert float(rows["gradcam_kd"][8]) == pytest.approx(3 * 0.6 * per_step_h, abs=0.01)
    assert rows["gradcam_kd"][6].strip() == "100 %"


def test_cli_reports_bad_profile_briefly():
    proc = subprocess.run(
        [sys.executable, "-m", "distill.harness", "report", "--profile", "x"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: unknown profile 'x'") and "Traceback" not in proc.stderr


@pytest.mark.slow
def test_smoke_profile_runs_the_whole_harness(tmp_path):
    """Every cell of the table trains for real (teacher, cached maps, cells, report) -- with one
    seed, to keep CI short: the multi-seed aggregation is tested on written metrics above."""
    smoke = (ROOT / "configs" / "harness" / "smoke.yaml").read_text()
    assert "seeds: [0, 1]" in smoke
    profile_path = tmp_path / "smoke-1seed.yaml"
    profile_path.write_text(smoke.replace("seeds: [0, 1]", "seeds: [0]"))
    cmd = [
        sys.executable,
        "-m",
        "distill.harness",
        "run",
        "--profile",
        str(profile_path),
        "--results-dir",
        str(tmp_path),
        "--n-jobs",
        "2",  # each cell is its own process: two at once (also tests the parallel path)
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "smoke" / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    profile = Profile.load(str(profile_path))
    assert profile.seeds == [0]
    table4 = [r for r in rows if r["table"] == "table4"]
    assert [r["cell"] for r in table4] == harness.table_cells()
    assert all(r["n_seeds"] == str(len(profile.seeds)) for r in rows)
    assert all(0 <= float(r["mean"]) <= 100 for r in rows)
    # the new columns: fidelity of every student, the baselines table, the maps figure
    students = [r for r in rows if r["table"] != "teacher"]
    assert all(0 <= float(r["fidelity_top1_agreement"]) <= 1 for r in students)
    assert all(math.isfinite(float(r["fidelity_map_cosine_gradcam"])) for r in students)
    (teacher,) = [r for r in rows if r["table"] == "teacher"]
    assert 0 <= float(teacher["faithfulness_adcc"]) <= 1
    baselines = [r["cell"] for r in rows if r["table"] == "baselines"]
    assert baselines[:3] == ["ce", "ce_kd", "dkd"] and len(baselines) == 5
    table = (tmp_path / "smoke" / "table.md").read_text()
    assert "| agree | KL(t‖s) | cos Grad-CAM | cos own | ADCC |" in table
    assert "## Baselines" in table and "Spearman ρ" in table and "Teacher faithfulness" in table
    assert "diff to paper" not in table and "[explain.png](explain.png)" in table
    assert (tmp_path / "smoke" / "explain.png").stat().st_size > 10_000
    # rerunning skips every finished run
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "train.py" not in again.stdout


# ----------------------------------------------------------------------------- issue 12
def finish_teacher(profile: Profile) -> None:
    """Mark the teacher finished without training it (CE cells do not load it)."""
    profile.teacher_dir.mkdir(parents=True, exist_ok=True)
    (profile.teacher_dir / "metrics.json").write_text(json.dumps({"test_error": 50.0}))


def hydra_config(overrides: list[str]) -> dict:
    """The config as train.py saves it in .hydra/config.yaml (unresolved, with ``paths``)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return OmegaConf.to_container(compose("train", overrides=overrides), resolve=False)


def test_dying_cell_does_not_stop_the_others_and_results_copy(tmp_path, capsys, monkeypatch):
    """A cell that crashes for real (corrupted last.ckpt) is reported with its log at the end,
    the next cell still trains, exit status 1; the results folder, copied elsewhere, passes
    ``status`` (paths stored relative to the results root)."""
    profile = Profile.load("smoke", results_dir=str(tmp_path / "res"))
    profile.cells, profile.seeds = ["ce"], [0, 1]
    monkeypatch.setattr(Profile, "load", classmethod(lambda cls, *a, **k: profile))
    finish_teacher(profile)
    dead = profile.run_dir("ce", 0) / "checkpoints" / "last.ckpt"
    dead.parent.mkdir(parents=True)
    dead.write_bytes(b"not a checkpoint")
    assert harness.main(["run", "--profile", "smoke"]) == 1
    err = capsys.readouterr().err
    log = profile.run_dir("ce", 0) / "harness.log"
    assert f"ce-s0: exit status 2; log: {log}" in err and "error:" in log.read_text()
    assert harness.read_metrics(profile.run_dir("ce", 1))["test_error"] is not None
    saved = yaml.safe_load((profile.run_dir("ce", 1) / ".hydra" / "config.yaml").read_text())
    assert saved["teacher"]["checkpoint"].startswith("${paths.log_dir}/runs/teacher/")
    import shutil

    shutil.copytree(tmp_path / "res", tmp_path / "moved")
    shutil.rmtree(tmp_path / "res")
    profile.results_dir = str(tmp_path / "moved")
    assert harness.main(["status", "--profile", "smoke"]) == 0
    assert capsys.readouterr().out.strip() == "seed 0: pending ['ce']"


def test_copied_legacy_results_with_absolute_paths_stay_valid(tmp_path, capsys):
    """Runs saved by older versions (absolute teacher.checkpoint under the old results root)
    are recognised after the folder is copied: status and report accept them."""
    old = Profile.load("smoke", results_dir=str(tmp_path / "old"))
    old.cells, old.seeds = ["gradcam"], [0]
    for cell, seed, overrides in [
        ("gradcam", 0, old.cell_overrides("gradcam", 0)),
        (None, None, old.teacher_overrides()),
    ]:
        run_dir = old.run_dir(cell, seed) if cell else old.teacher_dir
        legacy = [
            o.replace("${paths.log_dir}", str(old.out)) if o.startswith("teacher.") else o
            for o in overrides
        ]
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(hydra_config(legacy)))
        (run_dir / "metrics.json").write_text(json.dumps({"test_error": 40.0}))
    assert str(old.out) in (old.run_dir("gradcam", 0) / ".hydra" / "config.yaml").read_text()
    import shutil

    shutil.copytree(tmp_path / "old", tmp_path / "new")
    new = Profile.load("smoke", results_dir=str(tmp_path / "new"))
    new.cells, new.seeds = ["gradcam"], [0]
    assert harness.pending_cells(new) == {}
    harness.report(new)
    assert "| gradcam | 1 | 40.00" in (new.out / "table.md").read_text()


def _cli(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distill.harness", *args]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_runs_of_another_config_are_listed_not_counted(tmp_path):
    """Issue 20 item 5: a run of another configuration is named by status and report, left out
    of the table, and neither command exits 2."""
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.cells, profile.seeds = ["ce", "gradcam"], [0]
    write_run(profile, "ce", 0, 50.0)
    run_dir = write_run(profile, "gradcam", 0, 40.0)
    other = harness.compose([*profile.cell_overrides("gradcam", 0), "loss.alpha=0.5"])
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(other))
    harness.report(profile)
    table = (tmp_path / "smoke" / "table.md").read_text()
    assert "1 run(s) of another configuration, listed here and not counted" in table
    assert "gradcam-s0 (differs in loss.alpha)" in table
    assert "| gradcam | 0 | — |" in table and "| ce | 1 | 50.00" in table
    with open(tmp_path / "smoke" / "table.csv") as handle:
        rows = {r["cell"]: r for r in csv.DictReader(handle)}
    assert rows["gradcam"]["other_config_seeds"] == "0" and rows["gradcam"]["n_seeds"] == "0"
    # the CLI (whole profile): listed, exit 0
    for command in ("status", "report"):
        proc = _cli(command, "--profile", "smoke", "--results-dir", str(tmp_path))
        assert proc.returncode == 0, proc.stderr
        assert "gradcam-s0: another configuration, not counted" in proc.stdout
    # run still refuses to train into it
    with pytest.raises(HarnessError, match="different config"):
        harness.pending_cells(profile)


def test_report_without_runs_fails_and_writes_nothing(tmp_path):
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.cells, profile.seeds = ["ce", "gradcam"], [0]
    run_dir = write_run(profile, "gradcam", 0, 40.0)
    other = harness.compose([*profile.cell_overrides("gradcam", 0), "loss.alpha=0.5"])
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(other))
    with pytest.raises(harness.NoRunsError, match="no finished run of profile 'smoke'.*1 run"):
        harness.report(profile)
    proc = _cli("report", "--profile", "smoke", "--results-dir", str(tmp_path / "empty"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: no finished run") and proc.stderr.count("\n") == 1
    for name in ("table.md", "table.csv", "chart.png"):
        assert not (tmp_path / "smoke" / name).exists()
        assert not (tmp_path / "empty" / "smoke" / name).exists()


LOCK_HOLDER = """
import subprocess, sys, time
from pathlib import Path
from distill.harness import results_lock
with results_lock(Path(sys.argv[1])) as fd:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], pass_fds=(fd,))
    print(child.pid, flush=True)
    time.sleep(120)
"""


def test_second_run_on_a_results_folder_is_refused(tmp_path):
    """While one harness run holds the results folder, a second ``run`` exits 2 naming the
    holder (pid, host); a holder killed for real leaves no stale lock once its trainings end."""
    import os
    import signal
    import socket
    import time

    profile = Profile.load("smoke", results_dir=str(tmp_path))
    finish_teacher(profile)
    for cell in profile.cells:  # everything finished: without a lock, run exits 0 at once
        for seed in profile.seeds:
            write_run(profile, cell, seed, 50.0)
    cmd = [sys.executable, "-m", "distill.harness", "run", "--profile", "smoke"]
    cmd += ["--results-dir", str(tmp_path)]
    with harness.results_lock(profile.out):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert f"pid {os.getpid()}" in harness.running_holder(profile.out)
    assert harness.running_holder(profile.out) is None
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"in use by another harness run (pid {os.getpid()} on {socket.gethostname()}" in (
        proc.stderr
    )
    # a harness killed with SIGKILL while its training runs: the training keeps the folder
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(profile.out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(holder.stdout.readline())
    holder.kill()
    holder.wait()
    try:
        gone = "that process is gone but a training it started"
        with pytest.raises(HarnessError, match=gone), harness.results_lock(profile.out):
            pass
    finally:
        os.kill(child, signal.SIGKILL)
    for _ in range(100):  # the orphan is reparented: wait until it is gone
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    with harness.results_lock(profile.out):  # no stale lock
        pass
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "is finished" in proc.stdout


# ----------------------------------------------------------------------------- issue 13
PROFILE_DIR = ROOT / "configs" / "harness"
DEFAULTS = {
    "cells": None,
    "baselines": [],
    "common": [],
    "teacher": [],
    "student": [],
    "precompute": [],
    "method_overrides": {},
    "n_jobs": 1,
    "devices": "auto",
    "launcher": "local",
    "slurm": {},
    "results_dir": "results",
    "description": "",
    "pairs": {},  # a profile with pairs: tests/test_pairs.py
    "pair": None,
}


@pytest.mark.parametrize("name", ["smoke", "cpu-mini", "paper"])
def test_profiles_are_hydra_configs_with_the_values_of_their_yaml(name):
    """Composed by Hydra with the schema, each profile holds exactly what its YAML says (the
    schema's defaults for absent keys; absent ``cells``: every table cell; ``baselines`` run as
    cells too), by name or by path."""
    path = PROFILE_DIR / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    assert raw.pop("defaults") == ["harness_profile", "_self_"]
    expected = {**DEFAULTS, **raw}
    cells = [*(expected["cells"] or harness.table_cells()), *expected["baselines"]]
    expected["cells"] = list(dict.fromkeys(cells))
    assert vars(Profile.load(name)) == expected
    assert vars(Profile.load(str(path))) == expected


def test_interpolations_in_profile_overrides_are_kept_for_train_py(tmp_path):
    """``${...}`` in an override is passed to train.py as written (Hydra does not resolve it)."""
    override = "teacher.checkpoint=${paths.log_dir}/runs/teacher/checkpoints/last.ckpt"
    (tmp_path / "p.yaml").write_text(f"name: p\nseeds: [0]\nstudent: ['{override}']\n")
    assert Profile.load(str(tmp_path / "p.yaml")).student == [override]


def test_table_cells_come_from_the_loss_presets(monkeypatch):
    """Every table method (CE and each CAM method with both loss presets) without and with KD, in
    registry order; a new method with its presets is a cell of a profile without ``cells``."""
    from distill import presets

    methods = presets.table_methods()
    assert harness.table_cells() == [m + kd for m in methods for kd in ("", "_kd")]
    assert harness.table_cells()[:2] == ["ce", "ce_kd"]
    monkeypatch.setattr(presets, "table_methods", lambda: [*methods, "newcam"])
    assert Profile.load("smoke").cells[-3:] == ["newcam", "newcam_kd", "dkd"]  # then baselines
    assert "newcam" not in Profile.load("cpu-mini").cells  # pinned to its committed run


BAD_PROFILES = {
    "misspelled": ("cellz: [ce]", r"Key 'cellz' not in 'Profile'\n\s*full_key: cellz"),
    "wrong type": (
        "n_jobs: two",
        r"Value 'two' .* could not be converted to Integer\n\s*full_key: n_jobs",
    ),
    "wrong item": (
        "seeds: [0, one]",
        r"'one' .* could not be converted to Integer\n\s*full_key: seeds\[1\]",
    ),
    "not a list": ("cells: ce", r"full_key: cells"),
    "no name": ("seeds: [0]", r"Missing mandatory value: name"),
}


@pytest.mark.parametrize("schema_entry", [True, False], ids=["defaults-entry", "plain-yaml"])
@pytest.mark.parametrize("case", list(BAD_PROFILES))
def test_bad_profile_key_or_type_is_refused_naming_the_key(tmp_path, case, schema_entry):
    """A misspelled key or a wrong type is refused with OmegaConf's message naming the key, for a
    profile with the schema in its defaults list (Hydra's composition) and for a plain YAML file
    given as ``--profile PATH.yaml`` (merged onto the schema)."""
    line, message = BAD_PROFILES[case]
    head = "defaults:\n  - harness_profile\n  - _self_\n" if schema_entry else ""
    body = "seeds: [0]\n" if case in ("misspelled", "wrong type", "not a list") else ""
    name = "" if case == "no name" else "name: bad\n"
    (tmp_path / "bad.yaml").write_text(head + name + body + line + "\n")
    with pytest.raises(
        HarnessError, match=f"invalid profile {tmp_path / 'bad.yaml'}: (?s:.*){message}"
    ):
        Profile.load(str(tmp_path / "bad.yaml"))
    with pytest.raises(HarnessError, match=message):
        Profile.load("bad", directory=tmp_path)


def test_cli_refuses_a_bad_profile_key_briefly(tmp_path):
    (tmp_path / "typo.yaml").write_text("name: typo\nseeds: [0]\nseed: [1]\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "distill.harness",
            "status",
            "--profile",
            str(tmp_path / "typo.yaml"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: invalid profile") and "full_key: seed\n" in proc.stderr
    (tmp_path / "typo.yaml").write_text("name: typo\nseeds: [0\n")  # not YAML
    assert Profile.load("smoke").name == "smoke"
    with pytest.raises(HarnessError, match="(?s)invalid profile .*expected ',' or ']'"):
        Profile.load(str(tmp_path / "typo.yaml"))


# ----------------------------------------------------------------------------- issue 18
def footnote(table: str, row_start: str, text: str) -> str:
    """The footnote, among those referenced in the table row starting ``row_start``, whose text
    contains ``text``."""
    (row,) = [line for line in table.splitlines() if line.startswith(row_start)]
    refs = re.findall(r"\[\^(\d+)\]", row)
    notes = [line for line in table.splitlines() for n in refs if line.startswith(f"[^{n}]: ")]
    (found,) = [note for note in notes if text in note]
    return found


def edit_metrics(run_dir: Path, **changes: object) -> None:
    path = run_dir / "metrics.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def write_runs(profile: Profile, errors: dict[str, list[float]]) -> None:
    """Finished runs of ``errors`` (per cell, per seed of the profile), as the profile asks."""
    finish_teacher(profile)
    for cell, values in errors.items():
        for seed, error in zip(profile.seeds, values, strict=True):
            write_run(profile, cell, seed, error)
            edit_metrics(profile.run_dir(cell, seed), epochs=1)  # the smoke profile's


def test_report_leaves_runs_that_differ_out_of_the_mean(tmp_path, capsys, monkeypatch):
    """A run continued with a changed config (``config_changes``) or trained for other epochs
    than the profile's is not in its cell's mean: the table marks it, a footnote says what
    differed and how to train it as the profile asks; ``status`` and ``run`` list it and ``run``
    does not retrain it."""
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.cells, profile.seeds = ["ce", "gradcam"], [0, 1, 2]
    monkeypatch.setattr(Profile, "load", classmethod(lambda cls, *a, **k: profile))
    write_runs(profile, {"ce": [10.0, 12.0, 40.0], "gradcam": [9.0, 9.6, 30.0]})
    edit_metrics(profile.run_dir("ce", 2), epochs=3)
    edit_metrics(profile.run_dir("gradcam", 2), config_changes=["loss.alpha"])

    harness.report(profile)
    with open(profile.out / "table.csv") as handle:
        rows = {r["cell"]: r for r in csv.DictReader(handle)}
    assert (rows["ce"]["n_seeds"], float(rows["ce"]["mean"])) == ("2", pytest.approx(11.0))
    assert rows["ce"]["excluded_seeds"] == "2"
    assert rows["ce"]["excluded_why"] == "seed 2: trained 3 epochs, the profile asks 1"
    assert float(rows["gradcam"]["mean"]) == pytest.approx(9.3)
    assert rows["gradcam"]["excluded_why"] == (
        "seed 2: continued with allow_changed_config=true, changing loss.alpha"
    )
    table = (profile.out / "table.md").read_text()
    assert "| ce | 2 | 11.00 ± 1.41[^1] |" in table
    assert "| gradcam | 2 | 9.30 ± 0.42[^2] |" in table
    assert table.count("seed 2 not in the mean: differs from the profile |") == 2
    ce2 = profile.run_dir("ce", 2)
    assert footnote(table, "| ce |", "seed 2") == (
        f"[^1]: `ce` seed 2 is not in the mean: trained 3 epochs, the profile asks 1 ({ce2}). "
        f"To train it as the profile asks: `mv {ce2} {ce2}.set-aside && python -m "
        f"distill.harness run --profile smoke --results-dir {tmp_path}`."
    )
    assert "changing loss.alpha" in footnote(table, "| gradcam |", "seed 2")

    assert harness.main(["status", "--profile", "smoke"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(
        "ce-s2 differs from the profile (trained 3 epochs, the profile asks 1): not in the "
        f"table's means; to train it as the profile asks: mv {ce2} {ce2}.set-aside && "
    )
    assert out[1].startswith("gradcam-s2 differs from the profile (continued with ")
    finished = "every run of profile 'smoke' is finished; 2 differ from the profile (above)"
    assert out[2:] == [finished]
    assert harness.main(["run", "--profile", "smoke", "--dry-run"]) == 0
    out, err = capsys.readouterr()
    assert "$ " not in out and "is finished" in out
    assert err.startswith("warning: ce-s2 differs from the profile (trained 3 epochs")


def test_report_names_a_nan_test_error(tmp_path):
    """A NaN test error is named in its cell (``NaN (diverged: seed 1)``, not ``— ± —``) with a
    footnote naming the run directory; the cell's mean is NaN, and the pooled seed noise uses
    only the other cells."""
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.cells, profile.seeds = ["ce", "gradcam"], [0, 1]
    write_runs(profile, {"ce": [10.0, 12.0], "gradcam": [9.0, math.nan]})
    harness.report(profile)
    table = (profile.out / "table.md").read_text()
    assert "| gradcam | 2 | NaN (diverged: seed 1)[^1] | — | — | — | — | — | — | — | 6.86 |  |" in (
        table
    )
    assert "— ± —" not in table
    assert footnote(table, "| gradcam |", "seed 1") == (
        f"[^1]: `gradcam` seed 1: test error NaN, the run diverged "
        f"({profile.run_dir('gradcam', 1)}); the cell's mean is NaN, not the mean of its other "
        "seeds."
    )
    assert "standard deviation 1.41 points, pooled over the cells (1 degrees" in table
    with open(profile.out / "table.csv") as handle:
        rows = {r["cell"]: r for r in csv.DictReader(handle)}
    assert rows["gradcam"]["errors"] == "9.00 nan" and math.isnan(float(rows["gradcam"]["mean"]))
    assert rows["gradcam"]["diverged_seeds"] == "1" and rows["ce"]["diverged_seeds"] == ""


def test_report_warns_when_the_teacher_differs(tmp_path):
    """A teacher trained for other epochs than the profile's: a warning above the table and a
    footnote on its test error (the cells distilled from it cannot be left out of a mean)."""
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.cells, profile.seeds = ["ce"], [0]
    finish_teacher(profile)
    write_run(profile, "ce", 0, 10.0)
    harness.report(profile)
    assert "differs" not in (profile.out / "table.md").read_text()
    edit_metrics(profile.teacher_dir, epochs=4, test_error=math.nan)
    harness.report(profile)
    table = (profile.out / "table.md").read_text()
    assert "**The teacher differs from the profile[^1]: so do the cells distilled from it.**" in (
        table
    )
    assert "Teacher test error: NaN (diverged)[^1]." in table
    assert f"[^1]: The teacher ({profile.teacher_dir}) trained 4 epochs, the profile asks 1." in (
        table
    )


@pytest.mark.slow
def test_continued_runs_stay_flagged_after_a_rerun_with_the_profiles_config(
    tmp_path, capsys, monkeypatch
):
    """Real runs: a finished cell trained on with ``trainer.max_epochs=2`` and a changed learning
    rate (``allow_changed_config=true``; the profile asks 1 epoch), then rerun with the profile's
    config (a finished run is left as it is). ``status`` and the report say both changes; with
    ``config_changes`` missing from metrics.json (a run recorded before it existed), the
    ``config_resolved.changed-1.yaml`` beside the saved config still tells."""
    from tests.conftest import run_python

    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.cells, profile.seeds = ["ce"], [0]
    monkeypatch.setattr(Profile, "load", classmethod(lambda cls, *a, **k: profile))
    finish_teacher(profile)  # CE students do not load it
    assert harness.main(["run", "--profile", "smoke"]) == 0
    assert "differs" not in (profile.out / "table.md").read_text()

    def train(*extra: str) -> str:
        proc = run_python(["train.py", *profile.cell_overrides("ce", 0), *extra])
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout

    train("trainer.max_epochs=2", "module.optimizer.lr=0.5", "allow_changed_config=true")
    run_dir = profile.run_dir("ce", 0)
    before = (run_dir / "metrics.json").read_text()
    assert "already finished" in train()  # the profile's config: left as it is
    assert (run_dir / "metrics.json").read_text() == before
    metrics = harness.read_metrics(run_dir)
    assert metrics["epochs"] == 2 and "module.optimizer.lr" in metrics["config_changes"]
    assert (run_dir / "config_resolved.changed-1.yaml").exists()
    changed = "continued with allow_changed_config=true, changing module.optimizer.lr"
    for recorded in (True, False):
        if not recorded:  # as recorded before metrics.json named the changes
            metrics.pop("config_changes")
            (run_dir / "metrics.json").write_text(json.dumps(metrics))
        capsys.readouterr()
        assert harness.main(["status", "--profile", "smoke"]) == 0
        out = capsys.readouterr().out
        assert "ce-s0 differs from the profile (" in out and "module.optimizer.lr" in out
        assert harness.main(["report", "--profile", "smoke"]) == 0
        table = (profile.out / "table.md").read_text()
        assert "| ce | 0 | —[^1] |" in table and "seed 0 not in the mean" in table
        assert f"{changed}; trained 2 epochs, the profile asks 1" in footnote(table, "| ce |", "")


# ----------------------------------------------------------------------------- issues 19/20
def write_metrics(profile: Profile, cell: str, seed: int, **metrics: float) -> None:
    run_dir = profile.run_dir(cell, seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


def test_report_paired_intervals_fidelity_baselines_and_ranking(tmp_path):
    """Three seeds: the paired difference and its 95 % t interval equal a hand computation
    (t quantile of 2 degrees of freedom in closed form), the fidelity columns are the seed
    means, the teacher shows its faithfulness, the baselines table holds ce, ce_kd, the
    profile's baseline cell and the best CAM cells, and at reduced scale the rank correlation
    replaces the difference to the paper."""
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.seeds = [0, 1, 2]
    profile.cells = ["ce", "gradcam", "gradcampp", "ce_kd", "gradcam_kd", "dkd"]
    errors = {
        "ce": [10.0, 12.0, 11.0],
        "gradcam": [9.0, 10.5, 10.2],
        "gradcampp": [8.0, 8.0, 8.0],
        "ce_kd": [7.0, 7.0, 7.0],
        "gradcam_kd": [6.5, 7.5, 8.5],
        "dkd": [6.5, 6.5, 6.5],
    }
    agreement = [0.5, 0.6, 0.7]
    for cell, values in errors.items():
        for seed, err in enumerate(values):
            write_metrics(
                profile, cell, seed, test_error=err, fidelity_top1_agreement=agreement[seed]
            )
    finish_teacher(profile)
    teacher = json.loads((profile.teacher_dir / "metrics.json").read_text())
    teacher["faithfulness_adcc"] = 0.4321
    (profile.teacher_dir / "metrics.json").write_text(json.dumps(teacher))
    harness.report(profile)
    with open(tmp_path / "smoke" / "table.csv") as handle:
        rows = list(csv.DictReader(handle))
    table4 = {r["cell"]: r for r in rows if r["table"] == "table4"}
    baselines = [r["cell"] for r in rows if r["table"] == "baselines"]
    # by hand: d = (-1, -1.5, -0.8), mean -1.1, sd sqrt(0.13); t_{0.975, 2} = 0.95/sqrt(0.04875)
    half = 0.95 / math.sqrt(2 * 0.975 * 0.025) * math.sqrt(0.13) / math.sqrt(3)
    row = table4["gradcam"]
    assert float(row["diff_ce"]) == pytest.approx(-1.1)
    assert float(row["diff_low_ce"]) == pytest.approx(-1.1 - half)
    assert float(row["diff_high_ce"]) == pytest.approx(-1.1 + half)
    assert row["n_pairs_ce"] == "3"
    assert float(table4["gradcam_kd"]["diff_ce_kd"]) == pytest.approx(0.5)  # d = -.5, .5, 1.5
    assert float(table4["gradcam_kd"]["diff_high_ce_kd"]) == pytest.approx(
        0.5 + 0.95 / math.sqrt(0.04875) * 1.0 / math.sqrt(3)
    )
    assert float(row["fidelity_top1_agreement"]) == pytest.approx(0.6)
    assert baselines == ["ce", "ce_kd", "dkd", "gradcampp", "gradcam_kd"]
    table = (tmp_path / "smoke" / "table.md").read_text()
    assert f"| gradcam | 3 | 9.90 ± {statistics.stdev(errors['gradcam']):.2f} | " in table
    assert f"-1.10 [{-1.1 - half:+.2f}, {-1.1 + half:+.2f}]" in table
    assert "## Baselines" in table and "| dkd | 3 |" in table and "adcc 0.432" in table
    assert "| teacher | 1 | 50.00 ± — | — | — | — | — | — | — | 0.432 |" in table
    (teacher_csv,) = [r for r in rows if r["table"] == "teacher"]
    assert float(teacher_csv["faithfulness_adcc"]) == pytest.approx(0.4321)
    assert "diff to paper" not in table
    # paper: ce_kd < gradcam_kd < gradcampp < ce < gradcam; ours swap ce and gradcam:
    # 1 - 6 * 2 / (5 * 24) (dkd has no paper value)
    assert "Spearman ρ = +0.90 over 5 cells" in table
    # the paper profile keeps the difference to the paper and has no rank line
    shutil.copytree(tmp_path / "smoke", tmp_path / "paper")
    profile.name = "paper"
    harness.report(profile)
    paper_table = (tmp_path / "paper" / "table.md").read_text()
    assert "diff to paper" in paper_table and "Spearman" not in paper_table


def test_cost_reads_the_step_times_the_docs_quote(capsys):
    """`harness cost --profile paper` without --step-times gives the total docs/harness.md
    quotes (it read the old fp32 file without memo times before)."""
    quoted = re.search(
        r"comes to (\d+) h with the memo", (ROOT / "docs" / "harness.md").read_text()
    )
    assert quoted, "docs/harness.md quotes the paper profile's cost"
    assert harness.main(["cost", "--profile", "paper"]) == 0
    total = re.search(r"\*\*Total: ([\d.]+) h\*\*", capsys.readouterr().out)
    assert total and round(float(total.group(1))) == int(quoted.group(1))


def test_archived_cpu_mini_runs_are_listed_as_another_configuration(tmp_path, capsys):
    """The archived cpu-mini runs of 2026-11-22 predate the profile's keys: status lists them
    (exit 0), report says no run of this configuration finished (exit 1) and writes nothing."""
    shipped = ROOT / "results" / "archive" / "cpu-mini-2026-11-22" / "runs"
    if not shipped.is_dir():
        pytest.skip("no archived cpu-mini runs")
    shutil.copytree(shipped, tmp_path / "cpu-mini" / "runs")
    args = ["--profile", "cpu-mini", "--results-dir", str(tmp_path)]
    assert harness.main(["status", *args]) == 0
    out = capsys.readouterr().out
    assert "ce-s0: another configuration, not counted" in out
    assert "teacher: another configuration" in out and "teacher differs" not in out
    assert harness.main(["report", *args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no finished run of profile 'cpu-mini'") and err.count("\n") == 1
    assert not any((tmp_path / "cpu-mini" / n).exists() for n in ("table.md", "chart.png"))


def test_committed_cpu_mini_runs_count_after_later_config_keys(tmp_path, capsys):
    """The committed cpu-mini runs were saved before data.dataset / num_classes, the networks'
    declared layers (null layer keys) and the registry's teacher run names: the harness still
    counts them as the profile's runs (status: finished; report: every seed in every mean)."""
    shipped = ROOT / "results" / "cpu-mini" / "runs"
    if not (shipped / "teacher" / "metrics.json").is_file():
        pytest.skip("no committed cpu-mini runs")
    saved = yaml.safe_load((shipped / "ce-s0" / ".hydra" / "config.yaml").read_text())
    assert "dataset" not in saved["data"] and saved["loss"]["student_layer"] == "block3"
    no_weights = shutil.ignore_patterns("checkpoints", "teacher_weights.pt*")
    shutil.copytree(shipped, tmp_path / "cpu-mini" / "runs", ignore=no_weights)
    args = ["--profile", "cpu-mini", "--results-dir", str(tmp_path)]
    assert harness.main(["status", *args]) == 0
    out = capsys.readouterr().out
    assert "every run of profile 'cpu-mini' is finished" in out and "another config" not in out
    assert harness.main(["report", *args]) == 0
    with open(tmp_path / "cpu-mini" / "table.csv") as handle:
        rows = {(r["table"], r["cell"]): r for r in csv.DictReader(handle)}
    errors = [
        json.loads((shipped / f"shapcam-s{s}" / "metrics.json").read_text())["test_error"]
        for s in (0, 1)
    ]
    assert rows[("table4", "shapcam")]["n_seeds"] == "2"
    assert float(rows[("table4", "shapcam")]["mean"]) == pytest.approx(sum(errors) / 2, abs=0.01)


def test_committed_cpu_runs_continue_in_a_fresh_clone_with_todays_code(tmp_path, capsys):
    """The `cpu` runs committed so far (trained by the code before issue 22) are what a fresh
    clone continues from: with only the tracked files, status counts every committed run as
    finished (none is 'another configuration') and every other run as pending."""
    tracked = subprocess.run(
        ["git", "ls-files", "results/cpu/runs"], cwd=ROOT, capture_output=True, text=True
    ).stdout.split()
    if "results/cpu/runs/teacher/teacher_weights.pt" not in tracked:
        pytest.skip("no committed cpu teacher")
    for name in tracked:  # what a clone holds
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    done = {n.split("/")[3] for n in tracked if n.endswith("/metrics.json")} - {"teacher"}
    assert (
        harness.main(["status", "--profile", "cpu", "--results-dir", str(tmp_path / "results")])
        == 0
    )
    out = capsys.readouterr().out
    assert "another config" not in out and "teacher" not in out  # the teacher counts as finished
    pending = {
        f"{cell}-s{seed}"
        for seed, cells in re.findall(r"seed (\d+): pending \[([^\]]*)\]", out)
        for cell in re.findall(r"'([^']+)'", cells)
    }
    profile = Profile.load("cpu")
    every = {f"{c}-s{s}" for s in profile.seeds for c in profile.cells}
    assert done and not done & pending and pending | done == every, out


def test_a_pair_of_the_cifar100_profile_has_no_paper_column(tmp_path):
    """The Shap-CAM paper measured WRN-40-2 -> WRN-16-2 on CIFAR-10 only: a pair's table has no
    paper column and no rank correlation with it (the CSV's paper values are NaN)."""
    pair = Profile.load("cifar100", results_dir=str(tmp_path)).expand()[0]
    pair.seeds, pair.cells = [0, 1], ["ce", "gradcam", "ce_kd"]
    for cell, values in {
        "ce": [30.0, 31.0],
        "gradcam": [29.0, 29.5],
        "ce_kd": [28.0, 28.5],
    }.items():
        for seed, err in zip(pair.seeds, values, strict=True):
            write_run(pair, cell, seed, err)
    harness.report(pair)
    table = (pair.out / "table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| cell |"))
    assert "paper" not in header and "Spearman" not in table
    assert "| gradcam | 2 | 29.25 ± 0.35 | -1.25 " in table
    with open(pair.out / "table.csv") as handle:
        rows = {r["cell"]: r for r in csv.DictReader(handle)}
    assert math.isnan(float(rows["gradcam"]["paper"]))
    assert float(rows["gradcam"]["diff_baseline"]) == pytest.approx(-1.25)


def test_chart_scales_to_the_stable_cells_and_labels_an_unstable_one():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distill.harness.reporting import _focus

    fig, ax = plt.subplots()
    _focus(ax, [32.0, 36.0], [(2, 74.8, "catkd"), (3, 35.0, "inside")])
    low, high = ax.get_ylim()
    assert low == pytest.approx(32.0 - 0.6) and high == pytest.approx(36.0 + 1.8 * 0.6)
    assert [t.get_text() for t in ax.texts] == ["catkd: 74.8\n(off scale)"]
    plt.close(fig)


def test_report_names_a_collapsed_cell_and_keeps_the_others_verdicts(tmp_path):
    """As in the cpu profile: a baseline with one seed at chance no longer hides the CAM cell's
    difference to ``ce`` (pooled with it, the noise would be 11 points and the note "within")."""
    profile = Profile.load("smoke", results_dir=str(tmp_path))
    profile.cells, profile.seeds = ["ce", "gradcam", "catkd"], [0, 1, 2]
    profile.baselines = ["catkd"]  # as Profile.load lists a profile's baselines
    write_runs(
        profile,
        {"ce": [36.0, 37.0, 36.5], "gradcam": [33.9, 34.4, 34.0], "catkd": [66.4, 67.8, 90.0]},
    )
    table = harness.report(profile).read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()}
    assert rows["gradcam"].endswith("| beyond 2 standard errors |")
    assert rows["catkd"].endswith("| catkd: seeds unstable (sd 13.24) |")
    assert "Left out of the pool as unstable" in table and "`catkd`" in table
    squares = 0.25 + 0.25 + 0 + 0.04 + 0.09 + 0.01  # ce and gradcam only, 4 dof
    assert f"standard deviation {math.sqrt(squares / 4):.2f} points" in table
