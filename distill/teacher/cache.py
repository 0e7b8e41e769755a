"""Offline teacher explanation maps: sharded, fingerprinted, resumable cache.

The Shap-CAM paper precomputes the teacher's maps once (10^4 permutations per image). This module
writes them in shards under one directory::

    <dir>/manifest.json      fingerprint + one entry (file, sha256, range) per finished shard
    <dir>/shard_00000.pt     {"maps": float32 (n, h, w), "start": int, "stop": int}

A finished shard is never recomputed unless its checksum no longer matches (then it is recomputed,
with a note); an interrupted run resumes at the first missing shard. Loading verifies the
fingerprint (teacher checkpoint hash, method, layer, options, dataset identity and size), the shard
checksums and shapes, and refuses anything that does not match.

During training the cached maps (computed on un-augmented images) are looked up by dataset index
and pushed through exactly the crop/flip of their images (:func:`align_maps`).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from distill.integrity import atomic_write, sha256_file

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class CacheError(RuntimeError):
    """A teacher-map cache is missing, incomplete, corrupted or built for another configuration."""


class ForeignCacheError(CacheError):
    """The cache directory holds maps built for another configuration (``diff`` says how)."""

    def __init__(self, message: str, directory: Path, diff: str) -> None:
        super().__init__(message)
        self.directory, self.diff = directory, diff


def fingerprint_hash(fingerprint: Mapping[str, Any]) -> str:
    """Stable hash of a JSON-serializable fingerprint."""
    text = json.dumps(dict(fingerprint), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _diff(expected: Mapping[str, Any], found: Mapping[str, Any]) -> str:
    keys = sorted(set(expected) | set(found))
    changes = [
        f"{k}: cache={found.get(k)!r} vs run={expected.get(k)!r}"
        for k in keys
        if expected.get(k) != found.get(k)
    ]
    return "; ".join(changes)


def _atomic_save(obj: Any, path: Path) -> None:
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _atomic_write_json(obj: Any, path: Path) -> None:
    text = json.dumps(obj, indent=2, sort_keys=True, default=str)
    atomic_write(path, lambda fh: fh.write(text.encode()))


@dataclass
class MapCache:
    """A sharded cache directory bound to one fingerprint."""

    directory: Path
    fingerprint: dict[str, Any]
    num_samples: int
    shard_size: int = 5000

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        self.key = fingerprint_hash(self.fingerprint)

    # ----------------------------------------------------------------- manifest
    def _read_manifest(self) -> dict[str, Any] | None:
        path = self.directory / MANIFEST
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise CacheError(
                f"teacher-map cache manifest {path} is corrupted ({err}); "
                "delete the directory and precompute again"
            ) from err

    def _new_manifest(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "key": self.key,
            "num_samples": self.num_samples,
            "shard_size": self.shard_size,
            "shards": {},
        }

    def _check_manifest(self, manifest: dict[str, Any]) -> None:
        if manifest.get("key") != self.key:
            diff = _diff(self.fingerprint, manifest.get("fingerprint", {}))
            raise ForeignCacheError(
                f"teacher-map cache {self.directory} was built for another configuration "
                f"({diff}); it is left untouched: use the matching settings, or give this "
                "configuration its own directory (leave loss.cache_dir unset, or set it to an "
                "empty directory) in both precompute and training",
                self.directory,
                diff,
            )
        if manifest.get("num_samples") != self.num_samples:
            raise CacheError(
                f"teacher-map cache {self.directory} holds "
                f"{manifest.get('num_samples')} samples, the dataset has "
                f"{self.num_samples}; delete it and precompute again"
            )

    def shard_ranges(self) -> list[tuple[int, int]]:
        """Half-open index ranges of all shards."""
        return [
            (s, min(s + self.shard_size, self.num_samples))
            for s in range(0, self.num_samples, self.shard_size)
        ]

    @staticmethod
    def shard_name(start: int) -> str:
        return f"shard_{start:08d}.pt"

    def corrupted_shards(self) -> list[tuple[int, int]]:
        """Finished shards whose file no longer matches the checksum in the manifest."""
        manifest = self._read_manifest()
        if manifest is None:
            return []
        done = manifest["shards"]
        corrupted = []
        for a, b in self.shard_ranges():
            entry = done.get(str(a))
            path = self.directory / entry["file"] if entry else None
            if path is not None and path.exists() and sha256_file(path) != entry["sha256"]:
                corrupted.append((a, b))
        return corrupted

    def missing_shards(self) -> list[tuple[int, int]]:
        """Shards not yet written (or whose file is missing)."""
        manifest = self._read_manifest()
        if manifest is None:
            return self.shard_ranges()
        self._check_manifest(manifest)
        done = manifest["shards"]
        return [
            (a, b)
            for a, b in self.shard_ranges()
            if str(a) not in done or not (self.directory / done[str(a)]["file"]).exists()
        ]

    # ----------------------------------------------------------------- writing
    def build(
        self,
        compute: Callable[[Tensor, Tensor], Tensor],
        images: Tensor,
        labels: Tensor,
        batch_size: int = 256,
        progress: bool = True,
    ) -> None:
        """Compute and store every missing or corrupted shard (``compute(images, labels) ->
        (n, h, w)``), then verify the whole cache as :meth:`load` does."""
        if len(images) != self.num_samples or len(labels) != self.num_samples:
            raise CacheError(
                f"expected {self.num_samples} images/labels, got {len(images)}/{len(labels)}"
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        manifest = self._read_manifest() or self._new_manifest()
        self._check_manifest(manifest)
        _atomic_write_json(manifest, self.directory / MANIFEST)
        corrupted = self.corrupted_shards()
        for a, b in corrupted:
            print(
                f"teacher-map shard {self.directory / self.shard_name(a)} (samples {a}..{b - 1}) "
                "is corrupted (checksum mismatch): computing it again",
                file=sys.stderr,
            )
        todo = sorted(set(self.missing_shards()) | set(corrupted))
        bar = _progress(total=sum(b - a for a, b in todo), enabled=progress)
        for start, stop in todo:
            chunks = []
            for s in range(start, stop, batch_size):
                e = min(s + batch_size, stop)
                chunks.append(compute(images[s:e], labels[s:e]).detach().float().cpu())
                bar.update(e - s)
            maps = torch.cat(chunks)
            if not torch.isfinite(maps).all():
                raise CacheError(f"non-finite teacher maps in samples {start}..{stop - 1}")
            name = self.shard_name(start)
            _atomic_save(
                {"maps": maps, "start": start, "stop": stop, "key": self.key}, self.directory / name
            )
            manifest["shards"][str(start)] = {
                "file": name,
                "start": start,
                "stop": stop,
                "sha256": sha256_file(self.directory / name),
            }
            _atomic_write_json(manifest, self.directory / MANIFEST)
        bar.close()
        self.load()  # every shard verified (checksum, key, shape) before anyone is told "ready"

    # ----------------------------------------------------------------- reading
    def load(self) -> Tensor:
        """All maps (N, h, w), verified against fingerprint, checksums and shapes."""
        manifest = self._read_manifest()
        if manifest is None:
            raise CacheError(f"no teacher-map cache at {self.directory}")
        self._check_manifest(manifest)
        missing = self.missing_shards()
        if missing:
            raise CacheError(
                f"teacher-map cache {self.directory} is incomplete "
                f"({len(missing)} of {len(self.shard_ranges())} shards missing); "
                "run the precompute command again to finish it"
            )
        parts = [self._load_shard(manifest["shards"][str(a)], a, b) for a, b in self.shard_ranges()]
        shapes = {tuple(p.shape[1:]) for p in parts}
        if len(shapes) != 1:
            raise CacheError(
                f"teacher-map cache {self.directory} mixes map shapes {sorted(shapes)}"
            )
        return torch.cat(parts)

    def _load_shard(self, entry: Mapping[str, Any], start: int, stop: int) -> Tensor:
        path = self.directory / entry["file"]
        if sha256_file(path) != entry["sha256"]:
            raise CacheError(
                f"teacher-map shard {path} is corrupted (checksum mismatch); "
                "run the precompute command again: it recomputes corrupted shards"
            )
        data = torch.load(path, map_location="cpu", weights_only=True)
        maps = data["maps"]
        if data.get("key") != self.key or maps.ndim != 3 or len(maps) != stop - start:
            raise CacheError(
                f"teacher-map shard {path} does not match its manifest; "
                "delete it and run the precompute command again"
            )
        return maps


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="teacher maps", unit="img")


def align_maps(maps: Tensor, aug: Any, image_size: int = 32, mode: str = "nearest") -> Tensor:
    """Push maps of un-augmented images through their images' crop/flip.

    ``maps`` (B, h, w) are upsampled to ``image_size`` (``mode``: "nearest", default, or
    "bilinear"), transformed by ``aug.apply`` (the same reflect-pad/crop/flip as the images) and
    brought back to (h, w) by area averaging. With "nearest" a cell shifted by a fraction of its
    size becomes the overlap-weighted (linear) interpolation of its neighbours, which is exact for
    maps that are block averages of a per-pixel function of the image and, away from the border,
    for maps linear in position. Border cells differ: padding reflects the map, not the image.
    "bilinear" smooths twice and is less exact (see tests/test_teacher_maps.py).
    """
    if aug is None:
        return maps
    h, w = maps.shape[-2:]
    kwargs = {"align_corners": False} if mode == "bilinear" else {}
    up = F.interpolate(maps.unsqueeze(1), size=(image_size, image_size), mode=mode, **kwargs)
    moved = aug.apply(up)
    return F.adaptive_avg_pool2d(moved, (h, w)).squeeze(1)


EXECUTION_OPTIONS = ("batch_size", "chunk_size", "num_threads")
"""CAM options that change how maps are computed (memory, threads), not what they are."""


def teacher_fingerprint(
    checkpoint: str | Path,
    method: str,
    layer: str,
    options: Mapping[str, Any],
    dataset_id: str,
    indices: Tensor,
    teacher_sha256: str | None = None,
) -> dict[str, Any]:
    """Everything a cached map depends on: teacher weights, CAM settings, dataset identity and
    the dataset indices covered (the training split). :data:`EXECUTION_OPTIONS` are left out, so
    e.g. a cache built with another ``chunk_size`` or ``num_threads`` stays valid.
    ``teacher_sha256``: the checkpoint's digest when the caller has it already (else hashed)."""
    index_bytes = indices.to(torch.int64).cpu().numpy().tobytes()
    return {
        "format": FORMAT_VERSION,
        "teacher_sha256": teacher_sha256 or sha256_file(checkpoint),
        "method": method,
        "layer": layer,
        "options": {k: options[k] for k in sorted(options) if k not in EXECUTION_OPTIONS},
        "dataset": dataset_id,
        "num_samples": len(indices),
        "indices_sha256": hashlib.sha256(index_bytes).hexdigest(),
    }
