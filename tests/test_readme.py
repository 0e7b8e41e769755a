"""Every shell command of README.md is run by a test as a user meets it.

The commands are the lines of the README's ```` ```sh ```` blocks. Each is either run here, as a
subprocess, with the few overrides that keep it to seconds (``SHRINK``: a tiny image folder or
synthetic data, a tiny teacher, output under tmp_path), or mapped in ``ELSEWHERE`` to the test
that already runs it. A README command in neither fails ``test_every_readme_command_is_tested``,
so a new command cannot land untested.
"""

from __future__ import annotations

import importlib
import json
import re
import shlex
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import REPO_ROOT, TINY, run_python, write_image_folder

README = REPO_ROOT / "README.md"

QUICK_START = (
    "python train.py experiment=teacher data=cifar10_folder data.train_subset=2000 "
    "trainer.max_epochs=1",
    "python train.py loss=gradcam_kd data=cifar10_folder data.train_subset=2000 teacher.epochs=1 "
    "trainer.max_epochs=1 run_name=quickstart",
    "python -m distill.explain runs/train/quickstart --out explain.png",
)
COMPOSITION = {  # command -> the loss terms its run logs (train/<term>)
    "python train.py loss=shapleycam loss.dkd.enabled=true": {"ce", "cam", "tckd", "nckd"},
    "python train.py loss=dkd loss.method=gradcam loss.alpha=1": {"ce", "cam", "tckd", "nckd"},
    "python train.py loss=at_kd loss.catkd.enabled=true loss.dkd.beta=8": {
        "ce",
        "kd",
        "at",
        "catkd",
    },
}
# commands too long for a unit test: the test that runs the same code path on smaller data
ELSEWHERE = {
    'pip install -e ".[dev]"': ".ci/run (a fresh virtual environment)",
    "pytest": ".ci/run",
    # the same Hydra multirun over loss.alpha (2 values, Grad-CAM): 4 ShapleyCAM jobs cost ~75 s
    "python train.py -m loss=shapleycam_kd loss.alpha=0.001,0.01,0.1,1": (
        "tests.test_sweeps::test_alpha_multirun_writes_one_result_per_job"
    ),
    "python -m distill.harness run --profile cpu-mini": (
        "tests.test_harness::test_smoke_profile_runs_the_whole_harness"
    ),
    "python -m distill.harness report --profile cpu-mini": (
        "tests.test_harness::test_smoke_profile_runs_the_whole_harness"
    ),
    # CIFAR-100 pairs (240 epochs on a GPU): composed, their teacher command checked, a step
    # of a pair trained, and the harness's dry run and cost on a two-pair profile
    "python train.py experiment=teacher data=cifar100 recipe=cifar100 model=resnet56": (
        "tests.test_pairs::test_the_printed_teacher_command_trains_the_teacher_the_student_looks_for"
    ),
    "python train.py experiment=c100/resnet56-resnet20 loss=dkd": (
        "tests.test_pairs::test_every_pair_composes_with_the_recipe_and_aligns_its_cam_maps"
    ),
    "python -m distill.harness run --profile cifar100 --dry-run": (
        "tests.test_pairs::test_dry_run_and_status_iterate_over_the_pairs"
    ),
    "python -m distill.harness cost --profile cifar100": (
        "tests.test_pairs::test_cost_scales_each_pair_by_forward_flops"
    ),
}
# a README page link that another branch creates (the lead removes it when merging docs/harness.md)
PENDING_LINKS: set[str] = set()  # links to pages not written yet

# the quick start on a 40-image folder: a 20-image subset, small batches, no progress bar
SHRINK = {"data.train_subset=2000": "data.train_subset=20"}
QUICK_EXTRA = ["data.batch_size=10", "trainer.enable_progress_bar=false", "logger=csv"]


def readme_commands() -> list[str]:
    """The lines of the README's ```sh blocks (comments and blank lines dropped)."""
    blocks = re.findall(r"^```sh\n(.*?)^```", README.read_text(), flags=re.S | re.M)
    lines = (line.split(" #")[0].strip() for block in blocks for line in block.splitlines())
    return [line for line in lines if line]


def python_args(command: str, *extra: str) -> list[str]:
    """``python X ...`` as arguments for :func:`run_python`: train.py from the repository,
    ``SHRINK`` substitutions, then ``extra`` (train.py and sweeps only)."""
    words = [SHRINK.get(w, w) for w in shlex.split(command)]
    assert words[0] == "python", command
    if words[1] == "train.py":
        return [str(REPO_ROOT / "train.py"), *words[2:], *extra]
    return words[1:]


def test_every_readme_command_is_tested() -> None:
    indented = re.findall(r"^ {4,}(?:python|pip|pytest)\b.*", README.read_text(), flags=re.M)
    assert indented == [], "put README commands in ```sh blocks, where this test finds them"
    commands = readme_commands()
    tested = set(QUICK_START) | set(COMPOSITION) | set(ELSEWHERE)
    assert [c for c in commands if c not in tested] == [], "README commands without a test"
    assert sorted(tested - set(commands)) == [], "tested commands no longer in the README"
    for target in ELSEWHERE.values():
        if "::" in target:
            module, name = target.split("::")
            assert callable(getattr(importlib.import_module(module), name, None)), target


def test_readme_links_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README.read_text())
    missing = [x for x in links if not (REPO_ROOT / x).exists() and x not in PENDING_LINKS]
    assert missing == []


@pytest.mark.slow
def test_quick_start_ends_with_the_cam_figure(tmp_path: Path) -> None:
    """The three quick-start commands, in order, from a fresh working directory whose
    ``paths.root_dir`` is tmp_path (so ``runs/train/quickstart`` is where the README says)."""
    folder = write_image_folder(tmp_path / "cifar", per_class=(4, 2))
    extra = [f"paths.root_dir={tmp_path}", f"data.root={folder}", *QUICK_EXTRA]
    for command in QUICK_START:
        proc = run_python(python_args(command, *extra), cwd=tmp_path)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    run = tmp_path / "runs" / "train" / "quickstart"
    figure = run / "cam_grids" / "epoch_000.png"
    assert str(figure.relative_to(tmp_path)) in README.read_text()  # the path the README names
    assert json.loads((run / "metrics.json").read_text())["cam_figure"].endswith(
        "cam_grids/epoch_000.png"
    )
    assert Image.open(figure).size[0] >= 800
    assert Image.open(tmp_path / "explain.png").size[0] >= 800


@pytest.mark.slow
@pytest.mark.parametrize("command", COMPOSITION)
def test_composition_commands_train(command: str, tmp_path: Path, teacher_ckpt: Path) -> None:
    """Each command, run as a new process, on TINY synthetic data with the WRN-10-2 teacher of
    conftest; the terms of the composed objectives are all logged."""
    extra = [*TINY, f"paths.root_dir={tmp_path}", f"teacher.checkpoint={teacher_ckpt}"]
    proc = run_python(python_args(command, *extra), cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (result,) = (tmp_path / "runs" / "train").glob("*/metrics.json")
    assert 0 <= json.loads(result.read_text())["test_error"] <= 100
    (log,) = result.parent.glob("csv/*/metrics.csv")
    columns = log.read_text().splitlines()[0].split(",")
    terms = {c.removeprefix("train/") for c in columns if c.startswith("train/")}
    assert terms - {"loss", "err", "map_agreement"} == COMPOSITION[command]
