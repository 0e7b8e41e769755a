"""The missing-teacher message a newcomer meets after a short teacher run: the command that
trains the wanted teacher echoes the student's own data overrides, and the finished teacher runs
for the same data are listed with the override that selects each (``teacher.epochs=1``)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import TINY, run_python

FAST = ["trainer.enable_progress_bar=false", "logger=none", "callbacks=none", "trainer=cpu"]


@pytest.mark.slow
def test_missing_teacher_lists_same_data_runs_and_echoes_data_overrides(tmp_path: Path) -> None:
    data = [o for o in TINY if o.startswith("data")]
    student = [
        "train.py", *TINY, "loss=gradcam", f"paths.log_dir={tmp_path}",
        f"module.memo_root={tmp_path}/memo", "teacher.model.widen_factor=1",
    ]  # fmt: skip
    first = run_python(student)
    assert first.returncode == 2, first.stderr[-3000:]
    assert "no trained teacher found" in first.stderr and "Trained teachers" not in first.stderr
    command = re.search(r"^    (python train.py experiment=teacher.*)$", first.stderr, re.M)
    assert command is not None, first.stderr
    args = shlex.split(command[1])
    tail = [f"paths.log_dir={tmp_path}", "model.widen_factor=1"]  # in the student's order
    assert args[3:] == [*data, "model.depth=10", *tail]

    # the suggested command, shortened to 1 epoch: the README's quick teacher
    teacher = run_python([*args[1:], "trainer.max_epochs=1", *FAST])
    assert teacher.returncode == 0, teacher.stderr[-3000:]
    [run] = (tmp_path / "teacher").iterdir()
    assert "-e1-" in run.name

    second = run_python(student)
    assert second.returncode == 2
    assert "Trained teachers for the same data" in second.stderr
    assert re.search(rf"^    teacher\.epochs=1    \({re.escape(str(run))}\)$", second.stderr, re.M)
    other_data = run_python([*student, "data.synthetic_size=96"])  # other data: not listed
    assert other_data.returncode == 2 and "Trained teachers" not in other_data.stderr

    chosen = run_python([*student, "teacher.epochs=1", "test=false"])
    assert chosen.returncode == 0, chosen.stderr[-3000:]
