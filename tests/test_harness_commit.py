"""``harness run --commit``: records and teacher weights committed as runs finish, and a fresh
clone of the repository (what survives a restart) continues the protocol from them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distill.harness.records import (
    WEIGHTS_NAME,
    GitRecorder,
    export_teacher_weights,
    teacher_checkpoint,
)
from distill.integrity import write_checksum
from distill.models import WideResNet
from distill.teacher.loading import TeacherError, load_teacher

ROOT = Path(__file__).resolve().parents[1]


def _fake_teacher_run(run: Path) -> WideResNet:
    """A teacher run directory with a Lightning-style ``last.ckpt`` (weights, optimizer state)."""
    net = WideResNet(10, 1)
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    momentum = {i: {"momentum_buffer": p.detach().clone()} for i, p in enumerate(net.parameters())}
    ckpt = {
        "state_dict": state,
        "optimizer_states": [{"state": momentum}],
        "hyper_parameters": {"arch": net.arch},
    }
    path = run / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    torch.save(ckpt, path)
    write_checksum(path)
    return net


def test_exported_weights_are_the_teachers_and_are_verified(tmp_path):
    run = tmp_path / "runs" / "teacher"
    net = _fake_teacher_run(run)
    assert teacher_checkpoint(run, "${paths.log_dir}").endswith("checkpoints/last.ckpt")
    out = export_teacher_weights(run)
    assert out == run / WEIGHTS_NAME
    assert out.stat().st_size < 0.7 * (run / "checkpoints" / "last.ckpt").stat().st_size
    x = torch.randn(3, 3, 32, 32)
    a = load_teacher(WideResNet(10, 1), run / "checkpoints" / "last.ckpt")
    b = load_teacher(WideResNet(10, 1), out)
    assert torch.equal(a(x), b(x)) and torch.equal(b(x), net.eval()(x))
    (run / "checkpoints" / "last.ckpt").unlink()  # a restart keeps only committed files
    expected = f"${{paths.log_dir}}/runs/teacher/{WEIGHTS_NAME}"
    assert teacher_checkpoint(run, "${paths.log_dir}") == expected
    assert export_teacher_weights(run) == out  # kept
    out.write_bytes(out.read_bytes()[:-8] + b"corrupt!")
    with pytest.raises(TeacherError, match="corrupted"):
        load_teacher(WideResNet(10, 1), out)


def test_report_commit_leaves_out_unfinished_runs(tmp_path):
    """A failed or interrupted run has logs but no metrics.json: its records stay uncommitted."""
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    _git(tmp_path, "config", "user.email", "t@t")
    _git(tmp_path, "config", "user.name", "t")
    out = tmp_path / "results" / "p"
    for run, files in {"ce-s0": ["metrics.json", "train.log"], "dkd-s0": ["train.log"]}.items():
        for name in [*files, "checkpoints/last.ckpt.sha256"]:
            (out / "runs" / run / name).parent.mkdir(parents=True, exist_ok=True)
            (out / "runs" / run / name).write_text("{}")
    (out / "table.md").write_text("| x |")
    assert GitRecorder(out).commit_results("results: p report")
    tracked = set(_git(tmp_path, "ls-files").split())
    assert tracked == {
        "results/p/table.md",
        "results/p/runs/ce-s0/metrics.json",
        "results/p/runs/ce-s0/train.log",
    }


def test_recorder_outside_a_repository_warns_and_commits_nothing(tmp_path, capsys):
    recorder = GitRecorder(tmp_path / "results")
    assert recorder.commit_results("x") is False
    assert "not inside a git repository" in capsys.readouterr().err


def _git(repo: Path, *args: str) -> str:
    proc = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return proc.stdout


def _harness(profile: Path, results: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distill.harness", *args, "--profile", str(profile)]
    cmd += ["--results-dir", str(results)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_commit_as_you_go_survives_a_fresh_clone(tmp_path):
    smoke = (ROOT / "configs" / "harness" / "smoke.yaml").read_text()
    profile = tmp_path / "mini.yaml"
    one_seed = smoke.replace("seeds: [0, 1]", "seeds: [0]\ncells: [gradcam_kd]")
    profile.write_text(one_seed.replace("baselines: [dkd]", "baselines: []"))
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    _git(repo, "config", "user.email", "t@example.org")
    _git(repo, "config", "user.name", "t")
    (repo / ".gitignore").write_text("*.ckpt\n")
    _git(repo, "add", ".gitignore")
    _git(repo, "commit", "-qm", "init")

    first = _harness(profile, repo / "results", "run", "--commit", "--devices", "cpu:1")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    tracked = _git(repo, "ls-files").split()
    assert f"results/smoke/runs/teacher/{WEIGHTS_NAME}" in tracked
    assert "results/smoke/runs/teacher/metrics.json" in tracked
    assert "results/smoke/runs/gradcam_kd-s0/metrics.json" in tracked
    assert "results/smoke/table.md" in tracked
    assert not [f for f in tracked if "/checkpoints/" in f or f.endswith(".ckpt")]
    # the CAM figures stay on disk, out of git (about 1 MB a picture)
    assert list((repo / "results/smoke/runs/gradcam_kd-s0/cam_grids").glob("*.png"))
    assert not [f for f in tracked if "/cam_grids/" in f]
    log = _git(repo, "log", "--format=%s")
    assert "teacher finished" in log and "gradcam_kd-s0 finished" in log and "report" in log
    assert not _git(repo, "status", "--porcelain", "--", "results/smoke/table.md")

    # a restart keeps only what was committed: continue in a fresh clone with a second seed
    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(repo), str(clone))
    profile.write_text(profile.read_text().replace("seeds: [0]", "seeds: [0, 1]"))
    second = _harness(profile, clone / "results", "run", "--commit", "--devices", "cpu:1")
    assert second.returncode == 0, second.stdout[-2000:] + second.stderr[-2000:]
    assert "teacher: finished, reusing" in second.stdout
    assert "gradcam_kd-s1 -> " in second.stdout and "gradcam_kd-s0 -> " not in second.stdout
    runs = clone / "results" / "smoke" / "runs"
    resolved = (runs / "gradcam_kd-s1" / "config_resolved.yaml").read_text()
    assert f"runs/teacher/{WEIGHTS_NAME}" in resolved
    status = _harness(profile, clone / "results", "status")
    assert "every run of profile 'smoke' is finished" in status.stdout, status.stdout
    assert "another configuration" not in status.stdout
    metrics = json.loads((runs / "gradcam_kd-s1" / "metrics.json").read_text())
    assert 0 <= metrics["test_error"] <= 100
    assert "gradcam_kd-s1 finished" in _git(clone, "log", "--format=%s")
