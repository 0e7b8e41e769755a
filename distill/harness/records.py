"""Commit as you go (``run --commit``): each finished run's records, and the teacher's weights,
go into git as soon as they exist, so that a restart of the machine (which keeps only committed
files) costs at most the runs in progress.

* :func:`export_teacher_weights` writes ``<teacher run>/teacher_weights.pt``: the ``net.*``
  tensors of ``checkpoints/last.ckpt`` (no optimizer state; WRN-40-2: 9 MB in float32, the exact
  weights) with a ``.sha256`` sidecar. :func:`teacher_checkpoint` makes the students use it when
  ``last.ckpt`` is gone.
* :class:`GitRecorder` commits a run directory without its ``checkpoints/`` (``*.ckpt`` is
  ignored anyway), the teacher's weights, and the report's files, each as one commit of only
  those paths (``git commit -- PATHS``: whatever else is staged stays staged). A failed commit is
  a warning, never a failed run.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from distill.integrity import atomic_write, write_checksum

WEIGHTS_NAME = "teacher_weights.pt"
CHECKPOINT = Path("checkpoints") / "last.ckpt"

__all__ = ["WEIGHTS_NAME", "GitRecorder", "export_teacher_weights", "teacher_checkpoint"]


def teacher_checkpoint(teacher_dir: Path, prefix: str) -> str:
    """The student's ``teacher.checkpoint``, spelled under ``prefix`` (the results root as
    ``train.py`` sees it): ``last.ckpt`` while it exists, else the committed weights."""
    use_weights = not (teacher_dir / CHECKPOINT).exists() and (teacher_dir / WEIGHTS_NAME).exists()
    return f"{prefix}/runs/teacher/{WEIGHTS_NAME if use_weights else CHECKPOINT.as_posix()}"


def export_teacher_weights(teacher_dir: Path) -> Path | None:
    """Write ``teacher_weights.pt`` (``net.*`` tensors and the architecture) from the finished
    teacher's verified ``last.ckpt``; None when there is no checkpoint. Kept when present."""
    import torch

    from distill.teacher.loading import teacher_digest

    out, ckpt = teacher_dir / WEIGHTS_NAME, teacher_dir / CHECKPOINT
    if out.exists() or not ckpt.exists():
        return out if out.exists() else None
    digest = teacher_digest(ckpt)
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    weights = {k: v for k, v in state["state_dict"].items() if k.startswith("net.")}
    payload = {
        "state_dict": weights,
        "hyper_parameters": {"arch": state.get("hyper_parameters", {}).get("arch")},
        "source": {"checkpoint": CHECKPOINT.as_posix(), "sha256": digest},
    }
    atomic_write(out, lambda fh: torch.save(payload, fh))
    write_checksum(out)
    return out


# run subfolders left out of commits: checkpoints (restart from teacher weights) and figures
_NOT_COMMITTED = ("checkpoints", "cam_grids")


def _warn(message: str) -> None:
    print(f"warning: --commit: {message}", file=sys.stderr, flush=True)


class GitRecorder:
    """Commits paths under ``out`` to the git repository that holds it (disabled: does nothing)."""

    def __init__(self, out: Path, enabled: bool = True, retries: int = 5) -> None:
        self.out, self.retries, self.root = out, retries, None
        if enabled:
            self.root = self._repo_root(out)

    @staticmethod
    def _repo_root(out: Path) -> Path | None:
        out.mkdir(parents=True, exist_ok=True)
        proc = _git(out, "rev-parse", "--show-toplevel")
        if proc.returncode:
            _warn(f"{out} is not inside a git repository: nothing will be committed")
            return None
        return Path(proc.stdout.strip())

    def commit_run(self, name: str, run_dir: Path) -> bool:
        """The run's records (config, metrics, logs, teacher weights), not its checkpoints nor
        its CAM figures (``cam_grids/``, about 1 MB a picture; the report draws ``explain.png``)."""
        keep = [str(run_dir), *(f":(exclude){run_dir / d}" for d in _NOT_COMMITTED)]
        return self.commit(keep, f"results: {self.out.name} {name} finished")

    def commit_results(self, message: str) -> bool:
        """Everything under the results folder (report, finished runs' records) but checkpoints,
        figures and the runs that did not finish (no ``metrics.json``: a failed or interrupted
        run's partial logs would read as a record in a fresh clone)."""
        skip = [f":(exclude){self.out}/runs/*/{d}/*" for d in _NOT_COMMITTED]
        runs = self.out / "runs"
        unfinished = [
            f":(exclude){run}"
            for run in sorted(runs.iterdir() if runs.is_dir() else [])
            if run.is_dir() and not (run / "metrics.json").exists()
        ]
        return self.commit([str(self.out), *skip, *unfinished], message)

    def commit(self, pathspec: Sequence[str], message: str) -> bool:
        """``git add`` then ``git commit -- pathspec``; True when a commit was made."""
        if self.root is None:
            return False
        if (added := self._git_retry("add", "--", *pathspec)).returncode:
            _warn(f"git add failed: {added.stderr.strip()[:300]}")
            return False
        staged = _git(self.root, "diff", "--cached", "--quiet", "--", *pathspec)
        if staged.returncode == 0:
            return False  # nothing new
        done = self._git_retry("commit", "-q", "-m", message, "--", *pathspec)
        if done.returncode:
            _warn(f"git commit failed: {(done.stderr or done.stdout).strip()[:300]}")
            return False
        return True

    def _git_retry(self, *args: str) -> subprocess.CompletedProcess:
        """Retry while another git command holds the index lock."""
        assert self.root is not None
        for attempt in range(self.retries):
            proc = _git(self.root, *args)
            if proc.returncode == 0 or "index.lock" not in proc.stderr:
                return proc
            time.sleep(0.5 * (attempt + 1))
        return proc


def _git(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
