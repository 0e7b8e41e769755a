"""No lost work (issue 12): resume points survive SIGKILL / SIGINT / SIGTERM and torn writes,
corrupted checkpoints are refused, a rerun with another config is refused. No silent wrong result
(issue 18): a resumed run records every metric an uninterrupted one does, from every resume
point; a finished run is left as it is."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distill.checkpointing import ChecksummedCheckpointIO, verify_checkpoint
from distill.integrity import IntegrityError, checksum_path, sha256_file
from tests.conftest import REPO_ROOT, run_python

# 128 images - 16 for validation = 112 / batch 8 = 14 steps per epoch, 2 epochs
RUN = {
    "experiment": "smoke",
    "data.synthetic_size": 128,
    "data.val_size": 16,
    "data.synthetic_test_size": 40,
    "data.batch_size": 8,
    "model.depth": 10,
    "model.widen_factor": 1,
    "trainer.max_epochs": 2,
    "trainer.enable_progress_bar": "false",
    "print_config": "false",
    "logger": "csv",
    "deterministic": "true",
}
STEPS_PER_EPOCH, EPOCHS = 14, 2
# metrics.json keys that differ from an uninterrupted run by design; the next three name the run
BY_DESIGN = {"resumed", "resumed_from", "wall_seconds", "fidelity_seconds"}  # timings
OWN_RUN = {"checkpoint", "run_dir", "run_name", "cam_figure"}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    return {**env, "PYTHONUNBUFFERED": "1"}


def _args(log_dir: Path, name: str, **over: object) -> list[str]:
    """``train.py`` arguments: RUN with ``over`` (``__`` in a name stands for ``.``)."""
    values = {**RUN, **{k.replace("__", "."): v for k, v in over.items()}}
    return ["train.py", *(f"{k}={v}" for k, v in values.items()), f"paths.log_dir={log_dir}",
            f"run_name={name}"]  # fmt: skip


def _step(ckpt: Path) -> int:
    """global_step of a checkpoint, -1 while it does not exist or its sidecar is missing."""
    if not checksum_path(ckpt).is_file():
        return -1
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=False)["global_step"])
    except Exception:  # noqa: BLE001 - not there yet
        return -1


def _stop_when(args: list[str], ckpt: Path, min_step: int, signum: int) -> tuple[int, str]:
    """Run ``python args``; send ``signum`` once ``ckpt`` holds a step >= ``min_step``."""
    proc = subprocess.Popen(
        [sys.executable, *args], cwd=REPO_ROOT, env=_env(), text=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while _step(ckpt) < min_step:
        assert proc.poll() is None, f"run ended before the signal: {proc.stderr.read()[-2000:]}"
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return ckpt["state_dict"]


def _metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def _logged(run_dir: Path, epoch: int) -> dict[str, float]:
    """train/* and val/* logged for ``epoch`` in the run's newest CSV log."""
    newest = max((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: p.stat().st_mtime)
    with newest.open() as fh:
        rows = [r for r in csv.DictReader(fh) if r["epoch"] == str(epoch)]
    prefixes = ("train/", "val/")
    return {k: float(v) for r in rows for k, v in r.items() if k.startswith(prefixes) and v}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted deterministic run (2 epochs of 14 steps, validation after each)."""
    log_dir = tmp_path_factory.mktemp("ref")
    res = run_python(_args(log_dir, "ref"))
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = log_dir / "smoke" / "ref"
    assert _metrics(run_dir)["global_step"] == STEPS_PER_EPOCH * EPOCHS
    return run_dir


def _assert_same_metrics(metrics: dict, expected: dict, run_dir: Path) -> None:
    """Every metrics.json key as in ``expected`` (an uninterrupted run's) but those that differ
    by design; the checkpoint is the run's own."""
    assert metrics["resumed"] is True
    assert metrics.keys() == expected.keys()
    same = expected.keys() - BY_DESIGN - OWN_RUN
    assert {k: metrics[k] for k in same} == {k: expected[k] for k in same}
    assert metrics["train_error"] is not None and metrics["val_error"] is not None
    assert metrics["checkpoint"] == str(run_dir / "checkpoints" / "last.ckpt")


def _assert_same_as_reference(run_dir: Path, reference: Path) -> None:
    _assert_same_metrics(_metrics(run_dir), _metrics(reference), run_dir)
    last = EPOCHS - 1  # the epoch the run was resumed in: its train/* and val/* in the CSV log
    assert _logged(run_dir, last) == _logged(reference, last) != {}
    ours, theirs = _weights(run_dir), _weights(reference)
    assert ours.keys() == theirs.keys()
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_sigkill_mid_epoch_resumes_to_the_same_weights(tmp_path: Path, reference: Path) -> None:
    """SIGKILL in the last epoch after a step-interval resume point; the rerun resumes from it,
    at the exact batch, and ends with the uninterrupted run's weights and metrics (train_error,
    the epoch's train/* means included)."""
    args = _args(tmp_path, "k", callbacks__model_checkpoint__every_n_train_steps=4)
    ckpt = tmp_path / "smoke" / "k" / "checkpoints" / "last.ckpt"
    code, _ = _stop_when(args, ckpt, STEPS_PER_EPOCH + 4, signal.SIGKILL)
    assert code == -signal.SIGKILL
    saved = _step(ckpt)
    assert saved % STEPS_PER_EPOCH != 0 and saved < STEPS_PER_EPOCH * EPOCHS  # mid-epoch
    verify_checkpoint(ckpt, fix="")
    rerun = run_python(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resuming from {ckpt}" in rerun.stdout
    _assert_same_as_reference(tmp_path / "smoke" / "k", reference)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_a_resume_point(tmp_path: Path, reference: Path, signum, code) -> None:
    """No step interval: the only resume points are epoch ends and the one the signal writes."""
    args = _args(tmp_path, "s")
    ckpt = tmp_path / "smoke" / "s" / "checkpoints" / "last.ckpt"
    returncode, err = _stop_when(args, ckpt, STEPS_PER_EPOCH, signum)
    assert returncode == code, err[-2000:]
    assert "Rerun the same command to resume" in err and "Traceback" not in err
    stopped = int(re.search(r"global step (\d+);", err).group(1))  # type: ignore[union-attr]
    assert STEPS_PER_EPOCH <= stopped < STEPS_PER_EPOCH * EPOCHS
    assert _step(ckpt) == stopped  # no step lost (> 14: written by the signal)
    assert not (tmp_path / "smoke" / "s" / "metrics.json").exists()  # not finished
    rerun = run_python(args)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    _assert_same_as_reference(tmp_path / "smoke" / "s", reference)


@pytest.mark.slow
def test_kill_after_the_last_epoch_records_the_same_metrics(tmp_path: Path, reference) -> None:
    """Killed after the final resume point but before metrics.json (during the test): the rerun
    has no epoch left to train and still records the last epoch's train_error and val_error."""
    run_dir = tmp_path / "smoke" / "ref"
    shutil.copytree(reference, run_dir)
    (run_dir / "metrics.json").unlink()  # what a kill during the test leaves
    rerun = run_python(_args(tmp_path, "ref"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    _assert_same_metrics(_metrics(run_dir), _metrics(reference), run_dir)


_EVERY_STEP = [  # 2 steps per epoch (32 of 40 images, batch 16), a resume point after every step
    "experiment=smoke", "data.synthetic_size=40", "data.val_size=8", "data.synthetic_test_size=16",
    "data.batch_size=16", "model.depth=10", "model.widen_factor=1", "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false", "print_config=false", "logger=none", "deterministic=true",
    "callbacks.model_checkpoint.every_n_train_steps=1", "module.scheduler.milestones=[1]",
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:The dirpath has changed")
def test_every_resume_point_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch) -> None:
    """Resume from a copy of each checkpoint an uninterrupted run writes (what a kill right after
    that save leaves): same weights and metrics every time (the lr drops after epoch 0, so a
    skipped epoch end would show in the weights)."""
    from hydra import compose, initialize_config_dir

    from distill.integrity import write_checksum
    from distill.train import CONFIG_DIR, train

    def cfg(name: str):  # type: ignore[no-untyped-def]
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            return compose("train", [*_EVERY_STEP, f"paths.log_dir={tmp_path}", f"run_name={name}"])

    copies: list[Path] = []
    save = ChecksummedCheckpointIO.save_checkpoint

    def keep(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
        save(self, checkpoint, path, storage_options)
        copies.append(tmp_path / "copies" / f"{len(copies)}.ckpt")
        copies[-1].parent.mkdir(exist_ok=True)
        shutil.copy(path, copies[-1])

    monkeypatch.setattr(ChecksummedCheckpointIO, "save_checkpoint", keep)
    expected = train(cfg("ref"))
    monkeypatch.setattr(ChecksummedCheckpointIO, "save_checkpoint", save)
    for i, copy in enumerate(copies):
        run_dir = tmp_path / "smoke" / f"r{i}"
        (run_dir / "checkpoints").mkdir(parents=True)
        shutil.copy(copy, run_dir / "checkpoints" / "last.ckpt")
        write_checksum(run_dir / "checkpoints" / "last.ckpt")
        _assert_same_metrics(train(cfg(f"r{i}")), expected, run_dir)
        ours, theirs = _weights(run_dir), _weights(tmp_path / "smoke" / "ref")
        for key in theirs:
            torch.testing.assert_close(ours[key], theirs[key], rtol=0, atol=0, msg=f"{i} {key}")
    steps = [int(torch.load(c, weights_only=False)["global_step"]) for c in copies]
    assert steps == [1, 2, 3, 4]  # none on an epoch's last batch (2, 4): the epoch ends only


# ----------------------------------------------------------------------------- files

_WRITER = """
import sys, torch
from distill.checkpointing import ChecksummedCheckpointIO
io, i = ChecksummedCheckpointIO(), 0
while True:
    i += 1
    io.save_checkpoint({"i": i, "w": torch.full((2_000_000,), float(i))}, sys.argv[1])
    print(i, flush=True)
"""


def test_kill_during_checkpoint_writes_leaves_a_valid_one(tmp_path: Path) -> None:
    """SIGKILL a process that rewrites an 8 MB checkpoint in a loop, at several moments: the
    file on disk always loads and matches its checksum."""
    path = tmp_path / "last.ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-c", _WRITER, str(path)], cwd=REPO_ROOT, env=_env(), text=True,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdout is not None
    for _ in range(3):
        proc.stdout.readline()  # at least one finished write
    proc.kill()
    proc.wait()
    verify_checkpoint(path, fix="")
    state = torch.load(path, weights_only=False)
    assert bool((state["w"] == float(state["i"])).all())


def test_torn_sidecar_state_is_accepted_and_corruption_is_not(tmp_path: Path) -> None:
    """The state a kill between the two renames leaves ("<new> <old>" sidecar, old file) is a
    valid resume point; flipped bytes are not."""
    io = ChecksummedCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"v": 1}, path)
    old = sha256_file(path)
    checksum_path(path).write_text(f"{'0' * 64} {old}\n")  # new digest first, rename not done
    assert verify_checkpoint(path, fix="") == old
    assert io.load_checkpoint(path)["v"] == 1
    data = bytearray(path.read_bytes())
    data[100:110] = bytes(b ^ 0xFF for b in data[100:110])
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="last.ckpt is corrupted"):
        io.load_checkpoint(path)


@pytest.mark.slow
def test_corrupted_checkpoint_is_refused_on_resume(tmp_path: Path) -> None:
    tiny = {"data__synthetic_size": 64}
    first = run_python(_args(tmp_path, "c", **tiny, trainer__max_epochs=1))
    assert first.returncode == 0, first.stderr[-3000:]
    ckpt = tmp_path / "smoke" / "c" / "checkpoints" / "last.ckpt"
    data = bytearray(ckpt.read_bytes())
    start = len(data) // 2
    data[start : start + 4096] = bytes(b ^ 0xFF for b in data[start : start + 4096])
    ckpt.write_bytes(bytes(data))
    rerun = run_python(_args(tmp_path, "c", **tiny, trainer__max_epochs=2))
    assert rerun.returncode == 2
    assert f"{ckpt} is corrupted" in rerun.stderr and "ckpt_path=null" in rerun.stderr
    assert "Traceback" not in rerun.stderr + rerun.stdout


# ----------------------------------------------------------------------------- config drift


def _tree(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_rerun_of_a_finished_run_leaves_it_as_it_is(tmp_path: Path) -> None:
    """A run trained with test=false is finished by a rerun with test=true (its train and val
    errors kept); rerunning that finished command changes no file and prints the summary."""
    tiny = {"data__synthetic_size": 64, "trainer__max_epochs": 1}
    run_dir = tmp_path / "smoke" / "f"
    first = run_python(_args(tmp_path, "f", **tiny, test="false"))
    assert first.returncode == 0, first.stderr[-3000:]
    trained = _metrics(run_dir)
    assert trained["test_error"] is None and trained["train_error"] is not None

    tested = run_python(_args(tmp_path, "f", **tiny))  # the test the run did not record
    assert tested.returncode == 0, tested.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert metrics["test_error"] is not None and metrics["resumed"] is True
    keys = ("train_error", "val_error", "epochs", "global_step")
    assert {k: metrics[k] for k in keys} == {k: trained[k] for k in keys}

    before = _tree(run_dir)
    again = run_python(_args(tmp_path, "f", **tiny))
    assert again.returncode == 0, again.stderr[-3000:]
    assert _tree(run_dir) == before  # metrics.json, the Hydra record, logs: all as they were
    assert f"run {run_dir} is already finished" in again.stdout
    summary = f"test error: {metrics['test_error']:.2f}% | checkpoint: {metrics['checkpoint']}"
    assert again.stdout.splitlines()[-1] == summary


@pytest.mark.slow
def test_rerun_with_another_config_is_refused(tmp_path: Path) -> None:
    tiny = {"data__synthetic_size": 64}
    first = run_python(_args(tmp_path, "d", **tiny, trainer__max_epochs=1))
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "smoke" / "d"
    saved = {p: (run_dir / p).read_bytes() for p in (".hydra/config.yaml", "config_resolved.yaml")}

    changed = run_python(
        _args(tmp_path, "d", **tiny, trainer__max_epochs=1, module__optimizer__lr=0.05, seed=3)
    )
    assert changed.returncode == 2
    assert "module.optimizer.lr" in changed.stderr and "seed" in changed.stderr
    assert "run_name=" in changed.stderr and "allow_changed_config=true" in changed.stderr
    assert "Traceback" not in changed.stderr + changed.stdout
    assert {p: (run_dir / p).read_bytes() for p in saved} == saved  # the record survives
    assert not list((run_dir / ".hydra").glob("rerun-*"))  # and the refused rerun left none

    extended = run_python(_args(tmp_path, "d", **tiny, trainer__max_epochs=2))
    assert extended.returncode == 0, extended.stderr[-3000:]  # more epochs: same run
    forced = run_python(
        _args(tmp_path, "d", **tiny, trainer__max_epochs=3, module__optimizer__lr=0.05,
              allow_changed_config="true")
    )  # fmt: skip
    assert forced.returncode == 0, forced.stderr[-3000:]
    metrics = _metrics(run_dir)
    assert metrics["resumed"] and metrics["config_changes"] == ["module.optimizer.lr"]
    assert {p: (run_dir / p).read_bytes() for p in saved} == saved
    assert (run_dir / "config_resolved.changed-1.yaml").is_file()


# ----------------------------------------------------------------------------- triggers


def test_time_interval_saves_inside_epochs(tmp_path: Path, monkeypatch) -> None:
    """``every_n_minutes`` writes resume points between epoch ends (here: after every step but an
    epoch's last)."""
    from hydra import compose, initialize_config_dir

    from distill.train import CONFIG_DIR, train

    steps: list[int] = []
    save = ChecksummedCheckpointIO.save_checkpoint

    def spy(self, checkpoint, path, storage_options=None):  # type: ignore[no-untyped-def]
        steps.append(int(checkpoint["global_step"]))
        save(self, checkpoint, path, storage_options)

    monkeypatch.setattr(ChecksummedCheckpointIO, "save_checkpoint", spy)
    overrides = [f"{k}={v}" for k, v in RUN.items() if k not in ("logger", "deterministic")]
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[
            *overrides, "data.synthetic_size=48", "trainer.max_epochs=1", "logger=none",
            "callbacks.model_checkpoint.every_n_minutes=1e-9", f"paths.log_dir={tmp_path}",
        ])  # fmt: skip
    train(cfg)
    assert steps == [1, 2, 3, 4]  # after steps 1-3; step 4 ends the epoch: its epoch-end save only


def test_auto_resumes_the_newest_resume_point(tmp_path: Path) -> None:
    """``ckpt_path=auto`` takes SLURM's requeue checkpoint when it is newer than last.ckpt."""
    from distill.checkpointing import find_resume_checkpoint

    io = ChecksummedCheckpointIO()
    assert find_resume_checkpoint(tmp_path) is None
    io.save_checkpoint({"v": 1}, tmp_path / "checkpoints" / "last.ckpt")
    hpc = tmp_path / "hpc_ckpt_2.ckpt"
    io.save_checkpoint({"v": 2}, hpc)
    os.utime(tmp_path / "checkpoints" / "last.ckpt", (1, 1))
    assert find_resume_checkpoint(tmp_path) == hpc
