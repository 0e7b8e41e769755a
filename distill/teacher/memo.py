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
    <table>.json           the table's header: the fingerprint again (``memo``), what the table
                           holds (logits, or one CAM method's maps + options) and ``size``
    <table>.f32            float32 (num_images * num_views, size) values, a sparse file
    <table>.crc32          uint32 little-endian (num_images * num_views,): CRC-32 of each row's
                           number (int64 LE) followed by its values' bytes, a sparse file
    <table>.filled         uint8 (num_images * num_views,) 1 = the row holds a finished value

Integrity. Every row read is checked against its CRC-32 before use; a filled row that fails it
(damaged on disk, torn by a kill during a repair) is never used: it counts as a miss, is
recomputed and rewritten, and the run warns once naming the table. Each table's header carries
the fingerprint, so a lost or foreign ``meta.json`` never makes another teacher's values look like
this one's: the memo is refused. A table whose files are missing or of the wrong size, or whose
data has no header, is refused with the command that deletes it (it then refills).

Writers take ``write.lock``, skip rows that verify (another process filled them meanwhile),
``pwrite`` values and CRCs, ``fdatasync`` them and only then set the rows' ``filled`` bytes: a
killed writer or a full disk (``ENOSPC``, reported once, then the memo stops writing) leaves no row
marked filled that is not. Readers take no lock and use ``pread`` only, never ``mmap``: a hole of
a sparse file reads as zeros without taking space, so a full disk (tmpfs included) cannot kill the
process with ``SIGBUS``, and a file truncated under a reader gives a short read (a miss). DDP
ranks and parallel harness jobs share a memo this way.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import warnings
import zlib
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
    "FULL_DISK",
    "DamagedMemoError",
    "ForeignMemoError",
    "MemoTable",
    "TeacherMemo",
    "memo_fingerprint",
    "num_views",
    "row_crc",
    "view_ids",
    "view_params",
]

FORMAT_VERSION = 2  # 2: per-row CRC-32 (<table>.crc32), the fingerprint in each table's header
META = "meta.json"
LOCK = "write.lock"
FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
"""``OSError.errno`` values of a full disk / quota / file-size limit (the memo turns off)."""


class ForeignMemoError(CacheError):
    """The memo directory was built for another teacher, dataset, precision or view policy."""

    def __init__(self, message: str, diff: str) -> None:
        super().__init__(message)
        self.diff = diff


class DamagedMemoError(CacheError):
    """A memo table's files are missing, of the wrong size, or have no header."""


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


def row_crc(row: int, data: bytes) -> bytes:
    """The 4 stored bytes of a row: CRC-32 (little-endian) of ``row`` as int64 LE, then ``data``
    (the row number is included so that a row moved to another place fails too)."""
    return zlib.crc32(data, zlib.crc32(row.to_bytes(8, "little"))).to_bytes(4, "little")


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


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; None when it is missing or not JSON."""
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _opened(paths: tuple[Path, ...], flags: int) -> Iterator[list[int]]:
    fds: list[int] = []
    try:
        for path in paths:
            fds.append(os.open(path, flags))
        yield fds
    finally:
        for fd in fds:
            os.close(fd)


@dataclass(eq=False)  # hashable by identity: tables key a dict in store()
class MemoTable:
    """One table of a memo: ``size`` float32 values per (image, view) row, each with a CRC-32.

    ``verify=False`` skips the CRC check on read (benchmarks only: the overhead measurement)."""

    directory: Path
    name: str
    rows: int
    size: int
    verify: bool = True

    @property
    def values_path(self) -> Path:
        return self.directory / f"{self.name}.f32"

    @property
    def crc_path(self) -> Path:
        return self.directory / f"{self.name}.crc32"

    @property
    def flags_path(self) -> Path:
        return self.directory / f"{self.name}.filled"

    @property
    def header_path(self) -> Path:
        return self.directory / f"{self.name}.json"

    def files(self) -> dict[Path, int]:
        """Each data file and its size in bytes."""
        return {
            self.values_path: self.rows * self.size * 4,
            self.crc_path: self.rows * 4,
            self.flags_path: self.rows,
        }

    def damage(self) -> str | None:
        """What is wrong with the data files (None: all there, of the right sizes)."""
        for path, nbytes in self.files().items():
            try:
                found = path.stat().st_size
            except FileNotFoundError:
                return f"{path.name} is missing"
            if found != nbytes:
                return f"{path.name} has {found} bytes, not {nbytes}"
        return None

    def holds_rows(self) -> bool:
        """Whether any row is marked filled (a missing flags file holds none)."""
        try:
            with open(self.flags_path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    if any(chunk):
                        return True
        except FileNotFoundError:
            pass
        return False

    def create(self, header: Mapping[str, Any]) -> None:
        """Create the (sparse) data files, then the header; the caller holds the write lock."""
        for path, nbytes in self.files().items():
            with open(path, "wb") as fh:
                fh.truncate(nbytes)
        _write_json(self.header_path, header)

    def read(self, rows: Tensor) -> tuple[Tensor, Tensor, int]:
        """``(ok, values, damaged)``: bool (n,) which ``rows`` hold a finished value that passes
        its CRC; float32 (n, size) their values (zeros elsewhere); how many rows were marked
        filled but failed the CRC (or were cut short)."""
        n, nbytes = len(rows), self.size * 4
        ok = torch.zeros(n, dtype=torch.bool)
        buf = bytearray(n * nbytes)
        damaged = 0
        with _opened((self.flags_path, self.values_path, self.crc_path), os.O_RDONLY) as fds:
            ffd, vfd, cfd = fds
            for i, row in enumerate(rows.tolist()):
                if os.pread(ffd, 1, row) != b"\x01":
                    continue
                data = os.pread(vfd, nbytes, row * nbytes)
                if self.verify and (
                    len(data) != nbytes or os.pread(cfd, 4, row * 4) != row_crc(row, data)
                ):
                    damaged += 1
                    continue
                buf[i * nbytes : i * nbytes + len(data)] = data
                ok[i] = True
        values = torch.frombuffer(buf, dtype=torch.float32) if n else torch.empty(0)
        return ok, values.view(n, self.size), damaged

    def write(self, rows: Tensor, values: Tensor) -> int:
        """Store ``values`` (n, size) at ``rows`` that do not verify yet; the caller holds the
        write lock. Values and CRCs first (flushed to disk), flags last. Returns how many rows
        were written; an ``OSError`` (full disk) is raised after flagging the rows written."""
        ok, _, _ = self.read(rows)
        todo = (~ok).nonzero().squeeze(1).tolist()
        if not todo:
            return 0
        data = values.detach().float().cpu().contiguous().numpy()
        rows_l, nbytes = rows.tolist(), self.size * 4
        written: list[int] = []
        error: OSError | None = None
        with _opened((self.values_path, self.crc_path, self.flags_path), os.O_WRONLY) as fds:
            vfd, cfd, ffd = fds
            try:
                for i in todo:
                    row, raw = rows_l[i], data[i].tobytes()
                    os.pwrite(vfd, raw, row * nbytes)
                    os.pwrite(cfd, row_crc(row, raw), row * 4)
                    written.append(row)
            except OSError as err:
                error = err
            if written:
                os.fdatasync(vfd)  # a failure here flags nothing
                os.fdatasync(cfd)
                for row in written:
                    os.pwrite(ffd, b"\x01", row)
        if error is not None:
            raise error
        return len(written)


class TeacherMemo:
    """A memo directory bound to one fingerprint: a ``logits`` table and one table per map
    method (``maps-<method key>``), created on first use.

    Args:
        directory: the memo directory.
        fingerprint: :func:`memo_fingerprint` of the run.
        rebuild_hint: appended to the refusal of a directory built for another fingerprint.
        fill_hint: the command that refills a table (named in the refusal of a damaged one).
        verify: check each row's CRC-32 on read (``False``: benchmarks only).

    An ``OSError`` while creating the directory or a table (read-only file system, full disk)
    propagates; :class:`~distill.teacher.Teacher` turns it into a refusal or a warning.
    """

    def __init__(
        self,
        directory: str | Path,
        fingerprint: Mapping[str, Any],
        rebuild_hint: str = "",
        fill_hint: str = "",
        verify: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self.fingerprint = dict(fingerprint)
        self.rows = int(fingerprint["num_images"]) * int(fingerprint["views"]["count"])
        self.pad = int(fingerprint["views"]["pad"])
        self.rebuild_hint, self.fill_hint, self.verify = rebuild_hint, fill_hint, verify
        self.writable = self.readable = True
        self._tables: dict[str, MemoTable] = {}
        self._warned: set[str] = set()
        self._open()

    @property
    def key(self) -> str:
        return fingerprint_hash(self.fingerprint)

    @staticmethod
    def key_of(data: Mapping[str, Any]) -> str:
        """Stable hash of a JSON-serializable description."""
        return fingerprint_hash(data)

    def set_verify(self, on: bool) -> None:
        """Check rows' CRCs on read (the default) or not (benchmarks: the check's overhead)."""
        self.verify = on
        for table in self._tables.values():
            table.verify = on

    def _foreign(self, what: str, found: Mapping[str, Any]) -> ForeignMemoError:
        diff = _diff(self.fingerprint, found)
        return ForeignMemoError(
            f"teacher memo {what} was built for another configuration ({diff}). "
            f"{self.rebuild_hint}".rstrip(),
            diff,
        )

    def _open(self) -> None:
        """Check (or write) ``meta.json``; without it, the tables' headers decide: a table of
        another fingerprint (or an older format without one) refuses the memo."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with _locked(self.directory / LOCK):
            meta = self.directory / META
            found = _read_json(meta)
            if found is not None:
                if found != self.fingerprint:
                    raise self._foreign(str(self.directory), found)
                return
            for header in sorted(self.directory.glob("*.json")):
                if header.name == META or header.name.startswith("."):
                    continue
                memo = (_read_json(header) or {}).get("memo", {"format": "1 or unknown"})
                if memo != self.fingerprint:
                    raise self._foreign(f"{self.directory} (table {header.name})", memo)
            _write_json(meta, self.fingerprint)

    def _damaged(self, table: MemoTable, what: str) -> DamagedMemoError:
        path = self.directory / table.name
        ahead = ", or ahead of it with the second command" if self.fill_hint else ""
        fill = f"\n    {self.fill_hint}" if self.fill_hint else ""
        return DamagedMemoError(
            f"teacher memo table {path} is damaged ({what}); nothing was read from it. Delete it "
            f"and rerun (it refills during training{ahead}):\n    rm {path}.*{fill}"
        )

    def table(self, name: str, size: int, description: Mapping[str, Any]) -> MemoTable:
        """The table ``name``, created when it has neither header nor filled rows; refused when
        it holds another fingerprint, description or size, or its files are damaged."""
        if name in self._tables:
            return self._tables[name]
        table = MemoTable(self.directory, name, self.rows, size, self.verify)
        expected = json.loads(
            json.dumps({**description, "size": size, "memo": self.fingerprint}, default=str)
        )
        with _locked(self.directory / LOCK):
            found = _read_json(table.header_path)
            if found is None:
                if table.header_path.exists() or table.holds_rows():
                    raise self._damaged(table, f"{table.header_path.name} is missing or unreadable")
                table.create(expected)
            elif found.get("memo") != self.fingerprint:
                raise self._foreign(f"table {table.header_path}", found.get("memo") or {})
            elif found != expected:
                raise ForeignMemoError(
                    f"teacher memo table {table.header_path} holds {found}, not {expected}. "
                    f"{self.rebuild_hint}".rstrip(),
                    _diff(expected, found),
                )
            damage = table.damage()
            if damage is not None:
                raise self._damaged(table, damage)
        self._tables[name] = table
        return table

    def rows_of(self, index: Tensor, views: Tensor) -> Tensor:
        """Row of each (image index, view) pair."""
        n_views = num_views(self.pad)
        return index.long().cpu() * n_views + views.long().cpu()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, stacklevel=3)

    def read(self, table: MemoTable, rows: Tensor) -> tuple[Tensor, Tensor]:
        """``(ok, values)`` of ``rows`` (see :meth:`MemoTable.read`); rows failing their CRC are
        misses (warned once per table); a read error turns the memo off with one warning."""
        miss = torch.zeros(len(rows), dtype=torch.bool), torch.zeros(len(rows), table.size)
        if not self.readable:
            return miss
        try:
            ok, values, damaged = table.read(rows)
        except OSError as err:
            self.readable = self.writable = False
            self._warn_once(
                "read",
                f"teacher memo {self.directory}: cannot read table {table.name} "
                f"({err.strerror or err}); this run goes on computing the teacher",
            )
            return miss
        if damaged:
            self._warn_once(
                table.name,
                f"teacher memo table {self.directory / table.name}: stored rows fail their "
                "checksum (damaged on disk); each is recomputed and rewritten (reported once)",
            )
        return ok, values

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
            self._warn_once(
                "write",
                f"teacher memo {self.directory}: cannot write ({err.strerror or err}); this run "
                "goes on computing the teacher for views not in the memo",
            )

    def coverage(self, table: MemoTable) -> float:
        """Fraction of all (image, view) rows the table holds (marked filled)."""
        count = 0
        with open(table.flags_path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                count += int(np.count_nonzero(np.frombuffer(chunk, dtype=np.uint8)))
        return count / self.rows
