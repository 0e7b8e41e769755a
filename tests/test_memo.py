"""The teacher-output memo (distill.teacher.memo): exact per (image, view), shared by runs with the
same teacher, safe with parallel writers, kills and full disks, off when it could not be exact."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from distill.data.augment import AugParams, normalize_images
from distill.presets import table_methods
from distill.teacher import CacheError
from distill.teacher.memo import TeacherMemo, memo_fingerprint, num_views, view_ids, view_params
from distill.train import train
from tests.conftest import REPO_ROOT, student, tiny

METHODS = table_methods()[1:]
FAST = {  # cheap teacher settings of the sampled / per-channel methods (still exact per view)
    "shapcam": ["++loss.teacher_cam.n_permutations=16", "++loss.teacher_cam.seed=3"],
    "scorecam": ["++loss.teacher_cam.max_channels=8"],
}


class Data:
    """The datamodule facts the memo reads."""

    dataset_id, num_train_total, view_pad = "test-images", 6, 4


def _images(n: int = 6) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), generator=torch.Generator().manual_seed(0)).to(
        torch.uint8
    )


def _batch(images: torch.Tensor, index: list[int], aug: AugParams) -> dict:
    idx = torch.tensor(index)
    return {
        "image": normalize_images(aug.apply(images[idx])),
        "label": idx % 10,
        "index": idx,
        "aug": aug,
    }


def _aug(dy: list[int], dx: list[int], flip: list[int]) -> AugParams:
    return AugParams(torch.tensor(dy), torch.tensor(dx), torch.tensor(flip).bool())


def test_views_enumerate_every_crop_and_flip_once() -> None:
    side = torch.arange(9)
    dy, dx, flip = torch.meshgrid(side, side, torch.tensor([0, 1]), indexing="ij")
    aug = AugParams(dy.flatten(), dx.flatten(), flip.flatten().bool())
    ids = view_ids(aug, len(aug), pad=4)
    assert num_views(4) == 162
    assert sorted(ids.tolist()) == list(range(162))
    assert view_ids(None, 3, pad=4).tolist() == view_ids(AugParams.identity(3), 3, 4).tolist()


@pytest.mark.parametrize("method", METHODS)
def test_memo_hit_equals_the_online_computation(tmp_path, teacher_ckpt, method) -> None:
    overrides = ["++loss.teacher_maps=online", *FAST.get(method, [])]
    cfg = tiny(tmp_path, teacher_ckpt, f"loss={method}_kd", *overrides)
    images = _images()
    first = _batch(images, [0, 1, 2, 3], _aug([0, 4, 8, 2], [1, 4, 0, 7], [1, 0, 0, 1]))
    # the same (index, view) pairs in another order and batch, plus two new views
    second = _batch(
        images, [3, 5, 0, 1, 2, 1], _aug([2, 3, 0, 4, 8, 5], [7, 3, 1, 4, 0, 5], [1, 0, 1, 0, 0, 1])
    )
    online = student(cfg).teacher
    filler = student(cfg).teacher
    filler.enable_memo(Data(), "32-true")
    filler.outputs(first, need_logits=True)
    assert filler.memo_hit_rate() == 0.0
    reader = student(cfg).teacher  # another run with the same teacher
    reader.enable_memo(Data(), "32-true")
    logits, maps = reader.outputs(second, need_logits=True)
    assert reader.memo_hit_rate() == pytest.approx(4 / 6)
    want_logits, want_maps = online.outputs(second, need_logits=True)
    torch.testing.assert_close(logits, want_logits.float(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(maps, want_maps, rtol=1e-5, atol=1e-6)
    again = reader.outputs(second, need_logits=True)  # every view is in the memo now
    assert reader.memo_hit_rate() == 1.0
    torch.testing.assert_close(again[1], maps, rtol=0, atol=0)


def _memo_hit_rates(run_dir: Path) -> list[float]:
    with open(next(run_dir.glob("csv/**/metrics.csv"))) as fh:
        rows = list(csv.DictReader(fh))
    return [float(r["teacher/memo_hit_rate"]) for r in rows if r.get("teacher/memo_hit_rate")]


def test_runs_with_the_same_seed_share_the_teacher_memo(tmp_path, teacher_ckpt, monkeypatch):
    """The (index, view) stream depends on the seed only, not on the preset: the first run of a
    seed fills the memo, the other presets of that seed hit it on every sample."""
    from distill.modules.student import StudentModule

    streams: dict[str, list[list[tuple[int, int]]]] = {}
    original = StudentModule.training_step

    def recording(self, batch, batch_idx):
        views = view_ids(batch["aug"], len(batch["label"]), 4)
        pairs = list(zip(batch["index"].tolist(), views.tolist(), strict=True))
        streams.setdefault(self.loss_cfg.name, []).append(pairs)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(StudentModule, "training_step", recording)
    presets = ["gradcam", "ce_kd", "shapleycam_kd", "shapcam_kd", "gradcam_kd"]
    for preset in presets:
        extra = ["++loss.teacher_cam.n_permutations=16"] if preset.startswith("shapcam") else []
        if preset.startswith("shapcam"):
            extra.append("++loss.teacher_maps=online")
        cfg = tiny(tmp_path, teacher_ckpt, f"loss={preset}", "trainer.max_epochs=2", *extra)
        cfg.run_name = preset
        train(cfg)
    for preset in presets[1:]:
        assert streams[preset] == streams["gradcam"], preset
    rates = {p: _memo_hit_rates(tmp_path / "train" / p) for p in presets}
    assert rates["gradcam"][0] == 0.0
    assert rates["ce_kd"] == [1.0, 1.0]  # logits came with gradcam's maps
    assert rates["gradcam_kd"] == [1.0, 1.0]
    assert rates["shapleycam_kd"] == [0.0, 0.0]  # its maps are another table
    other_seed = tiny(tmp_path, teacher_ckpt, "loss=gradcam_kd", "seed=7")
    other_seed.run_name = "seed7"
    train(other_seed)
    assert _memo_hit_rates(tmp_path / "train" / "seed7")[0] < 1.0


def test_memo_of_another_teacher_is_refused_with_the_fix(tmp_path, teacher_ckpt) -> None:
    memo_dir = tmp_path / "shared_memo"
    cfg = tiny(tmp_path, teacher_ckpt, "loss=gradcam_kd", f"loss.memo_dir={memo_dir}")
    student(cfg).teacher.enable_memo(Data(), "32-true")
    with pytest.raises(CacheError, match="loss.memo_dir") as err:
        student(cfg).teacher.enable_memo(Data(), "bf16-mixed")
    assert "precision" in str(err.value)
    other = tmp_path / "other.ckpt"
    state = torch.load(teacher_ckpt, weights_only=False)
    state["state_dict"] = {k: v + 1 for k, v in state["state_dict"].items()}
    torch.save(state, other)
    cfg = tiny(tmp_path, other, "loss=gradcam_kd", f"loss.memo_dir={memo_dir}")
    with pytest.raises(CacheError, match="teacher_sha256"):
        student(cfg).teacher.enable_memo(Data(), "32-true")


def test_augmentation_outside_the_view_set_turns_the_memo_off(tmp_path, teacher_ckpt) -> None:
    rotation = "[{_target_:torchvision.transforms.v2.RandomRotation,degrees:30}]"
    cfg = tiny(tmp_path, teacher_ckpt, "loss=gradcam_kd", f"data.extra_augment={rotation}")
    with pytest.warns(UserWarning, match="teacher memo off: the training augmentation"):
        train(cfg)
    run_dir = next((tmp_path / "train").iterdir())
    assert _memo_hit_rates(run_dir) == []
    assert not (tmp_path / "memo").exists()


WRITER = textwrap.dedent(
    """
    import json, sys, torch
    from distill.teacher.memo import TeacherMemo
    memo = TeacherMemo(sys.argv[1], json.loads(sys.argv[3]))
    table = memo.table("t", 64, {"kind": "test"})
    gen = torch.Generator().manual_seed(int(sys.argv[2]))
    print("ready", flush=True)
    while True:
        rows = torch.randint(0, memo.rows, (32,), generator=gen).unique()
        values = rows[:, None].float() + torch.arange(64) / 64
        memo.store({table: values}, rows)
    """
)


def _fingerprint() -> dict:
    return memo_fingerprint("ab" * 32, "test-images", 40, 4, "32-true")


def _check_filled_rows(directory: Path) -> int:
    memo = TeacherMemo(directory, _fingerprint())
    table = memo.table("t", 64, {"kind": "test"})
    rows = torch.arange(memo.rows)
    filled, values, damaged = table.read(rows)
    assert damaged == 0
    want = rows[filled][:, None].float() + torch.arange(64) / 64
    torch.testing.assert_close(values[filled], want, rtol=0, atol=0)
    return int(filled.sum())


def test_parallel_writers_killed_leave_only_finished_entries(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path), str(seed), json.dumps(_fingerprint())],
            stdout=subprocess.PIPE,
            env=env,
        )
        for seed in (1, 2)
    ]
    for proc in procs:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    time.sleep(1.5)
    for proc in procs:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    filled = _check_filled_rows(tmp_path)
    assert 0 < filled <= 40 * 162


def test_full_disk_stops_writing_without_marking_entries(tmp_path: Path) -> None:
    """A file-size limit makes ``pwrite`` fail past 40 rows of values (EFBIG, as ENOSPC would):
    the run goes on with one warning, and only rows whose values were written are marked."""
    fp = json.dumps(_fingerprint())
    script = textwrap.dedent(
        f"""
        import json, resource, signal, warnings, torch
        from distill.teacher.memo import TeacherMemo
        memo = TeacherMemo({str(tmp_path)!r}, json.loads({fp!r}))
        table = memo.table("t", 64, {{"kind": "test"}})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (40 * 64 * 4, resource.RLIM_INFINITY))
        rows = torch.arange(0, 200, 3)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            memo.store({{table: rows[:, None].float() + torch.arange(64) / 64}}, rows)
            memo.store({{table: rows[:, None].float() + torch.arange(64) / 64}}, rows)
        print(len(caught), memo.writable, str(caught[0].message))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True
    )
    count, writable, message = out.stdout.split(" ", 2)
    assert (count, writable) == ("1", "False")
    assert "cannot write" in message
    assert _check_filled_rows(tmp_path) == len(range(0, 40, 3))


def test_precompute_fills_every_view_and_training_hits_it(tmp_path, teacher_ckpt) -> None:
    from distill.precompute import precompute

    cfg = tiny(tmp_path, teacher_ckpt, "loss=gradcam_kd", "data.synthetic_size=16")
    memo_dir = Path(precompute(cfg))
    flags = [(memo_dir / f"{name}").read_bytes() for name in os.listdir(memo_dir)]
    assert any(name.startswith("maps-gradcam") for name in os.listdir(memo_dir))
    train_rows = 16 * 162  # synthetic indices 0..15: every view of every image is filled
    assert all(
        sum(f[:train_rows]) == train_rows
        for f, name in zip(flags, os.listdir(memo_dir), strict=True)
        if name.endswith(".filled")
    )
    train(cfg)
    run_dir = next((tmp_path / "train").iterdir())
    assert _memo_hit_rates(run_dir) == [1.0]


def test_view_params_invert_view_ids() -> None:
    views = torch.arange(162)
    assert view_ids(view_params(views, 4), 162, 4).tolist() == views.tolist()


def test_cached_maps_with_memo_logits(tmp_path, teacher_ckpt) -> None:
    """Shap-CAM's presets: maps from the offline cache (aligned), KD logits from the memo."""
    from distill.teacher import align_maps

    cfg = tiny(tmp_path, teacher_ckpt, "loss=shapcam_kd")
    teacher = student(cfg).teacher
    teacher.cached_maps = torch.rand(6, 8, 8, generator=torch.Generator().manual_seed(1))
    teacher.cache_position = torch.arange(6)
    teacher.enable_memo(Data(), "32-true")
    batch = _batch(_images(), [4, 0, 2], _aug([0, 8, 3], [2, 4, 8], [0, 1, 1]))
    for _ in range(2):  # a miss, then a hit
        logits, maps = teacher.outputs(batch, need_logits=True)
        torch.testing.assert_close(maps, align_maps(teacher.cached_maps[[4, 0, 2]], batch["aug"]))
        torch.testing.assert_close(logits, teacher.logits(batch["image"]), rtol=1e-5, atol=1e-6)
    assert teacher.memo_hit_rate() == 0.5
