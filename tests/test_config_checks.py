"""Start-up refusals (issue 12): option domains, refused combinations, unreadable teachers, and
the teacher's data identity and checksum."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from distill.config_checks import config_diff
from distill.integrity import sha256_file, write_checksum
from distill.loss_config import cam_options
from distill.train import CONFIG_DIR, USER_ERRORS, train
from tests.conftest import run_python

TINY = {
    "data": "synthetic",
    "data.synthetic_size": 64,
    "data.synthetic_test_size": 32,
    "data.batch_size": 32,
    "trainer": "cpu",
    "trainer.max_epochs": 1,
    "logger": "none",
    "callbacks": "none",
    "trainer.enable_progress_bar": "false",
    "print_config": "false",
    "model.depth": 10,
    "model.widen_factor": 1,
    "teacher.model.depth": 10,
    "loss.agreement_batches": 1,
}


def tiny(tmp_path: Path, *extra: str, teacher: Path | str | None = None) -> DictConfig:
    """A seconds-scale config; ``extra`` overrides replace TINY's values for the same key."""
    keys = {e.split("=", 1)[0].lstrip("+") for e in extra}
    base = [f"{k}={v}" for k, v in TINY.items() if k not in keys]
    where = [f"paths.log_dir={tmp_path}"]
    if teacher is not None:
        where.append(f"teacher.checkpoint={teacher}")
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[*base, *extra, *where])


def refused(cfg: DictConfig, match: str) -> str:
    """Run ``train(cfg)``; it must stop at start-up with a one-line user error matching."""
    with pytest.raises(USER_ERRORS, match=match) as info:
        train(cfg)
    message = str(info.value)
    assert "\n" not in message, message
    return message


BAD_OPTIONS = [
    (["loss=ce_kd", "loss.kd.beta=2"], r"loss\.kd\.beta must be a number in \[0, 1\]"),
    (["loss=ce_kd", "loss.kd.temperature=0"], r"loss\.kd\.temperature must be a number > 0"),
    (["trainer.max_epochs=-1"], r"trainer\.max_epochs must be an integer >= 1, got -1"),
    (["data.batch_size=0"], r"data\.batch_size must be an integer >= 1, got 0"),
    (["data.batch_size=-5"], r"data\.batch_size must be an integer >= 1, got -5"),
    (["data.batch_size=2.5"], r"data\.batch_size must be an integer"),
    (["loss=gradcam", "module.compile=true"], r"module\.compile=true .*module\.compile=false"),
]


@pytest.mark.parametrize(("overrides", "match"), BAD_OPTIONS)
def test_bad_option_is_refused_naming_the_key(tmp_path, teacher_ckpt, overrides, match) -> None:
    refused(tiny(tmp_path, *overrides, teacher=teacher_ckpt), match)
    assert not list(tmp_path.rglob("metrics.json"))


SCHEMA_REFUSALS = [  # refused by Hydra at composition, against distill.loss_config.LossConfig
    ("loss.alpha=abc", "Value 'abc' of type 'str' could not be converted to Float", "loss.alpha"),
    ("loss.kd.temperature=hot", "could not be converted to Float", "loss.kd.temperature"),
    ("loss.fresh_orderings=maybe", "Value 'maybe' is not a valid bool", "loss.fresh_orderings"),
    ("loss.alpah=1", "Key 'alpah' not in 'LossConfig'", "loss.alpah"),
    ("loss.kd.enabld=true", "Key 'enabld' not in 'KDConfig'", "loss.kd.enabld"),
]


@pytest.mark.parametrize(("override", "cause", "key"), SCHEMA_REFUSALS)
def test_loss_schema_refuses_typos_and_wrong_types(tmp_path, override, cause, key) -> None:
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=key.replace(".", r"\.")) as info:
        tiny(tmp_path, "loss=gradcam_kd", override)
    assert cause in str(info.value.__cause__) and f"full_key: {key}" in str(info.value.__cause__)


def test_cli_schema_error_names_the_key(tmp_path) -> None:
    res = run_python(["train.py", "loss=gradcam", "loss.alpha=abc", f"paths.log_dir={tmp_path}"])
    assert res.returncode == 1 and "full_key: loss.alpha" in res.stderr
    assert "could not be converted to Float" in res.stderr


def test_loss_defaults_live_in_the_schema() -> None:
    """ce.yaml lists no loss key but ``name``: every default comes from LossConfig."""
    from dataclasses import asdict

    from distill.loss_config import LossConfig

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        composed = OmegaConf.to_container(compose("train", overrides=["loss=ce"]).loss)
    assert composed == asdict(LossConfig())
    ce_yaml = OmegaConf.load(Path(CONFIG_DIR) / "loss" / "ce.yaml")
    assert set(ce_yaml) == {"defaults", "name"}


def test_fc_cam_layers_are_refused_before_training(tmp_path, teacher_ckpt) -> None:
    cfg = tiny(tmp_path, "loss=gradcam", "loss.student_layer=fc", "loss.teacher_layer=fc",
               teacher=teacher_ckpt)  # fmt: skip
    refused(cfg, r"loss\.student_layer=fc outputs shape \(2, 10\), not spatial maps.*block3")


def test_option_a_method_does_not_take_lists_the_ones_it_takes(tmp_path, teacher_ckpt) -> None:
    cfg = tiny(tmp_path, "loss=gradcam", "++loss.cam.n_permutations=5", teacher=teacher_ckpt)
    message = refused(cfg, r"GradCAM \(loss\.method=gradcam\) takes no option n_permutations")
    assert message.endswith("it takes: " + ", ".join(cam_options("gradcam")))
    assert cam_options("gradcam") == ["utility", "relu", "variant", "fast_path"]  # signature


@pytest.mark.parametrize("kind", ["text", "empty", "directory"])
def test_unreadable_teacher_checkpoint_is_one_message(tmp_path, kind) -> None:
    path = tmp_path / "teacher.ckpt"
    if kind == "directory":
        path.mkdir()
    else:
        path.write_text("not a checkpoint\n" if kind == "text" else "")
    what = {"text": "not a readable checkpoint", "empty": "empty file", "directory": "directory"}
    cfg = tiny(tmp_path, "loss=ce_kd", teacher=path)
    refused(cfg, f"{path} .*{what[kind]}.*teacher.checkpoint")


def test_cli_bad_option_exits_2_without_traceback(tmp_path) -> None:
    res = run_python(
        ["train.py", "data=synthetic", "data.batch_size=0", f"paths.log_dir={tmp_path}"]
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: data.batch_size must be")
    assert "Traceback" not in res.stderr + res.stdout


# ----------------------------------------------------------------------------- teacher identity


def test_teacher_lookup_includes_the_data_identity() -> None:
    def names(*overrides: str) -> tuple[str, str]:
        with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
            student = compose("train", overrides=["loss=ce_kd", *overrides])
            teacher = compose("train", overrides=["experiment=teacher", *overrides])
        return student.teacher.run_name, teacher.run_name

    base = names("data=synthetic")
    assert base[0] == base[1]  # the student finds what `experiment=teacher` writes
    for other in ("data.synthetic_size=999", "data.synthetic_seed=1", "data.val_size=100",
                  "data.train_subset=500", "data.split_seed=2"):  # fmt: skip
        changed = names("data=synthetic", other)
        assert changed[0] == changed[1] and changed[0] != base[0], other
    roots = {names("data=cifar10_folder", f"data.root=/data/{r}")[0] for r in ("a", "b")}
    assert len(roots) == 2


def test_student_records_teacher_path_and_checksum(tmp_path, teacher_ckpt) -> None:
    metrics = train(tiny(tmp_path, "loss=ce_kd", "run_name=s", teacher=teacher_ckpt))
    digest = sha256_file(teacher_ckpt)
    assert metrics["teacher_checkpoint"] == str(teacher_ckpt)
    assert metrics["teacher_sha256"] == digest
    saved = OmegaConf.load(tmp_path / "train" / "s" / "config_resolved.yaml")
    assert saved.teacher.sha256 == digest and saved.teacher.resolved_checkpoint == str(teacher_ckpt)


def test_corrupted_teacher_is_refused(tmp_path, teacher_ckpt) -> None:
    path = tmp_path / "teacher.ckpt"
    data = bytearray(teacher_ckpt.read_bytes())
    path.write_bytes(bytes(data))
    write_checksum(path)
    data[-5000:-904] = bytes(b ^ 0xFF for b in data[-5000:-904])  # 4 KiB flipped
    path.write_bytes(bytes(data))
    refused(tiny(tmp_path, "loss=ce_kd", teacher=path), f"{path} is corrupted")


def test_teacher_trained_on_other_data_is_refused(tmp_path, teacher_ckpt) -> None:
    cfg = tiny(tmp_path, "loss=ce_kd", "teacher.epochs=1")
    run_dir = Path(cfg.teacher.run_dir)
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "last.ckpt").write_bytes(teacher_ckpt.read_bytes())
    (run_dir / "metrics.json").write_text(json.dumps({"dataset_id": "synthetic:n=999"}))
    refused(cfg, "was trained on dataset synthetic:n=999, this run uses synthetic:n=64")


def test_config_diff_ignores_location_and_length() -> None:
    saved = {"run_name": "a", "paths": {"log_dir": "/x"}, "trainer": {"max_epochs": 1},
             "loss": {"alpha": 1.0}, "teacher": {"sha256": "aa"}}  # fmt: skip
    new = {"run_name": "b", "paths": {"log_dir": "/y"}, "trainer": {"max_epochs": 9},
           "loss": {"alpha": 0.5}, "teacher": {"sha256": "bb"}}  # fmt: skip
    assert config_diff(saved, new) == ["loss.alpha", "teacher.sha256"]


# ----------------------------------------------------------------------------- nothing left behind

CLI = ["train.py", *(f"{k}={v}" for k, v in TINY.items())]


def _no_traceback_one_error(res, *words: str) -> str:  # type: ignore[no-untyped-def]
    """The last stderr line of a refused ``train.py``: ``error: ...`` holding ``words``."""
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr + res.stdout
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and all(w in line for w in words), line
    return line


@pytest.mark.slow
def test_refused_start_up_leaves_nothing_behind(tmp_path) -> None:
    """A start-up refused for wrong data writes no run directory, config or Hydra record, so the
    corrected command starts clean instead of being refused as a "changed config"."""
    log_dir = tmp_path / "runs"
    args = [*CLI, f"paths.log_dir={log_dir}", "run_name=r"]
    wrong = run_python([*args, "data.source=folder", f"data.root={tmp_path / 'nope'}"])
    assert wrong.returncode == 2 and "error: CIFAR-10 not found" in wrong.stderr
    assert "Traceback" not in wrong.stderr + wrong.stdout
    assert not log_dir.exists()  # no run directory, no .hydra/, no config_resolved.yaml
    fixed = run_python(args)
    assert fixed.returncode == 0, fixed.stderr[-3000:]
    run_dir = log_dir / "train" / "r"
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "config_resolved.yaml").is_file() and (run_dir / "metrics.json").is_file()


def test_refused_train_call_writes_nothing(tmp_path) -> None:
    """The same through ``train(cfg)``: nothing under paths.log_dir."""
    from distill.data import DataError

    with pytest.raises(DataError, match="CIFAR-10 not found"):
        train(tiny(tmp_path, "data.source=folder", f"data.root={tmp_path / 'nope'}"))
    assert list(tmp_path.iterdir()) == []


@pytest.fixture
def read_only(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Factory: ``read_only(folder=None)`` mounts ``folder`` (None: an empty tmpfs) read-only at a
    new path under tmp_path and returns it; unmounted after the test. Skips where mounting is not
    permitted (root ignores file modes, so a read-only mount is the only honest simulation)."""
    import subprocess

    mounted: list[Path] = []

    def mount(folder: Path | None = None) -> Path:
        target = tmp_path / f"ro{len(mounted)}"
        target.mkdir()
        cmd = ["mount", "-t", "tmpfs", "-o", "ro", "tmpfs", str(target)]
        if folder is not None:
            cmd = ["mount", "--bind", "-o", "ro", str(folder), str(target)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            pytest.skip(f"cannot mount a read-only folder here: {res.stderr.strip()}")
        mounted.append(target)
        return target

    yield mount
    for target in reversed(mounted):
        subprocess.run(["umount", str(target)], check=False)


def test_read_only_log_dir_is_one_line_error(tmp_path, read_only) -> None:
    """paths.log_dir on a read-only file system: ``error: ...`` naming paths.log_dir, exit 2,
    from the CLI (before Hydra creates the run directory) and from ``train(cfg)``."""
    log_dir = read_only() / "runs"
    res = run_python([*CLI, f"paths.log_dir={log_dir}"])
    _no_traceback_one_error(res, str(log_dir), "Read-only file system", "paths.log_dir=")
    refused(tiny(log_dir), r"cannot write the run directory .*Read-only file system")


@pytest.mark.slow
def test_read_only_cache_dir_is_one_line_error(tmp_path, read_only, image_folder) -> None:
    """data.cache_dir on a read-only file system: refused (naming data.cache_dir) when the cache
    has to be built, used as it is when it holds a valid one."""
    args = [*CLI, "data.source=folder", f"data.root={image_folder()}", "data.batch_size=8",
            f"paths.log_dir={tmp_path / 'runs'}"]  # fmt: skip
    res = run_python([*args, f"data.cache_dir={read_only()}", "run_name=a"])
    _no_traceback_one_error(res, "decoded-image cache", "Read-only file system", "data.cache_dir=")
    assert not (tmp_path / "runs").exists()
    cache = tmp_path / "cache"
    built = run_python([*args, f"data.cache_dir={cache}", "run_name=b"])
    assert built.returncode == 0 and list(cache.glob("*.pt")), built.stderr[-3000:]
    reused = run_python([*args, f"data.cache_dir={read_only(cache)}", "run_name=c"])
    assert reused.returncode == 0, reused.stderr[-3000:]
