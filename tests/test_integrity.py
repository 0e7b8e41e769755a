"""distill.integrity: atomic writes with ordinary permissions, checksum sidecars."""

from __future__ import annotations

import os

import pytest

from distill.integrity import IntegrityError, atomic_write, verify_checksum, write_checksum


def test_atomic_write_keeps_the_umask_permissions_and_leaves_no_temporary(tmp_path):
    mask = os.umask(0o022)
    try:
        path = tmp_path / "metrics.json"
        atomic_write(path, lambda fh: fh.write(b"{}"))
        assert path.stat().st_mode & 0o777 == 0o644  # mkstemp alone would give 0600
        assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
    finally:
        os.umask(mask)


def test_failed_write_keeps_the_previous_file(tmp_path):
    path = tmp_path / "a.bin"
    atomic_write(path, lambda fh: fh.write(b"old"))

    def broken(fh):
        fh.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, broken)
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_checksum_sidecar_detects_a_changed_byte(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"hello world")
    digest = write_checksum(path)
    assert verify_checksum(path) == digest
    path.write_bytes(b"hello worle")
    with pytest.raises(IntegrityError, match="corrupted.*delete it"):
        verify_checksum(path, fix="delete it")
    (tmp_path / "a.bin.sha256").unlink()
    assert verify_checksum(path, required=False) is None
    with pytest.raises(IntegrityError, match="no checksum file"):
        verify_checksum(path)
