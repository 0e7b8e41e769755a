"""What ``python train.py`` shows a user: our lines instead of Lightning's eval-mode warning and
tips, the overrides instead of the whole config, the loss terms in the progress bar, the same
messages in ``train.log``, what was optimized in ``metrics.json``, a resume command that works."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from tests.conftest import TINY, run_python

NOISE = ("eval mode at the start", "eval mode when", "Tip:", "litlogger", "TPU available", "v_num")


@pytest.mark.slow
def test_student_run_console_metrics_and_printed_resume_command(
    tmp_path: Path, teacher_ckpt: Path
) -> None:
    tiny = [o for o in TINY if o not in ("trainer.enable_progress_bar=false", "print_config=false")]
    args = [
        "train.py", *tiny, "loss=gradcam", "loss.alpha=0.5", f"teacher.checkpoint={teacher_ckpt}",
        f"paths.log_dir={tmp_path}", f"module.memo_root={tmp_path}/memo",
    ]  # fmt: skip
    proc = run_python(args)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert re.search(r"^teacher frozen in eval mode: [1-9]\d* modules$", proc.stdout, re.M)
    assert not [n for n in NOISE if n in out], out[-3000:]
    assert f"overrides: {' '.join(args[1:])}" in proc.stdout
    assert "_target_" not in out  # the config is not printed by default
    bar = [ln for ln in re.split(r"[\r\n]", out) if ln.startswith("Epoch 0: 100%")][-1]
    assert all(f"{term}=" in bar for term in ("ce", "cam", "map_agreement", "train/err")), bar

    run_dir = next((tmp_path / "train").iterdir())
    log = (run_dir / "train.log").read_text()
    assert "teacher frozen in eval mode" in log and "test error:" in log and "overrides:" in log
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (metrics["loss_preset"], metrics["cam_method"], metrics["alpha"]) == (
        "gradcam", "gradcam", 0.5,
    )  # fmt: skip
    assert metrics["loss_weights"] == {"ce": 1.0, "cam": 0.5}

    # the printed resume command finds this run; print_config=true shows the whole config
    line = next(ln for ln in proc.stdout.splitlines() if "resume or extend it with:" in ln)
    command = shlex.split(line.split("resume or extend it with: ")[1])
    assert command[:2] == ["python", "train.py"] and f"run_name={run_dir.name}" in command
    again = run_python([*command[1:], "print_config=true"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"run {run_dir} is already finished" in again.stdout
    assert "_target_" in again.stdout
