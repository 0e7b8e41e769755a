"""One source of truth: the cams registry, the loss presets and the table cells agree."""

from __future__ import annotations

import pytest

import cams
from distill.objectives import BUILT_IN, OBJECTIVES, active_objectives
from distill.presets import baseline_presets, loss_presets, table_methods
from tests.conftest import compose_cfg


def test_every_registered_method_has_both_presets_and_a_table_row():
    assert table_methods() == ["ce", *cams.METHODS]
    table = {f"{m}{kd}" for m in table_methods() for kd in ("", "_kd")}
    assert table | set(baseline_presets()) == set(loss_presets())
    assert not table & set(baseline_presets())


def test_every_registered_objective_has_a_preset():
    assert set(BUILT_IN) <= set(OBJECTIVES)
    baselines = {p.removesuffix("_kd") for p in baseline_presets()}
    assert baselines == set(OBJECTIVES) - set(BUILT_IN)


def test_every_preset_names_a_registered_method_or_objective():
    for preset in loss_presets():
        loss = compose_cfg(f"loss={preset}").loss
        assert loss.name == preset
        base = preset.removesuffix("_kd")
        assert loss.method == (base if base in cams.METHODS else None)
        assert loss.kd.enabled == preset.endswith("_kd")
        names = [o.name for o in active_objectives(loss)]
        extra = [] if base in ("ce", *cams.METHODS) else [base]
        expected = ["ce", *(["kd"] if loss.kd.enabled else []), *(["cam"] if loss.method else [])]
        assert names == expected + extra


def test_registry_builds_by_name_and_refuses_foreign_options():
    from tests.cams._models import Tiny

    for name, cls in cams.METHODS.items():
        cam = cams.build(name, Tiny(), "conv", **cls.quick_options)
        assert isinstance(cam, cls) and cls.method_name == name
        assert "utility" in cams.method_options(name)
    with pytest.raises(
        ValueError,
        match="'layercam' takes no option 'n_permutations'; its options: utility, relu, fast_path",
    ):
        cams.build("layercam", Tiny(), "conv", n_permutations=3)


def test_harness_cells_follow_the_registry():
    from distill.harness.profiles import Profile, table_cells

    cells = table_cells()
    assert cells == [m + kd for m in ["ce", *cams.METHODS] for kd in ("", "_kd")]
    assert {"layercam", "layercam_kd"} <= set(cells)
    smoke = Profile.load("smoke")  # every table cell, then its baseline cells
    assert smoke.baselines == ["dkd"] and smoke.cells == [*cells, *smoke.baselines]
