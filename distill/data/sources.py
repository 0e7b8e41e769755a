"""Dataset sources decoded once into uint8 tensors: torchvision, image folder, synthetic.

Each loader takes the dataset (a :data:`~distill.data.datasets.DATASETS` name or entry; default
CIFAR-10) whose classes, image size and torchvision class it reads.
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distill.config_checks import unwritable
from distill.data.datasets import CIFAR10, CIFAR10_CLASSES, DataError, DatasetSpec, get_dataset
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

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp")
_CACHE_VERSION = 2  # 2: keyed by file stats, identified by a content hash


@dataclass
class CIFARArrays:
    """A decoded dataset: uint8 (N, 3, H, W) images and long (N,) labels per split."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    classes: tuple[str, ...]
    dataset_id: str


def missing_data_message(
    root: str | Path, reason: str, dataset: str | DatasetSpec = CIFAR10
) -> str:
    """The error text for "no ``dataset`` at ``root``", listing the three ways out."""
    ds = get_dataset(dataset)
    return (
        f"{ds.title} not found at '{root}' ({reason}). Fix one of:\n"
        "  data.download=true                 (torchvision download; needs internet)\n"
        "  data.source=folder data.root=PATH  (image-folder copy PATH/{train,test}/<class>/*;\n"
        f"                                      data={ds.folder_config}: {ds.folder_root})\n"
        "  data.source=synthetic              (tiny deterministic fake data; "
        f"data={ds.synthetic_config})"
    )


# ----------------------------------------------------------------------------- torchvision


def load_torchvision(
    root: str | Path, download: bool, dataset: str | DatasetSpec = CIFAR10
) -> CIFARArrays:
    """The dataset's torchvision class (e.g. ``CIFAR10``, ``CIFAR100``: python pickle batches),
    downloading when allowed; ``dataset_id`` is ``torchvision:<name>``."""
    import torchvision.datasets

    ds = get_dataset(dataset)
    tv_class = getattr(torchvision.datasets, ds.torchvision)
    root = Path(root).expanduser().resolve()
    try:
        train = tv_class(str(root), train=True, download=download)
        test = tv_class(str(root), train=False, download=download)
    except (RuntimeError, OSError) as err:  # not found / corrupted / no network (URLError)
        reason = "download disabled" if not download else f"download failed: {err}"
        raise DataError(missing_data_message(root, reason, ds)) from None
    if tuple(train.classes) != ds.classes:
        raise DataError(
            f"torchvision's {ds.torchvision} at '{root}' has other classes than {ds.title} "
            f"declares (distill.data.datasets): {list(train.classes)[:5]}...; delete the folder "
            "and download again"
        )

    def to_tensors(split: Any) -> tuple[Tensor, Tensor]:
        images = torch.from_numpy(np.ascontiguousarray(split.data.transpose(0, 3, 1, 2)))
        return images, torch.as_tensor(split.targets, dtype=torch.long)

    tr_x, tr_y = to_tensors(train)
    te_x, te_y = to_tensors(test)
    # torchvision checks the MD5 of every batch file on load: the content is the official one
    return CIFARArrays(tr_x, tr_y, te_x, te_y, ds.classes, f"torchvision:{ds.name}")


# ----------------------------------------------------------------------------- image folder


def _class_dirs(split_dir: Path) -> list[str]:
    return sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _some(names: Sequence[str], limit: int = 10) -> str:
    """``names`` for a message: all up to ``limit``, else the first ``limit`` and a count."""
    if not names:
        return "none"
    more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
    return f"{list(names[:limit])}{more}"


def list_image_folder(
    root: str | Path, split: str, dataset: str | DatasetSpec = CIFAR10
) -> tuple[list[Path], list[int]]:
    """Files and labels of ``root/split/<class>/*``: the class folders must be exactly the
    dataset's classes (labels in its class order; file names sorted)."""
    ds = get_dataset(dataset)
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise DataError(missing_data_message(root, f"no '{split}' folder", ds))
    found = _class_dirs(split_dir)
    if set(found) != set(ds.classes):
        missing = [c for c in ds.classes if c not in set(found)]
        extra = sorted(set(found) - set(ds.classes))
        listed = f" {', '.join(ds.classes)}" if ds.num_classes <= 10 else ""
        raise DataError(
            f"'{split_dir}' must hold exactly the {ds.num_classes} {ds.title} class folders"
            f"{listed} (distill.data.datasets); missing: {_some(missing)}, "
            f"unexpected: {_some(extra)}. "
            "Fix the folder layout or point data.root at a complete copy."
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(ds.classes):
        with os.scandir(split_dir / name) as it:
            names = sorted(
                e.name for e in it if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)
            )
        files += [split_dir / name / n for n in names]
        labels += [label] * len(names)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under '{split_dir}'")
    return files, labels


def _read_one(path: Path, size: int = 32) -> tuple[np.ndarray, bytes]:
    """Decode one ``size`` x ``size`` RGB image file; also return the SHA-256 of its bytes."""
    from PIL import Image, UnidentifiedImageError

    try:
        data = path.read_bytes()
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot read image '{path}': {err}. Remove or replace the file.") from None
    with im:
        if im.size != (size, size) or im.mode != "RGB":
            raise DataError(
                f"'{path}' is {im.size[0]}x{im.size[1]} {im.mode}; "
                f"images of this dataset must be {size}x{size} RGB. "
                "Convert the folder copy (or use data.source=torchvision / synthetic)."
            )
        return np.asarray(im, dtype=np.uint8), hashlib.sha256(data).digest()


def _decode_all(
    files: Sequence[Path], threads: int | None = None, size: int = 32
) -> tuple[Tensor, list[bytes]]:
    out = np.empty((len(files), size, size, 3), dtype=np.uint8)
    digests: list[bytes] = []
    workers = threads or min(4, os.cpu_count() or 1)
    read = partial(_read_one, size=size)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for i, (arr, digest) in enumerate(pool.map(read, files, chunksize=256)):
            out[i] = arr
            digests.append(digest)
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), digests


def decode_images(files: Sequence[Path], threads: int | None = None, size: int = 32) -> Tensor:
    """Decode ``size`` x ``size`` RGB image files into a uint8 (N, 3, size, size) tensor."""
    return _decode_all(files, threads, size)[0]


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


def _folder_id(n_train: int, n_test: int, content: str, dataset: DatasetSpec = CIFAR10) -> str:
    """Identity of a folder copy by dataset and content (not by path: a moved copy keeps its
    identity); CIFAR-10's has no dataset part, as before datasets were configurable."""
    name = "" if dataset.name == CIFAR10.name else f"{dataset.name}:"
    return f"folder:{name}n={n_train}:test={n_test}:sha256={content[:16]}"


def load_folder(
    root: str | Path, cache_dir: str | Path | None = None, dataset: str | DatasetSpec = CIFAR10
) -> CIFARArrays:
    """Decode an image-folder copy of ``dataset``; ``dataset_id`` names the dataset (not for
    CIFAR-10) and hashes every file's bytes and name.

    With ``cache_dir``, the decoded tensors are cached (one file per folder path, with a SHA-256
    sidecar) together with the content hash, and reused while every file's path, size, mtime and
    ctime are unchanged (:func:`_stat_key`); any change re-decodes and re-hashes the folder. A
    cache that must be (re)built in a folder that cannot be written is a :class:`DataError`
    (before decoding).
    """
    ds = get_dataset(dataset)
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataError(missing_data_message(root, "folder does not exist", ds))
    tr_files, tr_labels = list_image_folder(root, "train", ds)
    te_files, te_labels = list_image_folder(root, "test", ds)
    files = tr_files + te_files
    stat_key = _stat_key(root, files)
    key = (ds.name, str(root), stat_key)
    if _LAST.get("key") == key:  # prepare_data then setup: load once
        return _LAST["arrays"]
    cache = None
    if cache_dir:
        where = hashlib.sha256(str(root).encode()).hexdigest()[:16]
        cache = Path(cache_dir).expanduser() / f"{ds.name}-folder-{where}.pt"
        blob = _load_cache(cache, stat_key)
        if blob is not None:
            arrays = CIFARArrays(
                blob["train_images"],
                blob["train_labels"],
                blob["test_images"],
                blob["test_labels"],
                ds.classes,
                _folder_id(len(tr_files), len(te_files), blob["content"], ds),
            )
            _LAST.update(key=key, arrays=arrays)
            return arrays
        reason = unwritable(cache.parent)
        if reason is not None:
            raise DataError(_cache_message(cache, reason))
    images, digests = _decode_all(files, size=ds.image_size)
    content = _content_hash(root, files, digests)
    arrays = CIFARArrays(
        images[: len(tr_files)].clone(),
        torch.tensor(tr_labels, dtype=torch.long),
        images[len(tr_files) :].clone(),
        torch.tensor(te_labels, dtype=torch.long),
        ds.classes,
        _folder_id(len(tr_files), len(te_files), content, ds),
    )
    if cache is not None:
        try:
            _save_cache(cache, stat_key, content, arrays)
        except OSError as err:
            raise DataError(_cache_message(cache, err.strerror or str(err))) from None
    _LAST.update(key=key, arrays=arrays)
    return arrays


def _cache_message(cache: Path, reason: str) -> str:
    return (
        f"cannot write the decoded-image cache {cache} ({reason}); set data.cache_dir=PATH to a "
        "writable folder, or data.cache_dir=null to decode without a cache"
    )


_LAST: dict[str, Any] = {}  # the last folder loaded in this process: key -> arrays


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


def _synthetic_split(n: int, num_classes: int, seed: int, side: int = 32) -> tuple[Tensor, Tensor]:
    """Class-colored square on a class-tinted noisy background; deterministic given ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]
    color = _palette(num_classes)[labels][:, :, None, None]  # (n, 3, 1, 1)
    img = 128 + 0.3 * (color - 128) + 24 * torch.randn(n, 3, side, side, generator=g)
    size = torch.randint(10, 17, (n,), generator=g)
    y0 = (torch.rand(n, generator=g) * (side - size + 1)).long()
    x0 = (torch.rand(n, generator=g) * (side - size + 1)).long()
    ar = torch.arange(side)
    in_y = (ar[None, :] >= y0[:, None]) & (ar[None, :] < (y0 + size)[:, None])
    in_x = (ar[None, :] >= x0[:, None]) & (ar[None, :] < (x0 + size)[:, None])
    mask = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (n, 1, side, side)
    img = torch.where(mask, color + 12 * torch.randn(n, 3, side, side, generator=g), img)
    return img.round().clamp(0, 255).to(torch.uint8), labels.long()


def make_synthetic(
    n_train: int = 1000,
    n_test: int = 500,
    seed: int = 0,
    num_classes: int | None = None,
    dataset: str | DatasetSpec = CIFAR10,
) -> CIFARArrays:
    """Deterministic learnable fake data in the shape of ``dataset`` (class = color of a square
    and background tint) with ``num_classes`` classes (default: the dataset's; another count gets
    the names ``class0``, ``class1``, ...).

    ``dataset_id`` is ``synthetic:n=<n_train>:test=<n_test>:seed=<seed>``, followed by
    ``:<dataset>:classes=<num_classes>`` unless that is CIFAR-10 with 10 classes (the id of
    synthetic data before datasets were configurable).
    """
    ds = get_dataset(dataset)
    num_classes = ds.num_classes if num_classes is None else num_classes
    if num_classes < 2 or n_train < num_classes or n_test < 1:
        raise DataError(
            f"synthetic data needs num_classes >= 2, n_train >= num_classes and n_test >= 1, "
            f"got {num_classes}, {n_train}, {n_test}: raise data.synthetic_size (or lower "
            "data.num_classes)"
        )
    tr_x, tr_y = _synthetic_split(n_train, num_classes, seed, ds.image_size)
    te_x, te_y = _synthetic_split(n_test, num_classes, seed + 100_003, ds.image_size)
    named = num_classes == ds.num_classes
    classes = ds.classes if named else tuple(f"class{i}" for i in range(num_classes))
    ident = f"synthetic:n={n_train}:test={n_test}:seed={seed}"
    if (ds.name, num_classes) != (CIFAR10.name, CIFAR10.num_classes):
        ident += f":{ds.name}:classes={num_classes}"
    return CIFARArrays(tr_x, tr_y, te_x, te_y, classes, ident)
