"""Teacher-map cache: resumable shards, fingerprint/corruption refusal, augmentation alignment."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from distill.data.augment import AugParams
from distill.teacher.cache import CacheError, MapCache, align_maps, teacher_fingerprint


def pooled_map(images: torch.Tensor) -> torch.Tensor:
    """A 'teacher' whose 8x8 map is the 4x4 block average of a per-pixel function of the image."""
    per_pixel = torch.tanh(images.float().mean(1, keepdim=True))
    return F.avg_pool2d(per_pixel, 4).squeeze(1)


def make_cache(tmp_path, n=10, shard=4, **fp):
    fingerprint = {"method": "toy", "seed": 0, **fp}
    return MapCache(tmp_path / "cache", fingerprint, num_samples=n, shard_size=shard)


def test_build_then_load_roundtrip(tmp_path):
    images = torch.randn(10, 3, 32, 32)
    labels = torch.arange(10)
    cache = make_cache(tmp_path)
    cache.build(lambda x, y: pooled_map(x), images, labels, batch_size=3, progress=False)
    torch.testing.assert_close(cache.load(), pooled_map(images))


def test_resume_recomputes_only_missing_shards(tmp_path):
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10)
    cache = make_cache(tmp_path)
    cache.build(lambda x, y: pooled_map(x), images, labels, progress=False)
    (cache.directory / cache.shard_name(4)).unlink()  # as if interrupted before this shard
    seen: list[int] = []

    def compute(x, y):
        seen.extend(y.tolist())
        return pooled_map(x)

    with pytest.raises(CacheError, match="incomplete"):
        cache.load()
    cache.build(compute, images, labels, progress=False)
    assert seen == [4, 5, 6, 7]
    torch.testing.assert_close(cache.load(), pooled_map(images))


def test_interrupted_build_keeps_finished_shards(tmp_path):
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10)
    cache = make_cache(tmp_path)

    def dies_on_second_shard(x, y):
        if y.min() >= 4:
            raise KeyboardInterrupt
        return pooled_map(x)

    with pytest.raises(KeyboardInterrupt):
        cache.build(dies_on_second_shard, images, labels, progress=False)
    assert cache.missing_shards() == [(4, 8), (8, 10)]


def test_refuses_other_fingerprint(tmp_path):
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10)
    make_cache(tmp_path).build(lambda x, y: pooled_map(x), images, labels, progress=False)
    with pytest.raises(CacheError, match="seed: cache=0 vs run=1"):
        make_cache(tmp_path, seed=1).load()
    with pytest.raises(CacheError, match="another configuration"):
        make_cache(tmp_path, seed=1).build(lambda x, y: pooled_map(x), images, labels)


def test_fingerprint_ignores_execution_options(tmp_path):
    ckpt = tmp_path / "teacher.ckpt"
    ckpt.write_bytes(b"weights")

    def fingerprint(**options):
        return teacher_fingerprint(ckpt, "shapcam", "block3", options, "cifar10", torch.arange(4))

    same = fingerprint(n_permutations=10, chunk_size=64, num_threads=None, batch_size=8)
    assert same == fingerprint(n_permutations=10)
    assert fingerprint(n_permutations=10) != fingerprint(n_permutations=11)


def test_refuses_corrupted_or_truncated_shard(tmp_path):
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10)
    cache = make_cache(tmp_path)
    cache.build(lambda x, y: pooled_map(x), images, labels, progress=False)
    shard = cache.directory / cache.shard_name(0)
    shard.write_bytes(shard.read_bytes()[:-20])
    with pytest.raises(CacheError, match="corrupted"):
        cache.load()


def test_refuses_corrupted_manifest_and_wrong_size(tmp_path):
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10)
    cache = make_cache(tmp_path)
    cache.build(lambda x, y: pooled_map(x), images, labels, progress=False)
    bigger = MapCache(cache.directory, cache.fingerprint, num_samples=11, shard_size=4)
    with pytest.raises(CacheError, match="holds 10 samples"):
        bigger.load()
    (cache.directory / "manifest.json").write_text("{not json")
    with pytest.raises(CacheError, match="manifest"):
        cache.load()


def test_refuses_non_finite_maps(tmp_path):
    images, labels = torch.randn(4, 3, 32, 32), torch.arange(4)
    cache = make_cache(tmp_path, n=4)
    with pytest.raises(CacheError, match="non-finite"):
        cache.build(lambda x, y: pooled_map(x) * float("nan"), images, labels, progress=False)


def block_constant_images(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    small = torch.randn(n, 3, 8, 8, generator=gen)
    return F.interpolate(small, scale_factor=4, mode="nearest")


def test_alignment_exact_for_block_constant_images():
    """Cached map -> nearest up -> crop/flip -> area down == map of the augmented image."""
    images = block_constant_images(64)
    aug = AugParams.sample(64, generator=torch.Generator().manual_seed(1))
    cached = align_maps(pooled_map(images), aug, mode="nearest")
    direct = pooled_map(aug.apply(images))
    torch.testing.assert_close(cached, direct, rtol=0, atol=1e-6)


def test_alignment_exact_in_the_interior_for_linear_maps():
    """Default alignment (nearest up, area down) interpolates cells linearly: exact for maps that
    are linear in position away from the reflected border; bilinear upsampling smooths twice."""
    ramp = torch.linspace(-1, 1, 32)
    images = (ramp[None, :] + 0.5 * ramp[:, None]).expand(16, 3, 32, 32).clone()
    images = images * torch.linspace(0.5, 1.5, 16).view(16, 1, 1, 1)

    def linear_map(x):
        return F.avg_pool2d(x.mean(1, keepdim=True), 4).squeeze(1)

    aug = AugParams.sample(16, generator=torch.Generator().manual_seed(2))
    direct = linear_map(aug.apply(images))
    interior = (slice(None), slice(1, -1), slice(1, -1))
    nearest = align_maps(linear_map(images), aug) - direct
    bilinear = align_maps(linear_map(images), aug, mode="bilinear") - direct
    assert nearest[interior].abs().max() < 1e-5
    assert bilinear[interior].abs().max() > 1e-2  # the reason nearest is the default
    assert nearest.abs().max() < 0.1  # border cells: reflection of the map, not of the image


def test_identity_and_flip_alignment_exact_for_any_map():
    maps = torch.randn(5, 8, 8)
    assert torch.equal(align_maps(maps, None), maps)
    ident = AugParams.identity(5)
    torch.testing.assert_close(align_maps(maps, ident, mode="nearest"), maps)
    flip = AugParams.identity(5)
    flip.flip[:] = True
    torch.testing.assert_close(align_maps(maps, flip, mode="nearest"), maps.flip(-1))


def test_manifest_records_checksums(tmp_path):
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10)
    cache = make_cache(tmp_path)
    cache.build(lambda x, y: pooled_map(x), images, labels, progress=False)
    manifest = json.loads((cache.directory / "manifest.json").read_text())
    assert sorted(int(k) for k in manifest["shards"]) == [0, 4, 8]
    assert all(len(e["sha256"]) == 64 for e in manifest["shards"].values())


def test_build_recomputes_a_corrupted_shard(tmp_path, capsys):
    """A shard whose bytes changed after it was written is recomputed by the next build (with a
    note), not reported as ready."""
    images, labels = torch.randn(10, 3, 32, 32), torch.arange(10)
    cache = make_cache(tmp_path)
    cache.build(lambda x, y: pooled_map(x), images, labels, progress=False)
    shard = cache.directory / cache.shard_name(4)
    blob = bytearray(shard.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    shard.write_bytes(bytes(blob))
    assert cache.corrupted_shards() == [(4, 8)]
    seen: list[int] = []

    def compute(x, y):
        seen.extend(y.tolist())
        return pooled_map(x)

    cache.build(compute, images, labels, progress=False)
    assert seen == [4, 5, 6, 7] and "corrupted" in capsys.readouterr().err
    torch.testing.assert_close(cache.load(), pooled_map(images))
