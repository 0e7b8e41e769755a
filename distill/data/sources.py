"""CIFAR-10 sources decoded once into uint8 tensors: torchvision, image folder, synthetic."""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.config_checks import unwritable
from distill.integrity import IntegrityError, atomic_write, verify_checksum, write_checksum

__all__ = [
    "CIFAR10_CLASSES",
    "CIFARArrays",
    "DataError",
    "decode_images",
    "list_image_folder",
    "load_folder",
    "load_torchvision",
    "make_synthetic",
]

CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
_CACHE_VERSION = 2  # 2: keyed by file stats, identified by a content hash


class DataError(RuntimeError):
    """A user-facing data problem; the message says what is wrong and how to fix it."""


@dataclass
class CIFARArrays:
    """A decoded dataset: uint8 (N, 3, 32, 32) images and long (N,) labels per split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]
    dataset_id: str


def missing_data_message(root: str | Path, reason: str) -> str:
    """The error text for "no CIFAR-10 at ``root``", listing the three ways out."""
    return (
        f"CIFAR-10 not found at '{root}' ({reason}). Fix one of:\n"
        "  data.download=true                 (torchvision download; needs internet)\n"
        "  data.source=folder data.root=PATH  (image-folder copy PATH/{train,test}/<class>/*;\n"
        "                                      data=cifar10_folder: ../shared/data/cifar10-jpeg)\n"
        "  data.source=synthetic              (tiny deterministic fake data; data=synthetic)"
    )


# ----------------------------------------------------------------------------- torchvision


def load_torchvision(root: str | Path, download: bool) -> CIFARArrays:
    """torchvision's CIFAR10 (python pickle batches), downloading when allowed."""
    from torchvision.datasets import CIFAR10

    root = Path(root).expanduser().resolve()
    try:
        train = CIFAR10(str(root), train=True, download=download)
        test = CIFAR10(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:  # not found / corrupted / no network (URLError)
        reason = "download disabled" if not download else f"download failed: {err}"
        raise DataError(missing_data_message(root, reason)) from None

    def to_tensors(ds: CIFAR10) -> tuple[Tensor, Tensor]:
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        return images, torch.as_tensor(ds.targets, dtype=torch.long)

    tr_x, tr_y = to_tensors(train)
    te_x, te_y = to_tensors(test)
    # torchvision checks the MD5 of every batch file on load: the content is the official one
    return CIFARArrays(tr_x, tr_y, te_x, te_y, tuple(train.classes), "torchvision:cifar10")


# ----------------------------------------------------------------------------- image folder


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def list_image_folder(root: str | Path, split: str) -> tuple[list[Path], list[int]]:
    """Files and labels of ``root/split/<class>/*`` (classes in CIFAR-10 order, names sorted)."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(missing_data_message(root, f"no '{split}' folder"))
    found = _class_dirs(split_dir)
    if set(found) != set(CIFAR10_CLASSES):
        missing = sorted(set(CIFAR10_CLASSES) - set(found))
        extra = sorted(set(found) - set(CIFAR10_CLASSES))
        raise DataError(
            f"'{split_dir}' must hold exactly the 10 CIFAR-10 class folders "
            f"{', '.join(CIFAR10_CLASSES)}; missing: {missing or 'none'}, "
            f"unexpected: {extra or 'none'}. "
            "Fix the folder layout or point data.root at a complete copy."
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(CIFAR10_CLASSES):
        with os.scandir(split_dir / name) as it:
            names = sorted(
                e.name for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
            )
        files += [split_dir / name / n for n in names]
        labels += [label] * len(names)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{split_dir}'")
    return files, labels


def _read_one(path: Path) -> tuple[np.ndarray, bytes]:
    """Decode one 32x32 RGB image file; also return the SHA-256 of its bytes."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image '{path}': {err}. Remove or replace the file.") from None
    with im:
        if im.size != (32, 32) or im.mode != "RGB":
            raise DataError(
                f"'{path}' is {im.size[0]}x{im.size[1]} {im.mode}; "
                "CIFAR-10 images must be 32x32 RGB. "
                "Convert the folder copy (or use data.source=torchvision / synthetic)."
            )
        return np.asarray(im, dtype=np.uint8), hashlib.sha256(data).digest()


def _decode_all(files: Sequence[Path], threads: int | None = None) -> tuple[Tensor, list[bytes]]:
    out = np.empty((len(files), 32, 32, 3), dtype=np.uint8)
    digests: list[bytes] = []
    workers = threads or min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (arr, digest) in enumerate(pool.map(_read_one, files, chunksize=256)):
            out[i] = arr
            digests.append(digest)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), digests


def decode_images(files: Sequence[Path], threads: int | None = None) -> Tensor:
    """Decode 32x32 RGB image files into a uint8 (N, 3, 32, 32) tensor."""
    return _decode_all(files, threads)[0]


def _stat_key(root: Path, files: Sequence[Path]) -> str:
    """Cheap key checked on every start: relative path, size, mtime and ctime of every file.

    ctime cannot be set by copying tools (``cp -p``, ``rsync -t``, ``touch -r``), so contents
    replaced with the old mtime still change the key (cheap next to hashing every file; timings
    in docs/training.md).
    """
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        rel = f.relative_to(root).as_posix()
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}\n".encode())
    return h.hexdigest()


def _content_hash(root: Path, files: Sequence[Path], digests: Sequence[bytes]) -> str:
    """SHA-256 over (split/class/name, SHA-256 of the bytes) of every file, in dataset order."""
    h = hashlib.sha256()
    for f, digest in zip(files, digests, strict=True):
        h.update(f.relative_to(root).as_posix().encode() + b"\0" + digest)
    return h.hexdigest()


def _folder_id(n_train: int, n_test: int, content: str) -> str:
    """Identity of a folder copy by content (not by path: a moved copy keeps its identity)."""
    return f"folder:n={n_train}:test={n_test}:sha256={content[:16]}"


def load_folder(root: str | Path, cache_dir: str | Path | None = None) -> CIFARArrays:
    """Decode an image-folder copy; ``dataset_id`` is a hash of every file's bytes and name.

    With ``cache_dir``, the decoded tensors are cached (one file per folder path, with a SHA-256
    sidecar) together with the content hash, and reused while every file's path, size, mtime and
    ctime are unchanged (:func:`_stat_key`); any change re-decodes and re-hashes the folder. A
    cache that must be (re)built in a folder that cannot be written is a :class:`DataError`
    (before decoding).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(missing_data_message(root, "folder does not exist"))
    tr_files, tr_labels = list_image_folder(root, "train")
    te_files, te_labels = list_image_folder(root, "test")
    files = tr_files + te_files
    stat_key = _stat_key(root, files)
    if _LAST.get("key") == (str(root), stat_key):  # prepare_data then setup: load once
        return _LAST["arrays"]
    cache = None
    if cache_dir:
        where = hashlib.sha256(str(root).encode()).hexdigest()[:16]
        cache = Path(cache_dir).expanduser() / f"cifar10-folder-{where}.pt"
        blob = _load_cache(cache, stat_key)
        if blob is not None:
            arrays = CIFARArrays(
                blob["train_images"],
                blob["train_labels"],
                blob["test_images"],
                blob["test_labels"],
                CIFAR10_CLASSES,
                _folder_id(len(tr_files), len(te_files), blob["content"]),
            )
            _LAST.update(key=(str(root), stat_key), arrays=arrays)
            return arrays
        reason = unwritable(cache.parent)
        if reason is not None:
            raise DataError(_cache_message(cache, reason))
    images, digests = _decode_all(files)
    content = _content_hash(root, files, digests)
    arrays = CIFARArrays(
        images[: len(tr_files)].clone(),
        torch.tensor(tr_labels, dtype=torch.long),
        images[len(tr_files) :].clone(),
        torch.tensor(te_labels, dtype=torch.long),
        CIFAR10_CLASSES,
        _folder_id(len(tr_files), len(te_files), content),
    )
    if cache is not None:
        try:
            _save_cache(cache, stat_key, content, arrays)
        except OSError as err:
            raise DataError(_cache_message(cache, err.strerror or str(err))) from None
    _LAST.update(key=(str(root), stat_key), arrays=arrays)
    return arrays


def _cache_message(cache: Path, reason: str) -> str:
    return (
        f"cannot write the decoded-image cache {cache} ({reason}); set data.cache_dir=PATH to a "
        "writable folder, or data.cache_dir=null to decode without a cache"
    )


_LAST: dict[str, Any] = {}  # the last folder loaded in this process: (root, stat key) -> arrays


def _load_cache(cache: Path, stat_key: str) -> dict | None:
    """The cached blob if it is intact and built from files with ``stat_key``; else None (the
    caller re-decodes and overwrites it)."""
    if not cache.is_file():
        return None
    try:
        verify_checksum(cache)
        blob = torch.load(cache, map_location="cpu", weights_only=True)
    except (IntegrityError, OSError, RuntimeError, ValueError) as err:
        print(f"decoded-image cache {cache} is unusable ({err}); decoding again", file=sys.stderr)
        return None
    if blob.get("version") != _CACHE_VERSION or blob.get("stat_key") != stat_key:
        print(f"image files changed since {cache} was built; decoding again", file=sys.stderr)
        return None
    return blob


def _save_cache(cache: Path, stat_key: str, content: str, arrays: CIFARArrays) -> None:
    blob = {
        "version": _CACHE_VERSION,
        "stat_key": stat_key,
        "content": content,
        "train_images": arrays.train_images,
        "train_labels": arrays.train_labels,
        "test_images": arrays.test_images,
        "test_labels": arrays.test_labels,
    }
    atomic_write(cache, lambda fh: torch.save(blob, fh))  # concurrent runs never see a torn file
    write_checksum(cache)


# ----------------------------------------------------------------------------- synthetic


def _palette(num_classes: int) -> Tensor:
    """Distinct fixed RGB colors (float 0..255), one per class: a hue wheel, two brightnesses."""
    hues = torch.arange(num_classes, dtype=torch.float32) / num_classes
    k = (torch.tensor([5.0, 3.0, 1.0])[None, :] + hues[:, None] * 6) % 6
    rgb = 1 - torch.clamp(torch.minimum(k, 4 - k), 0, 1)  # HSV -> RGB with S = V = 1
    level = torch.where(torch.arange(num_classes) % 2 == 0, 230.0, 150.0)[:, None]
    return 40 + rgb * (level - 40)


def _synthetic_split(n: int, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Class-colored square on a class-tinted noisy background; deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    color = _palette(num_classes)[labels][:, :, None, None]  # (n, 3, 1, 1)
    img = 128 + 0.3 * (color - 128) + 24 * torch.randn(n, 3, 32, 32, generator=g)
    size = torch.randint(10, 17, (n,), generator=g)
    y0 = (torch.rand(n, generator=g) * (32 - size + 1)).long()
    x0 = (torch.rand(n, generator=g) * (32 - size + 1)).long()
    ar = torch.arange(32)
    in_y = (ar[None, :] >= y0[:, None]) & (ar[None, :] < (y0 + size)[:, None])
    in_x = (ar[None, :] >= x0[:, None]) & (ar[None, :] < (x0 + size)[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (n, 1, 32, 32)
    img = torch.where(mask, color + 12 * torch.randn(n, 3, 32, 32, generator=g), img)
    return img.round().clamp(0, 255).to(torch.uint8), labels.long()


def make_synthetic(
    n_train: int = 1000, n_test: int = 500, seed: int = 0, num_classes: int = 10
) -> CIFARArrays:
    """Deterministic learnable fake CIFAR-10 (class = color of a square and background tint)."""
    if n_train < num_classes or n_test < 1:
        raise DataError(
            f"synthetic data needs n_train >= {num_classes} and n_test >= 1, "
            f"got {n_train}, {n_test}"
        )
    tr_x, tr_y = _synthetic_split(n_train, num_classes, seed)
    te_x, te_y = _synthetic_split(n_test, num_classes, seed + 100_003)
    classes = (
        CIFAR10_CLASSES if num_classes == 10 else tuple(f"class{i}" for i in range(num_classes))
    )
    return CIFARArrays(
        tr_x, tr_y, te_x, te_y, classes, f"synthetic:n={n_train}:test={n_test}:seed={seed}"
    )
