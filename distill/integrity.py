"""File integrity: SHA-256 sidecars and atomic writes.

A file ``X`` that must not be silently corrupted (checkpoints, cache shards) gets a sidecar
``X.sha256`` holding its hex digest. Writers call :func:`atomic_write` (temporary file in the same
directory, ``fsync``, ``os.replace``) so a kill during the write leaves the previous version
intact, then :func:`write_checksum`; readers call :func:`verify_checksum` before loading.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

__all__ = [
    "IntegrityError",
    "atomic_write",
    "checksum_path",
    "sha256_file",
    "verify_checksum",
    "write_checksum",
]

_CHUNK = 1 << 20


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_MODE = 0o666 & ~_umask()  # what open() would create; mkstemp's files are 0600


class IntegrityError(RuntimeError):
    """A file does not match its recorded checksum (or the checksum is missing)."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def checksum_path(path: str | Path) -> Path:
    """The sidecar of ``path``: ``<path>.sha256``."""
    path = Path(path)
    return path.with_name(path.name + ".sha256")


def atomic_write(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write(fh)`` on a temporary file beside ``path``, fsync it, then rename it over
    ``path``: readers see the old file or the new one, never a torn one. The file gets the
    permissions of an ordinary ``open()`` (``0666`` less the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), _MODE)
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_checksum(path: str | Path, digest: str | None = None) -> str:
    """Write ``<path>.sha256`` (atomically) and return the digest (``digest``, when the caller
    already hashed the bytes it wrote, else the file's)."""
    digest = digest or sha256_file(path)
    atomic_write(checksum_path(path), lambda fh: fh.write(f"{digest}\n".encode()))
    return digest


def verify_checksum(path: str | Path, *, required: bool = True, fix: str = "") -> str | None:
    """Check ``path`` against its sidecar; return the digest.

    Raises :class:`IntegrityError` (naming the path and ``fix``) on a mismatch, or when the sidecar
    is missing and ``required``; returns ``None`` for a missing sidecar otherwise.
    """
    path = Path(path)
    side = checksum_path(path)
    hint = f"; {fix}" if fix else ""
    if not side.is_file():
        if required:
            raise IntegrityError(f"{path} has no checksum file {side.name}{hint}")
        return None
    expected = side.read_text().strip().split()[0] if side.read_text().strip() else ""
    actual = sha256_file(path)
    if actual != expected:
        raise IntegrityError(f"{path} is corrupted: its SHA-256 does not match {side.name}{hint}")
    return actual
