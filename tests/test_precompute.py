"""``python -m distill.precompute`` as a user runs it: short errors, repair of corrupted shards."""

from __future__ import annotations

from pathlib import Path

import torch

from distill.teacher.cache import MapCache
from tests.conftest import run_python


def precompute(teacher: Path, *extra: str):
    args = [
        "-m",
        "distill.precompute",
        "loss=gradcam",
        "loss.teacher_maps=cache",  # the offline cache (an online preset fills the memo)
        "data=synthetic",
        "data.synthetic_size=40",
        "data.synthetic_test_size=10",
        "teacher.model.depth=10",
        f"teacher.checkpoint={teacher}",
        *extra,
    ]
    return run_python(args, timeout=300)


def test_empty_data_root_is_one_message(tmp_path: Path, teacher_ckpt: Path) -> None:
    proc = precompute(teacher_ckpt, "data=cifar10_folder", f"data.root={tmp_path}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: CIFAR-10 not found at '{tmp_path}'")


def test_corrupted_shard_is_recomputed_before_ready(tmp_path: Path, teacher_ckpt: Path) -> None:
    where = [f"loss.cache_dir={tmp_path / 'maps'}", f"hydra.run.dir={tmp_path / 'out'}"]
    first = precompute(teacher_ckpt, *where)
    assert first.returncode == 0, first.stderr[-2000:]
    (shard,) = (tmp_path / "maps").glob("shard_*.pt")
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    again = precompute(teacher_ckpt, *where)
    assert again.returncode == 0 and "is corrupted (checksum mismatch): computing it again" in (
        again.stderr
    )
    assert "teacher maps ready" in again.stdout and shard.read_bytes() != bytes(blob)


def test_cache_dir_of_another_configuration_names_the_fix(
    tmp_path: Path, teacher_ckpt: Path
) -> None:
    """The fix command printed by training repeats loss.cache_dir; run against a directory that
    holds another configuration's maps, precompute leaves them untouched and says in one line to
    drop or change the option."""
    maps = tmp_path / "maps"
    images, labels = torch.zeros(40, 3, 32, 32), torch.arange(40) % 10
    MapCache(maps, {"method": "gradcam", "teacher_sha256": "other"}, 40).build(
        lambda x, y: x.mean(1)[:, ::4, ::4], images, labels, progress=False
    )
    before = {p.name: p.read_bytes() for p in maps.iterdir()}
    proc = precompute(teacher_ckpt, f"loss.cache_dir={maps}", f"hydra.run.dir={tmp_path / 'o'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    message = proc.stderr.strip()
    assert "\n" not in message and message.startswith(f"error: loss.cache_dir={maps} holds")
    assert "Rerun without loss.cache_dir" in message and "teacher_sha256" in message
    assert {p.name: p.read_bytes() for p in maps.iterdir()} == before
