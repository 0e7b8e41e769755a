"""The baselines' teacher outputs (logits, AT's attention maps, CAT-KD's pooled CAMs) go through the
teacher-output memo like the logits and CAM maps: fingerprinted tables, filled once (by training
or ``python -m distill.precompute``) and read by every later run; the cost model knows them."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from distill import harness
from distill.harness.profiles import Profile
from distill.teacher.memo import ForeignMemoError
from distill.train import train
from tests.conftest import student, tiny


class Data:
    """The datamodule facts the memo reads."""

    dataset_id, num_train_total, view_pad = "objectives-memo", 6, 4


def _memo_hit_rates(run_dir: Path) -> list[float]:
    with open(next(run_dir.glob("csv/**/metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    return [float(r["teacher/memo_hit_rate"]) for r in rows if r.get("teacher/memo_hit_rate")]


@pytest.mark.slow
def test_baselines_of_a_seed_pay_for_the_teacher_once(tmp_path, teacher_ckpt):
    """Same seed, one run after another (as the harness trains a seed's cells): the first run
    that reads a teacher output fills its table, the later ones hit it on every sample."""
    presets = ["ce_kd", "dkd", "at", "at_kd", "catkd"]
    for preset in presets:
        cfg = tiny(tmp_path, teacher_ckpt, f"loss={preset}")
        cfg.run_name = preset
        train(cfg)
    rates = {p: _memo_hit_rates(tmp_path / "train" / p) for p in presets}
    assert rates == {"ce_kd": [0.0], "dkd": [1.0], "at": [0.0], "at_kd": [1.0], "catkd": [0.0]}
    (memo_dir,) = (tmp_path / "memo").iterdir()
    tables = sorted(p.stem for p in memo_dir.glob("*.json") if p.name != "meta.json")
    assert [t.split("-")[0] for t in tables] == ["at", "catkd", "logits"]


def test_precompute_fills_every_baseline_output_and_training_hits_it(tmp_path, teacher_ckpt):
    from distill.precompute import precompute

    cfg = tiny(
        tmp_path, teacher_ckpt, "loss=at_kd", "loss.catkd.enabled=true", "data.synthetic_size=10"
    )
    memo_dir = Path(precompute(cfg))
    filled = {
        name.removesuffix(".filled").split("-")[0]: (memo_dir / name).read_bytes()
        for name in os.listdir(memo_dir)
        if name.endswith(".filled")
    }
    assert set(filled) == {"logits", "at", "catkd"}
    assert all(sum(flags[: 10 * 162]) == 10 * 162 for flags in filled.values())
    described = json.loads(next(memo_dir.glob("at-*.json")).read_text())
    assert described.pop("memo") == json.loads((memo_dir / "meta.json").read_text())
    assert described == {
        "kind": "at",
        "layers": ["block1", "block2", "block3"],
        "sizes": [[32, 32], [16, 16], [8, 8]],
        "p": 2.0,
        "size": 32 * 32 + 16 * 16 + 8 * 8,
    }
    train(cfg)
    assert _memo_hit_rates(next((tmp_path / "train").iterdir())) == [1.0]


def _table_names(tmp_path, teacher_ckpt, *overrides: str) -> set[str]:
    module = student(tiny(tmp_path, teacher_ckpt, *overrides))
    module.teacher.enable_memo(Data(), "32-true")
    batch = {"image": torch.randn(2, 3, 32, 32), "label": torch.tensor([1, 2])}
    module.teacher.collect({**batch, "index": torch.tensor([0, 1])}, module.teacher.needs)
    return {table.name for table in module.teacher._memo_tables.values()}


def test_teacher_output_tables_are_fingerprinted_by_their_settings(tmp_path, teacher_ckpt):
    at = _table_names(tmp_path, teacher_ckpt, "loss=at")
    at_p4 = _table_names(tmp_path, teacher_ckpt, "loss=at", "loss.at.p=4")
    at_layers = _table_names(
        tmp_path, teacher_ckpt, "loss=at", "loss.at.teacher_layers=[block2,block3,block3]"
    )
    at_weight = _table_names(tmp_path, teacher_ckpt, "loss=at", "loss.at.weight=1")
    assert len({frozenset(at), frozenset(at_p4), frozenset(at_layers)}) == 3
    assert at_weight == at  # the weight does not change what the teacher gives
    cat = _table_names(tmp_path, teacher_ckpt, "loss=catkd")
    cat_4 = _table_names(tmp_path, teacher_ckpt, "loss=catkd", "loss.catkd.resolution=4")
    assert cat != cat_4 and "logits" in cat & cat_4
    # a table file that says it holds something else is refused, never read
    (memo_dir,) = (tmp_path / "memo").iterdir()
    (table,) = [
        p for p in memo_dir.glob("catkd-*.json") if json.loads(p.read_text())["resolution"] == 2
    ]
    table.write_text(json.dumps({**json.loads(table.read_text()), "resolution": 3}))
    with pytest.raises(ForeignMemoError, match="holds"):
        _table_names(tmp_path, teacher_ckpt, "loss=catkd")


def test_cost_model_knows_the_baseline_cells(tmp_path):
    """ce_kd fills the logits, which dkd then reads for free; AT and CAT-KD fill their own
    tables, which at_kd reads."""
    from distill.harness.cost_model import miss_fraction

    cells = ["ce_kd", "dkd", "at", "at_kd", "catkd"]
    profile_path = tmp_path / "baselines.yaml"
    profile_path.write_text(
        "defaults:\n  - harness_profile\n  - _self_\nname: baselines\nseeds: [0]\n"
        f"cells: [{', '.join(cells)}]\n"
    )
    profile = Profile.load(str(profile_path))
    assert profile.cells == cells
    hit = dict.fromkeys(["teacher", *cells], 0.5)
    online = {**hit, **dict.fromkeys(cells, 0.9)}
    path = tmp_path / "steps.json"
    path.write_text(json.dumps({"batch": 64, "step_s": hit, "step_s_online": online}))
    table = harness.cost(profile, path)
    lines = [line for line in table.splitlines()[4:] if line.startswith("| ")]
    rows = {line.split("|")[1].strip(): line.split("|") for line in lines}
    epochs = int(rows["dkd"][3])
    first = miss_fraction(0, epochs)
    assert rows["dkd"][6].strip() == rows["at_kd"][6].strip() == "100 %"
    for cell in ("ce_kd", "at", "catkd"):
        assert float(rows[cell][5]) == pytest.approx(first * 0.9 + (1 - first) * 0.5, abs=1e-3)
