"""The teacher-output memo never serves a wrong value and never kills a run (issue 18): rows are
CRC-checked on read, each table's header carries the fingerprint, damaged or unwritable memos are
refused in one line, a full disk turns the memo off, and bf16 runs equal with and without it."""

from __future__ import annotations

import contextlib
import re
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.teacher import CacheError
from distill.teacher.memo import DamagedMemoError, TeacherMemo, memo_fingerprint
from distill.train import train
from tests.conftest import TINY, run_python, tiny
from tests.test_memo import _memo_hit_rates


def _run(tmp_path: Path, ckpt: Path, name: str, *extra: str, loss: str = "ce_kd") -> Path:
    """A TINY run of ``loss`` in-process; its run directory."""
    cfg = tiny(tmp_path, ckpt, f"loss={loss}", *extra)
    cfg.run_name = name
    train(cfg)
    return tmp_path / "train" / name


def _cli(
    tmp_path: Path, ckpt: Path, name: str, *extra: str, memo_root: Path | None = None
) -> subprocess.CompletedProcess:
    """A TINY ``ce_kd`` run as a user starts it: ``python train.py ...``."""
    args = [
        "train.py",
        *TINY,
        "loss=ce_kd",
        f"paths.log_dir={tmp_path}",
        f"teacher.checkpoint={ckpt}",
        f"module.memo_root={memo_root or tmp_path / 'memo'}",
        f"run_name={name}",
        *extra,
    ]
    return run_python(args)


def _error(stderr: str) -> list[str]:
    """The ``error: ...`` line of a refused run and the lines after it (its commands)."""
    lines = stderr.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert len(starts) == 1, stderr[-3000:]
    return lines[starts[0] :]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    return {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("teacher.")}


def _assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


def _memo_dir(tmp_path: Path) -> Path:
    (directory,) = (tmp_path / "memo").iterdir()
    return directory


def _other_teacher(tmp_path: Path, ckpt: Path) -> Path:
    """Another teacher (other weights, so another SHA-256)."""
    other = tmp_path / "other_teacher.ckpt"
    state = torch.load(ckpt, weights_only=False)
    state["state_dict"] = {k: v + 1 for k, v in state["state_dict"].items()}
    torch.save(state, other)
    return other


def test_damaged_logit_rows_are_recomputed_not_used(tmp_path, teacher_ckpt) -> None:
    """Reversing the class order of 10 % of the filled logit rows: those rows fail their CRC,
    are recomputed (one warning naming the table) and rewritten; the weights are those of the
    run that computed every teacher output."""
    filled_run = _run(tmp_path, teacher_ckpt, "fill")
    table = _memo_dir(tmp_path) / "logits"
    rows = np.flatnonzero(np.fromfile(f"{table}.filled", dtype=np.uint8))
    assert len(rows) == 64  # one view per image
    values = np.fromfile(f"{table}.f32", dtype=np.float32).reshape(-1, 10)
    damaged = rows[::10]
    with open(f"{table}.f32", "r+b") as fh:
        for row in damaged:
            fh.seek(int(row) * 40)
            fh.write(values[row, ::-1].tobytes())
    with pytest.warns(UserWarning, match=f"{table}: stored rows fail their checksum"):
        damaged_run = _run(tmp_path, teacher_ckpt, "damaged")
    assert _memo_hit_rates(damaged_run) == [pytest.approx(1 - len(damaged) / 64)]
    _assert_same_weights(damaged_run, filled_run)
    repaired = np.fromfile(f"{table}.f32", dtype=np.float32).reshape(-1, 10)
    np.testing.assert_array_equal(repaired[damaged], values[damaged])
    assert _memo_hit_rates(_run(tmp_path, teacher_ckpt, "repaired")) == [1.0]


def test_rows_moved_or_torn_fail_their_checksum(tmp_path: Path) -> None:
    """Two rows swapped (values and CRCs alike) and a row with a torn value are misses."""
    memo = TeacherMemo(tmp_path, memo_fingerprint("ab" * 32, "test-images", 4, 4, "32-true"))
    table = memo.table("t", 8, {"kind": "test"})
    rows = torch.tensor([3, 7, 11])
    memo.store({table: torch.arange(24).float().view(3, 8)}, rows)
    for path, width in ((table.values_path, 32), (table.crc_path, 4)):
        blob = bytearray(path.read_bytes())
        blob[3 * width : 4 * width], blob[7 * width : 8 * width] = (
            blob[7 * width : 8 * width],
            blob[3 * width : 4 * width],
        )
        path.write_bytes(bytes(blob))
    with open(table.values_path, "r+b") as fh:
        fh.seek(11 * 32 + 5)
        fh.write(b"\x7f")
    with pytest.warns(UserWarning, match="stored rows fail their checksum"):
        ok, _ = memo.read(table, rows)
    assert ok.tolist() == [False, False, False]


def test_memo_without_meta_json_refuses_another_teacher(tmp_path, teacher_ckpt) -> None:
    """meta.json lost: the tables' headers still carry the fingerprint, so the memo of one
    teacher is refused for another (not adopted); the same teacher adopts it again."""
    memo_dir = tmp_path / "shared_memo"
    _run(tmp_path, teacher_ckpt, "first", f"loss.memo_dir={memo_dir}")
    (memo_dir / "meta.json").unlink()
    before = {p.name: p.read_bytes() for p in memo_dir.iterdir()}
    other = _other_teacher(tmp_path, teacher_ckpt)
    with pytest.raises(CacheError, match="teacher_sha256") as err:
        _run(tmp_path, other, "other", f"loss.memo_dir={memo_dir}")
    assert "table logits.json" in str(err.value)
    assert {p.name: p.read_bytes() for p in memo_dir.iterdir()} == before  # left untouched
    again = _run(tmp_path, teacher_ckpt, "again", f"loss.memo_dir={memo_dir}")
    assert _memo_hit_rates(again) == [1.0]
    assert (memo_dir / "meta.json").is_file()


def _truncate(table: Path) -> None:
    path = Path(f"{table}.f32")
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, "logits.f32 has 207360 bytes, not 414720"),
        (lambda t: Path(f"{t}.filled").unlink(), "logits.filled is missing"),
        (lambda t: Path(f"{t}.json").unlink(), "logits.json is missing or unreadable"),
    ],
    ids=["values-truncated", "flags-deleted", "header-deleted"],
)
def test_damaged_table_is_refused_naming_the_command(
    tmp_path, teacher_ckpt, damage, reason
) -> None:
    """A table whose files are cut, missing or without header is refused before training; the
    command in the refusal deletes it, and the next run refills it."""
    _run(tmp_path, teacher_ckpt, "fill")
    table = _memo_dir(tmp_path) / "logits"
    damage(table)
    with pytest.raises(DamagedMemoError) as err:
        _run(tmp_path, teacher_ckpt, "refused")
    first, rm, precompute = str(err.value).splitlines()
    assert first.startswith(f"teacher memo table {table} is damaged ({reason}); ")
    assert rm.strip() == f"rm {table}.*"
    assert precompute.strip().startswith("python -m distill.precompute")
    subprocess.run(rm, shell=True, check=True)  # the named fix
    assert _memo_hit_rates(_run(tmp_path, teacher_ckpt, "rebuilt")) == [0.0]


def test_damaged_table_at_the_command_line_is_one_error_exit_2(tmp_path, teacher_ckpt) -> None:
    """``python train.py`` with a truncated ``logits.f32`` (once ``ValueError: mmap length``)."""
    _run(tmp_path, teacher_ckpt, "fill")
    table = _memo_dir(tmp_path) / "logits"
    _truncate(table)
    res = _cli(tmp_path, teacher_ckpt, "refused")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    first, rm, precompute = _error(res.stderr)
    assert first.startswith(f"error: teacher memo table {table} is damaged (logits.f32 has ")
    assert rm.strip() == f"rm {table}.*" and "distill.precompute" in precompute


@contextlib.contextmanager
def _tmpfs(where: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at ``where`` (skips the test where mounting is not permitted)."""
    where.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", options, f"memo-test-{uuid.uuid4().hex[:8]}", where]
    try:
        subprocess.run(mount, check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"cannot mount a tmpfs here ({err})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", where], check=False)


def test_full_tmpfs_turns_the_memo_off_and_training_finishes(tmp_path, teacher_ckpt) -> None:
    """A memo on a tmpfs with a few free pages: the first rows fit, the rest do not. Reading a
    hole of a sparse file through ``mmap`` took a page there and died with SIGBUS (rc 135); now
    one warning and the run finishes. The precompute stops with one line instead of claiming a
    full memo."""
    with _tmpfs(tmp_path / "full", "size=64k") as root:
        (root / "filler").write_bytes(b"\0" * 48 * 1024)
        res = _cli(tmp_path, teacher_ckpt, "full", "data.synthetic_size=256", memo_root=root / "m")
        assert res.returncode == 0, res.stderr[-3000:]
        assert res.stderr.count("No space left on device") == 1, res.stderr[-3000:]
        assert (tmp_path / "train" / "full" / "metrics.json").is_file()
        pre = run_python(
            ["-m", "distill.precompute", *TINY, "loss=ce_kd", f"teacher.checkpoint={teacher_ckpt}",
             f"module.memo_root={root}/m", "data.synthetic_size=256",
             f"hydra.run.dir={tmp_path}/pre"]
        )  # fmt: skip
    assert pre.returncode == 2, pre.stderr[-3000:]
    assert "Traceback" not in pre.stderr and "teacher memo ready" not in pre.stdout
    (line,) = _error(pre.stderr)
    assert "could not be written" in line and "run this command again" in line


def test_memo_on_a_disk_without_room_for_its_description_is_off(tmp_path, teacher_ckpt) -> None:
    """Not even ``meta.json`` fits: the memo is off with one warning, the run finishes."""
    with _tmpfs(tmp_path / "full", "size=64k") as root:
        with contextlib.suppress(OSError):
            (root / "filler").write_bytes(b"\0" * 64 * 1024)
        with pytest.warns(UserWarning, match="teacher memo off: cannot write .*No space left"):
            run = _run(tmp_path, teacher_ckpt, "full", f"module.memo_root={root}/m")
    assert _memo_hit_rates(run) == [] and (run / "metrics.json").is_file()


def test_read_only_memo_root_is_one_line(tmp_path, teacher_ckpt) -> None:
    with _tmpfs(tmp_path / "ro", "ro,size=64k") as root:
        res = _cli(tmp_path, teacher_ckpt, "ro", memo_root=root / "memo")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    (line,) = _error(res.stderr)
    assert re.fullmatch(
        rf"error: teacher memo {root}/memo/[0-9a-f]{{16}} cannot be written \(Read-only file "
        r"system\): set module.memo_root to a writable directory, or run without the memo "
        r"\(loss.teacher_memo=false\)",
        line,
    ), line


def test_unreadable_table_mid_run_turns_the_memo_off(tmp_path: Path) -> None:
    """A table file deleted under a running process: one warning, then misses (computed)."""
    memo = TeacherMemo(tmp_path, memo_fingerprint("ab" * 32, "test-images", 4, 4, "32-true"))
    table = memo.table("t", 8, {"kind": "test"})
    rows = torch.tensor([1, 2])
    memo.store({table: torch.ones(2, 8)}, rows)
    assert memo.read(table, rows)[0].all()
    table.flags_path.unlink()
    with pytest.warns(UserWarning, match="cannot read table t"):
        ok, _ = memo.read(table, rows)
    assert not ok.any() and not memo.writable
    assert not memo.read(table, rows)[0].any()  # no second warning (pytest would not fail it)


def test_bf16_runs_with_and_without_the_memo_are_identical(tmp_path, teacher_ckpt) -> None:
    """The memo stores the teacher's outputs as float32; the online path hands the losses the
    same float32 values, so a run without the memo, one filling it and one reading it train the
    same weights (under bf16 the online path used to keep bf16 logits)."""
    common = {"loss": "gradcam_kd"}
    on = "trainer.precision=bf16-mixed"  # the CPU default where bf16 is native
    online = _run(tmp_path, teacher_ckpt, "online", on, "loss.teacher_memo=false", **common)
    filling = _run(tmp_path, teacher_ckpt, "filling", on, **common)
    reading = _run(tmp_path, teacher_ckpt, "reading", on, **common)
    assert _memo_hit_rates(filling) == [0.0] and _memo_hit_rates(reading) == [1.0]
    _assert_same_weights(filling, online)
    _assert_same_weights(reading, online)
