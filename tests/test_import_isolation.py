"""``import cams`` needs torch only: it must not pull in distill, Lightning, Hydra or wandb."""

from __future__ import annotations

from tests.conftest import run_python

FORBIDDEN = ("distill", "pytorch_lightning", "lightning", "lightning_fabric", "hydra", "wandb")

PROBE = f"""
import sys
import cams
bad = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r})
print(",".join(bad))
"""


def test_import_cams_pulls_in_no_training_stack() -> None:
    res = run_python(["-c", PROBE])
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.strip() == "", f"import cams imported: {res.stdout.strip()}"
