"""Data pipeline: augmentation vs a reference, normalization, splits, loaders, sources."""

from __future__ import annotations

import urllib.error
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from distill.data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    AugParams,
    CIFAR10DataModule,
    DataError,
    IndexBatchSampler,
    decode_images,
    denormalize_images,
    list_image_folder,
    load_folder,
    load_torchvision,
    make_synthetic,
    normalize_images,
    split_indices,
)
from distill.data import sources as sources_mod

# ----------------------------------------------------------------------------- augmentation


def reference_augment(t: torch.Tensor, p: AugParams) -> torch.Tensor:
    """Per-sample loop: F.pad(reflect) -> slice -> flip (the definition, written differently)."""
    outs = []
    h, w = t.shape[-2:]
    for b in range(t.shape[0]):
        padded = F.pad(t[b : b + 1].double(), (p.pad,) * 4, mode="reflect")[0]
        dy, dx = int(p.dy[b]), int(p.dx[b])
        crop = padded[:, dy : dy + h, dx : dx + w]
        outs.append(torch.flip(crop, dims=[-1]) if bool(p.flip[b]) else crop)
    return torch.stack(outs).to(t.dtype)


def all_offsets_params(pad: int = 4) -> AugParams:
    """Every (dy, dx, flip) combination once: 9 * 9 * 2 = 162 samples."""
    grid = torch.cartesian_prod(
        torch.arange(2 * pad + 1), torch.arange(2 * pad + 1), torch.arange(2)
    )
    return AugParams(grid[:, 0], grid[:, 1], grid[:, 2].bool(), pad)


def test_apply_matches_reference_for_every_offset_and_flip() -> None:
    p = all_offsets_params()
    x = torch.randn(len(p), 3, 32, 32)
    torch.testing.assert_close(p.apply(x), reference_augment(x, p), rtol=0, atol=0)


def test_apply_uint8_equals_float_and_identity_and_flip() -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8, generator=g)
    p = AugParams.sample(16, generator=g)
    assert torch.equal(p.apply(x), p.apply(x.float()).to(torch.uint8))
    assert torch.equal(AugParams.identity(16).apply(x), x)
    flip_only = AugParams.identity(16)
    flip_only.flip[:] = True
    assert torch.equal(flip_only.apply(x), torch.flip(x, dims=[-1]))


def test_shift_moves_content() -> None:
    x = torch.arange(32.0).view(1, 1, 1, 32).expand(1, 1, 32, 32).contiguous()
    p = AugParams(torch.tensor([4]), torch.tensor([6]), torch.tensor([False]))
    out = p.apply(x)
    # crop offset 6 in the padded image = shift by +2: out[..., j] = x[..., j + 2] (reflect at 31)
    assert out[0, 0, 0, :5].tolist() == [2.0, 3.0, 4.0, 5.0, 6.0]
    assert out[0, 0, 0, -2:].tolist() == [30.0, 29.0]


@pytest.mark.parametrize("channels", [1, 7])
def test_apply_any_channel_count_consistent_with_images(channels: int) -> None:
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (12, 3, 32, 32), dtype=torch.uint8, generator=g)
    maps = torch.rand(12, channels, 32, 32, generator=g)
    p = AugParams.sample(12, generator=g)
    stacked = torch.cat([images.float(), maps], dim=1)  # one tensor, 3 + C channels
    out = p.apply(stacked)
    assert torch.equal(out[:, :3].to(torch.uint8), p.apply(images))
    assert torch.equal(out[:, 3:], p.apply(maps))
    torch.testing.assert_close(p.apply(maps), reference_augment(maps, p), rtol=0, atol=1e-7)
    if channels == 1:  # (B, H, W) maps are accepted too
        assert torch.equal(p.apply(maps[:, 0]), p.apply(maps)[:, 0])


def test_sample_ranges_and_determinism() -> None:
    p = AugParams.sample(4000, generator=torch.Generator().manual_seed(0))
    q = AugParams.sample(4000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(p.dy, q.dy) and torch.equal(p.flip, q.flip)
    assert p.dy.min() == 0 and p.dy.max() == 8 and p.dx.min() == 0 and p.dx.max() == 8
    assert p.flip.dtype == torch.bool and 0.45 < p.flip.float().mean() < 0.55
    sub = p[torch.tensor([3, 5])]
    assert sub.dy.tolist() == [int(p.dy[3]), int(p.dy[5])] and len(sub) == 2


def test_apply_rejects_wrong_batch() -> None:
    with pytest.raises(ValueError):
        AugParams.identity(2).apply(torch.zeros(3, 1, 32, 32))


# ----------------------------------------------------------------------------- normalization


def test_normalization_constants_and_values() -> None:
    assert pytest.approx((125.3 / 255, 123.0 / 255, 113.9 / 255)) == CIFAR10_MEAN
    assert pytest.approx((63.0 / 255, 62.1 / 255, 66.7 / 255)) == CIFAR10_STD
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[:, :, 0, 0] = 255
    out = normalize_images(x)
    for c in range(3):
        assert out[0, c, 1, 1].item() == pytest.approx(-CIFAR10_MEAN[c] / CIFAR10_STD[c], rel=1e-6)
        assert out[0, c, 0, 0].item() == pytest.approx(
            (1 - CIFAR10_MEAN[c]) / CIFAR10_STD[c], rel=1e-6
        )
    torch.testing.assert_close(denormalize_images(out), x.float() / 255)


# ----------------------------------------------------------------------------- splits


def test_split_seeded_disjoint_stratified_original_indices() -> None:
    labels = torch.arange(1000) % 10
    tr, va = split_indices(labels, train_subset=None, val_size=100, seed=3)
    tr2, va2 = split_indices(labels, train_subset=None, val_size=100, seed=3)
    assert torch.equal(tr, tr2) and torch.equal(va, va2)
    assert not torch.equal(va, split_indices(labels, None, 100, seed=4)[1])
    assert len(va) == 100 and len(tr) == 900
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(1000))
    assert torch.bincount(labels[va], minlength=10).tolist() == [10] * 10


def test_train_subset_keeps_original_indices() -> None:
    labels = torch.arange(500) % 10
    tr, va = split_indices(labels, train_subset=200, val_size=20, seed=0)
    assert len(tr) == 180 and len(va) == 20
    assert torch.bincount(labels[torch.cat([tr, va])], minlength=10).tolist() == [20] * 10
    assert tr.max() >= 200 or va.max() >= 200  # drawn from the whole set, not the first 200
    assert not set(tr.tolist()) & set(va.tolist())
    tr0, va0 = split_indices(labels, train_subset=None, val_size=0, seed=0)
    assert torch.equal(tr0, torch.arange(500)) and len(va0) == 0


def test_split_rejects_bad_sizes() -> None:
    labels = torch.arange(100) % 10
    with pytest.raises(DataError, match="val_size"):
        split_indices(labels, None, 100, 0)
    with pytest.raises(DataError, match="train_subset"):
        split_indices(labels, 1000, 0, 0)


# ----------------------------------------------------------------------------- loaders


def tiny_dm(**kwargs: object) -> CIFAR10DataModule:
    args = {
        "source": "synthetic",
        "synthetic_size": 120,
        "synthetic_test_size": 30,
        "batch_size": 16,
    }
    args.update(kwargs)
    dm = CIFAR10DataModule(**args)  # type: ignore[arg-type]
    dm.setup("fit")
    return dm


def test_batches_carry_original_indices_and_match_images() -> None:
    dm = tiny_dm(val_size=20, train_subset=100, split_seed=1)
    seen = []
    for raw in dm.train_dataloader():
        aug = raw["aug"]
        batch = dm.transform_batch(raw)
        idx = batch["index"]
        seen += idx.tolist()
        assert torch.equal(batch["label"], dm.train_labels[idx])
        expected = normalize_images(aug.apply(dm.train_images[idx]))
        torch.testing.assert_close(batch["image"], expected)
    assert sorted(seen) == dm.train_indices.tolist()
    val = [dm.transform_batch(b) for b in dm.val_dataloader()]
    assert all(b["aug"] is None for b in val)
    val_idx = torch.cat([b["index"] for b in val])
    assert torch.equal(val_idx, dm.val_indices)  # not shuffled
    torch.testing.assert_close(val[0]["image"], normalize_images(dm.train_images[val[0]["index"]]))
    test = [dm.transform_batch(b) for b in dm.test_dataloader()]
    assert torch.equal(torch.cat([b["index"] for b in test]), torch.arange(30))
    assert torch.equal(torch.cat([b["label"] for b in test]), dm.test_labels)


def test_train_order_seeded_per_epoch_and_unaugmented_option() -> None:
    def order(dm: CIFAR10DataModule, epoch: int) -> list[int]:
        dl = dm.train_dataloader()
        dl.sampler.set_epoch(epoch)
        return torch.cat([b["index"] for b in dl]).tolist()

    a, b = tiny_dm(shuffle_seed=5), tiny_dm(shuffle_seed=5)
    assert order(a, 0) == order(b, 0) != order(a, 1)
    assert order(a, 0) != order(tiny_dm(shuffle_seed=6), 0)
    batch = next(iter(tiny_dm(augment=False).train_dataloader()))
    assert batch["aug"] is None


def test_sampler_shards_across_ranks() -> None:
    idx = torch.arange(51)

    def shard(rank: int, shuffle: bool) -> list[int]:
        sampler = IndexBatchSampler(idx, 8, shuffle, seed=0, rank=rank, world_size=2)
        return torch.cat([b for b, _ in sampler]).tolist()

    train = [shard(r, True) for r in (0, 1)]
    assert len(train[0]) == len(train[1]) == 25  # equal shards for training
    assert not set(train[0]) & set(train[1])
    evals = [shard(r, False) for r in (0, 1)]
    assert sorted(evals[0] + evals[1]) == list(range(51))  # evaluation sees every sample once


def test_dataset_id_and_properties() -> None:
    dm = tiny_dm()
    assert dm.dataset_id == "synthetic:n=120:test=30:seed=0"
    assert dm.num_train_total == 120 and dm.num_classes == 10
    assert dm.train_images.dtype == torch.uint8 and dm.train_images.shape == (120, 3, 32, 32)


def test_synthetic_deterministic_balanced_and_class_dependent() -> None:
    a, b = make_synthetic(200, 50, seed=0), make_synthetic(200, 50, seed=0)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert not torch.equal(a.train_images, make_synthetic(200, 50, seed=1).train_images)
    assert torch.bincount(a.train_labels).tolist() == [20] * 10
    means = torch.stack(
        [a.train_images[a.train_labels == c].float().mean((0, 2, 3)) for c in range(10)]
    )
    assert torch.cdist(means, means).add(torch.eye(10) * 1e3).min() > 5  # classes differ in color


# ----------------------------------------------------------------------------- folder source


def test_folder_source_decodes_exactly_and_caches(
    image_folder: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import Image

    root = image_folder(per_class=(2, 1))
    cache = tmp_path / "cache"
    arrays = load_folder(root, cache)
    assert arrays.train_images.shape == (20, 3, 32, 32) and arrays.test_images.shape == (
        10,
        3,
        32,
        32,
    )
    assert arrays.train_labels.tolist() == [c for c in range(10) for _ in range(2)]
    pixels = torch.from_numpy(np.array(Image.open(root / "train/bird/0001.png")))
    assert torch.equal(arrays.train_images[5], pixels.permute(2, 0, 1))
    assert arrays.dataset_id.startswith("folder:n=20:test=10:sha256=")
    assert len(list(cache.glob("*.pt"))) == 1

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(sources_mod, "_decode_all", no_decoding)
    monkeypatch.setattr(sources_mod, "_LAST", {})  # as in a new process
    again = load_folder(root, cache)
    assert (
        torch.equal(again.train_images, arrays.train_images)
        and again.dataset_id == arrays.dataset_id
    )


def _pixels(path: Path) -> torch.Tensor:
    from PIL import Image

    return torch.from_numpy(np.array(Image.open(path))).permute(2, 0, 1)


def _replace_keeping_mtime(path: Path, seed: int) -> None:
    """Write new random pixels into ``path`` and restore its old mtime (as ``cp -p`` would)."""
    import os

    from PIL import Image

    st = path.stat()
    arr = np.random.default_rng(seed).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(arr, "RGB").save(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def test_folder_cache_and_id_follow_the_image_contents(
    image_folder: Callable[..., Path], tmp_path: Path
) -> None:
    """Replaced image contents (old mtime kept) and swapped class folders re-decode and change
    ``dataset_id`` (hence the teacher-map fingerprint); a copy elsewhere keeps the id."""
    from distill.teacher.cache import teacher_fingerprint

    root, cache = image_folder(per_class=(2, 1)), tmp_path / "cache"
    first = load_folder(root, cache)
    target = root / "train/bird/0001.png"
    _replace_keeping_mtime(target, seed=99)
    second = load_folder(root, cache)
    assert torch.equal(second.train_images[5], _pixels(target))  # not the stale decoded cache
    assert second.dataset_id != first.dataset_id
    ckpt = tmp_path / "t.ckpt"
    ckpt.write_bytes(b"w")
    prints = [
        teacher_fingerprint(ckpt, "gradcam", "block3", {}, a.dataset_id, torch.arange(20))
        for a in (first, second)
    ]
    assert prints[0] != prints[1]
    # swap the images of two classes (same file names)
    (root / "train/cat").rename(root / "train/tmp")
    (root / "train/dog").rename(root / "train/cat")
    (root / "train/tmp").rename(root / "train/dog")
    third = load_folder(root, cache)
    assert torch.equal(third.train_images[6], second.train_images[10])  # cat <- old dog
    assert third.dataset_id not in (first.dataset_id, second.dataset_id)
    sources_mod._LAST.clear()  # as in a new process, without the decoded cache: same identity
    assert load_folder(root).dataset_id == third.dataset_id
    import shutil

    moved = shutil.copytree(root, tmp_path / "elsewhere")
    assert load_folder(moved, cache).dataset_id == third.dataset_id


def test_corrupted_decoded_cache_is_rebuilt(
    image_folder: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, cache_dir = image_folder(per_class=(1, 1)), tmp_path / "cache"
    first = load_folder(root, cache_dir)
    (cache,) = cache_dir.glob("*.pt")
    blob = bytearray(cache.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped byte in the middle of the image tensors
    cache.write_bytes(bytes(blob))
    sources_mod._LAST.clear()  # as in a new process
    again = load_folder(root, cache_dir)
    assert "unusable" in capsys.readouterr().err
    assert torch.equal(again.train_images, first.train_images)
    assert again.dataset_id == first.dataset_id


def test_folder_source_through_datamodule(image_folder: Callable[..., Path]) -> None:
    dm = CIFAR10DataModule(source="folder", root=image_folder(per_class=(3, 1)), batch_size=8)
    dm.setup("fit")
    assert dm.num_train_total == 30 and len(dm.test_labels) == 10
    assert len(list(dm.train_dataloader())) == 4


def test_missing_root_error_names_the_fixes(tmp_path: Path) -> None:
    for source in ("folder", "torchvision"):
        dm = CIFAR10DataModule(source=source, root=tmp_path / "nope", download=False)
        with pytest.raises(DataError) as err:
            dm.load()
        msg = str(err.value)
        for fix in ("data.download=true", "data.source=folder data.root=", "data.source=synthetic"):
            assert fix in msg


def test_download_failure_is_a_data_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(DataError, match="(?s)download failed.*data.source=synthetic"):
        load_torchvision(tmp_path, download=True)


def test_wrong_class_set_rejected(image_folder: Callable[..., Path]) -> None:
    root = image_folder(classes=("cat", "dog", "zebra"))
    with pytest.raises(DataError, match="missing: .*airplane.*unexpected: .*zebra"):
        list_image_folder(root, "train")


@pytest.mark.parametrize(("size", "mode"), [((28, 28), "RGB"), ((32, 32), "L")])
def test_non_cifar_images_rejected(
    image_folder: Callable[..., Path], size: tuple, mode: str
) -> None:
    root = image_folder(per_class=(1, 1), size=size, mode=mode)
    with pytest.raises(DataError, match="must be 32x32 RGB"):
        load_folder(root)


def test_bad_source_name() -> None:
    with pytest.raises(DataError, match="torchvision, folder, synthetic"):
        CIFAR10DataModule(source="imagenet")


@pytest.mark.realdata
def test_shared_jpeg_copy_decodes(shared_cifar: Path) -> None:
    files, labels = list_image_folder(shared_cifar, "train")
    assert len(files) == 50_000 and labels[0] == 0 and labels[-1] == 9
    pick = [files[i * 5000] for i in range(10)] + [files[i * 5000 + 4999] for i in range(10)]
    images = decode_images(pick)
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8
    assert 30 < images.float().mean() < 220 and images.float().std() > 20
    test_files, test_labels = list_image_folder(shared_cifar, "test")
    assert (
        len(test_files) == 10_000
        and torch.bincount(torch.tensor(test_labels)).tolist() == [1000] * 10
    )
