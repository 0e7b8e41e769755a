"""The teacher-output memo: exact teacher logits and maps per (image, augmentation view) on disk.

The teacher is frozen and in eval mode, and the training augmentation (reflect-pad ``pad``, crop
back to 32x32, horizontal flip) has a finite set of views per image: ``(2 * pad + 1)^2`` crop
offsets times 2 flips = 162 for ``pad = 4``. The teacher's logits and its CAM of the true class
are therefore a deterministic function of (dataset identity, image index, view). The memo stores
exactly that, filled lazily by whichever run first meets a view, and shared by every run with the
same teacher: the cells of a seed and the points of an alpha sweep see the same (index, view)
stream (the data order depends only on the seed) and pay for the teacher once.

Layout of one memo directory (``<memo_root>/<fingerprint hash[:16]>`` or ``loss.memo_dir``)::

    meta.json              fingerprint: teacher SHA-256, dataset identity and size, view policy,
                           precision of the teacher computation, format version
    write.lock             flock taken by writers (creation and every batch of new entries)
    <table>.json           what the table holds (logits, or one CAM method's maps + options)
    <table>.f32            float32 (num_images * num_views, size) values, a sparse file
    <table>.filled         uint8 (num_images * num_views,) 1 = the row holds a finished value

Writers take ``write.lock``, skip rows another process filled meanwhile, ``pwrite`` the values,
``fdatasync`` them and only then set the rows' ``filled`` bytes: a killed writer or a full disk
(``ENOSPC`` from ``pwrite``, reported once, then the memo stops writing) leaves no row marked
filled that is not. Readers take no lock: a row is read only once its flag is set. DDP ranks and
parallel harness jobs share a memo this way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.data.augment import AugParams
from distill.integrity import atomic_write
from distill.teacher.cache import EXECUTION_OPTIONS, CacheError, fingerprint_hash

__all__ = [
    "EXECUTION_OPTIONS",
    "FORMAT_VERSION",
    "ForeignMemoError",
    "MemoTable",
    "TeacherMemo",
    "memo_fingerprint",
    "num_views",
    "view_ids",
    "view_params",
]

FORMAT_VERSION = 1
META = "meta.json"
LOCK = "write.lock"


class ForeignMemoError(CacheError):
    """The memo directory was built for another teacher, dataset, precision or view policy."""

    def __init__(self, message: str, diff: str) -> None:
        super().__init__(message)
        self.diff = diff


def num_views(pad: int) -> int:
    """Views per image of "reflect-pad ``pad``, crop, flip": ``(2 pad + 1)^2 * 2``."""
    return (2 * pad + 1) ** 2 * 2


def view_ids(aug: AugParams | None, batch_size: int, pad: int) -> Tensor:
    """long (B,): the view of each sample, ``(dy * (2 pad + 1) + dx) * 2 + flip``; ``aug=None``
    (no augmentation) is the centre crop without flip."""
    if aug is None:
        aug = AugParams.identity(batch_size, pad)
    if aug.pad != pad:
        raise ValueError(f"augmentation pads {aug.pad} pixels, the memo {pad}")
    side = 2 * pad + 1
    return (aug.dy.long() * side + aug.dx.long()) * 2 + aug.flip.long()


def view_params(views: Tensor, pad: int) -> AugParams:
    """The crop/flip of each view number in ``views`` (inverse of :func:`view_ids`)."""
    side = 2 * pad + 1
    offset, flip = views.long() // 2, views.long() % 2
    return AugParams(offset // side, offset % side, flip.bool(), pad)


def memo_fingerprint(
    teacher_sha256: str, dataset_id: str, num_images: int, pad: int, precision: str
) -> dict[str, Any]:
    """Everything a memo entry depends on besides the table's own method and options."""
    return {
        "format": FORMAT_VERSION,
        "teacher_sha256": teacher_sha256,
        "dataset_id": dataset_id,
        "num_images": int(num_images),
        "views": {"pad": int(pad), "crop": 32, "flip": True, "count": num_views(pad)},
        "precision": precision,
    }


def _diff(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    keys = sorted(set(expected) | set(found))
    return "; ".join(
        f"{k}: memo={found.get(k)!r} vs run={expected.get(k)!r}"
        for k in keys
        if expected.get(k) != found.get(k)
    )


def _write_json(path: Path, obj: Any) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write(path, lambda fh: fh.write(text.encode()))


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass(eq=False)  # hashable by identity: tables key a dict in store()
class MemoTable:
    """One table of a memo: ``size`` float32 values per (image, view) row."""

    directory: Path
    name: str
    rows: int
    size: int

    @property
    def values_path(self) -> Path:
        return self.directory / f"{self.name}.f32"

    @property
    def flags_path(self) -> Path:
        return self.directory / f"{self.name}.filled"

    def create(self, description: Mapping[str, Any]) -> None:
        """Create the (sparse) files and the description; the caller holds the write lock."""
        if (self.directory / f"{self.name}.json").exists():
            return
        for path, nbytes in (
            (self.values_path, self.rows * self.size * 4),
            (self.flags_path, self.rows),
        ):
            with open(path, "wb") as fh:
                fh.truncate(nbytes)
        _write_json(self.directory / f"{self.name}.json", {**description, "size": self.size})

    def filled(self, rows: Tensor) -> Tensor:
        """bool (n,): which ``rows`` hold a finished value."""
        flags = np.memmap(self.flags_path, dtype=np.uint8, mode="r", shape=(self.rows,))
        return torch.from_numpy(flags[rows.cpu().numpy()] == 1)

    def read(self, rows: Tensor) -> Tensor:
        """float32 (n, size): the values of ``rows`` (filled ones; see :meth:`filled`)."""
        values = np.memmap(
            self.values_path, dtype=np.float32, mode="r", shape=(self.rows, self.size)
        )
        return torch.from_numpy(np.array(values[rows.cpu().numpy()]))

    def write(self, rows: Tensor, values: Tensor) -> int:
        """Store ``values`` (n, size) at ``rows`` not filled yet; the caller holds the write lock.
        Values first (flushed to disk), flags last. Returns how many rows were written."""
        rows_np = rows.cpu().numpy()
        todo = np.flatnonzero(self.filled(rows).numpy() == 0)
        if len(todo) == 0:
            return 0
        data = values.detach().float().cpu().contiguous().numpy()
        written: list[int] = []
        vfd = os.open(self.values_path, os.O_WRONLY)
        try:
            for i in todo:
                os.pwrite(vfd, data[i].tobytes(), int(rows_np[i]) * self.size * 4)
                written.append(int(rows_np[i]))
            os.fdatasync(vfd)
        finally:
            os.close(vfd)
            self._set_flags(written)  # only rows whose values were written (also on ENOSPC)
        return len(written)

    def _set_flags(self, rows: list[int]) -> None:
        if not rows:
            return
        ffd = os.open(self.flags_path, os.O_WRONLY)
        try:
            for row in rows:
                os.pwrite(ffd, b"\x01", row)
        finally:
            os.close(ffd)


class TeacherMemo:
    """A memo directory bound to one fingerprint: a ``logits`` table and one table per map
    method (``maps-<method key>``), created on first use.

    Args:
        directory: the memo directory.
        fingerprint: :func:`memo_fingerprint` of the run.
        rebuild_hint: appended to the refusal of a directory built for another fingerprint.
    """

    def __init__(
        self, directory: str | Path, fingerprint: Mapping[str, Any], rebuild_hint: str = ""
    ) -> None:
        self.directory = Path(directory)
        self.fingerprint = dict(fingerprint)
        self.rows = int(fingerprint["num_images"]) * int(fingerprint["views"]["count"])
        self.pad = int(fingerprint["views"]["pad"])
        self.rebuild_hint = rebuild_hint
        self.writable = True
        self._tables: dict[str, MemoTable] = {}
        self._open()

    @property
    def key(self) -> str:
        return fingerprint_hash(self.fingerprint)

    @staticmethod
    def key_of(data: Mapping[str, Any]) -> str:
        """Stable hash of a JSON-serializable description."""
        return fingerprint_hash(data)

    def _open(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        with _locked(self.directory / LOCK):
            meta = self.directory / META
            if meta.exists():
                found = json.loads(meta.read_text())
                if found != self.fingerprint:
                    diff = _diff(self.fingerprint, found)
                    raise ForeignMemoError(
                        f"teacher memo {self.directory} was built for another configuration "
                        f"({diff}). {self.rebuild_hint}".rstrip(),
                        diff,
                    )
            else:
                _write_json(meta, self.fingerprint)

    def table(self, name: str, size: int, description: Mapping[str, Any]) -> MemoTable:
        """The table ``name`` (created when missing); a table of another size is refused."""
        if name in self._tables:
            return self._tables[name]
        table = MemoTable(self.directory, name, self.rows, size)
        desc_path = self.directory / f"{name}.json"
        with _locked(self.directory / LOCK):
            if desc_path.exists():
                found = json.loads(desc_path.read_text())
                expected = {**description, "size": size}
                if found != json.loads(json.dumps(expected, default=str)):
                    raise ForeignMemoError(
                        f"teacher memo table {desc_path} holds {found}, not {expected}. "
                        f"{self.rebuild_hint}".rstrip(),
                        _diff(expected, found),
                    )
            else:
                table.create(description)
        self._tables[name] = table
        return table

    def rows_of(self, index: Tensor, views: Tensor) -> Tensor:
        """Row of each (image index, view) pair."""
        n_views = num_views(self.pad)
        return index.long().cpu() * n_views + views.long().cpu()

    def store(self, tables: Mapping[MemoTable, Tensor], rows: Tensor) -> None:
        """Write new rows into several tables under one lock; a write error (full disk, ...) is
        reported once and turns writing off (reads still work)."""
        if not self.writable or len(rows) == 0:
            return
        try:
            with _locked(self.directory / LOCK):
                for table, values in tables.items():
                    table.write(rows, values)
        except OSError as err:
            self.writable = False
            warnings.warn(
                f"teacher memo {self.directory}: cannot write ({err.strerror or err}); this run "
                "goes on computing the teacher for views not in the memo",
                stacklevel=2,
            )

    def coverage(self, table: MemoTable) -> float:
        """Fraction of all (image, view) rows the table holds."""
        flags = np.memmap(table.flags_path, dtype=np.uint8, mode="r", shape=(self.rows,))
        return float(np.count_nonzero(flags)) / self.rows
