"""Datasets as configuration: the registry, CIFAR-100 configs and sources, data.num_classes in
models and modules, per-dataset normalization, and data identities (CIFAR-10's unchanged)."""

from __future__ import annotations

import hashlib
import urllib.error
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from distill.config_checks import ConfigError, config_diff, data_key
from distill.data import (
    CIFAR10_CLASSES,
    CIFAR100_CLASSES,
    DATASETS,
    CIFAR10DataModule,
    DataError,
    denormalize_images,
    get_dataset,
    list_image_folder,
    load_folder,
    load_torchvision,
    make_synthetic,
    normalize_images,
)
from tests.conftest import CLASSES, compose_cfg, student, tiny

CONFIG_DATA = Path(__file__).resolve().parents[1] / "configs" / "data"
# published statistics (0..1 scale): attention-transfer's CIFAR-10 (125.3, 123.0, 113.9)/255,
# (63.0, 62.1, 66.7)/255; RepDistiller/mdistiller's CIFAR-100 (docs: /work/shared/REFERENCES.md)
STATS = {
    "cifar10": ((125.3 / 255, 123.0 / 255, 113.9 / 255), (63.0 / 255, 62.1 / 255, 66.7 / 255)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def ppm_tree(root: Path, classes: Sequence[str], per_class: tuple[int, int] = (2, 1)) -> Path:
    """``root/{train,test}/<class>/NNNN.ppm``: binary PPMs written byte by byte (no encoder, so
    the bytes, hence the content hash in the folder id, are the same on every machine)."""
    k = 0
    for split, n in zip(("train", "test"), per_class, strict=True):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(n):
                px = ((np.arange(32 * 32 * 3) * (k + 1) + 7 * c) % 256).astype(np.uint8)
                (d / f"{i:04d}.ppm").write_bytes(b"P6\n32 32\n255\n" + px.tobytes())
                k += 1
    return root


def ppm_pixels(path: Path) -> torch.Tensor:
    """uint8 (3, 32, 32) of a PPM written by :func:`ppm_tree` (read without PIL)."""
    raw = np.frombuffer(path.read_bytes()[len(b"P6\n32 32\n255\n") :], dtype=np.uint8)
    return torch.from_numpy(raw.reshape(32, 32, 3).copy()).permute(2, 0, 1)


def datamodule(*overrides: str) -> Any:
    """The configured datamodule (user errors unwrapped, as train.py raises them)."""
    from distill.train import instantiate

    return instantiate(compose_cfg(*overrides).data)


# ----------------------------------------------------------------------------- the registry


def test_registry_declares_cifar10_and_cifar100() -> None:
    assert set(DATASETS) >= {"cifar10", "cifar100"}
    c10, c100 = get_dataset("cifar10"), get_dataset("cifar100")
    assert get_dataset(None) is c10  # configs without data.dataset are CIFAR-10
    assert c10.classes == CLASSES and c10.num_classes == 10
    assert c100.num_classes == 100 == len(set(CIFAR100_CLASSES))
    # the fine labels are the sorted names of the archive's meta file: spot-check label ids
    assert list(CIFAR100_CLASSES) == sorted(CIFAR100_CLASSES)
    ids = {"apple": 0, "aquarium_fish": 1, "keyboard": 39, "maple_tree": 47, "worm": 99}
    assert {n: CIFAR100_CLASSES.index(n) for n in ids} == ids
    for name, (mean, std) in STATS.items():
        ds = get_dataset(name)
        assert ds.mean == pytest.approx(mean) and ds.std == pytest.approx(std)
        assert ds.image_size == 32
    assert (c10.torchvision, c100.torchvision) == ("CIFAR10", "CIFAR100")
    with pytest.raises(
        DataError, match="unknown data.dataset 'imagenet'; known: cifar10, cifar100"
    ):
        get_dataset("imagenet")


def test_every_data_config_declares_its_classes_and_everything_follows() -> None:
    """Each configs/data/*.yaml has data.dataset and data.num_classes; the student, the teacher
    and the module's metrics all get data.num_classes."""
    names = sorted(p.stem for p in CONFIG_DATA.glob("*.yaml"))
    assert {"cifar100", "cifar100_folder", "synthetic100"} <= set(names)
    for name in names:
        cfg = compose_cfg(f"data={name}")
        n = get_dataset(cfg.data.dataset).num_classes
        assert cfg.data.num_classes == n, name
        widths = (cfg.model.num_classes, cfg.teacher.model.num_classes, cfg.module.num_classes)
        assert widths == (n, n, n), name
    cfg = compose_cfg("data=cifar100")
    assert cfg.data.source == "torchvision" and cfg.data.download is True
    assert Path(cfg.data.root) == Path(cfg.paths.data_dir) / "cifar100"
    folder = compose_cfg("data=cifar100_folder")
    assert folder.data.source == "folder" and folder.data.dataset == "cifar100"
    assert Path(folder.data.root) == Path(cfg.paths.data_dir) / "cifar100-folder"
    assert hydra.utils.instantiate(cfg.model).fc.out_features == 100


# ----------------------------------------------------------------------------- normalization


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_normalization_constants_per_dataset(name: str) -> None:
    """Black and white pixels map to -mean/std and (1-mean)/std with the published constants."""
    mean, std = STATS[name]
    x = torch.zeros(1, 3, 2, 2, dtype=torch.uint8)
    x[:, :, 0, 0] = 255
    out = normalize_images(x, name)
    for c in range(3):
        assert out[0, c, 1, 1].item() == pytest.approx(-mean[c] / std[c], rel=1e-6)
        assert out[0, c, 0, 0].item() == pytest.approx((1 - mean[c]) / std[c], rel=1e-6)
    torch.testing.assert_close(denormalize_images(out, name), x.float() / 255)


def test_datamodule_batches_and_figures_use_the_dataset_statistics() -> None:
    from distill.visualize import figure_images

    mean, std = (torch.tensor(s).view(1, 3, 1, 1) for s in STATS["cifar100"])
    dm = datamodule("data=synthetic100", "data.synthetic_size=200", "data.synthetic_test_size=100")
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    raw = batch["aug"].apply(batch["image"]).float() / 255
    out = dm.transform_batch(batch)["image"]
    torch.testing.assert_close(out, (raw - mean) / std)
    fig = figure_images(dm, per_class=1, max_classes=3)
    assert fig.dataset.name == "cifar100" and fig.classes == CIFAR100_CLASSES
    torch.testing.assert_close(fig.normalized(), (fig.images.float() / 255 - mean) / std)
    ten = datamodule("data=synthetic", "data.synthetic_size=20", "data.synthetic_test_size=10")
    assert not torch.allclose(ten.normalize(fig.images), dm.normalize(fig.images))


# ----------------------------------------------------------------------------- 100 classes


def test_synthetic_100_classes_cover_every_label() -> None:
    dm = datamodule("data=synthetic100", "data.synthetic_size=200", "data.synthetic_test_size=100")
    assert dm.num_classes == 100 and dm.classes == CIFAR100_CLASSES
    for labels in (dm.train_labels, dm.test_labels):
        assert torch.bincount(labels, minlength=100).tolist() == [len(labels) // 100] * 100
    # any count on synthetic data: data=synthetic data.num_classes=N (generic class names)
    generic = datamodule("data=synthetic", "data.num_classes=100", "data.synthetic_size=100")
    assert generic.num_classes == 100 and generic.classes[99] == "class99"
    assert sorted(generic.train_labels.unique().tolist()) == list(range(100))
    with pytest.raises(DataError, match="raise data.synthetic_size"):
        datamodule("data=synthetic100", "data.synthetic_size=50").load()
    with pytest.raises(DataError, match="data.num_classes=100, but CIFAR-10 has 10 classes"):
        datamodule("data=cifar10", "data.num_classes=100")


@pytest.fixture
def teacher100(tmp_path: Path) -> Path:
    """A random 100-class WRN-10-2 saved like a Lightning checkpoint."""
    from distill.models import WideResNet

    torch.manual_seed(0)
    path = tmp_path / "teacher100.ckpt"
    state = {f"net.{k}": v for k, v in WideResNet(10, 2, 100).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"arch": "wrn10_2"}}, path)
    return path


def test_one_student_step_with_100_classes(tmp_path: Path, teacher100: Path) -> None:
    """A tiny Grad-CAM + KD student on data.num_classes=100: 100-wide logits, finite loss, every
    student parameter gets a gradient and an SGD step changes the weights."""
    cfg = tiny(
        tmp_path, teacher100, "loss=gradcam_kd", "data.num_classes=100", "data.synthetic_size=100"
    )
    module = student(cfg).train()
    assert module.net.fc.out_features == 100 and module.teacher.num_classes == 100
    assert module.train_err.num_classes == 100
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup("fit")
    batch = dm.transform_batch(next(iter(dm.train_dataloader())))
    loss, logits, terms = module.compute_loss(batch)
    assert logits.shape == (32, 100) and set(terms) == {"ce", "kd", "cam"}
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.net.parameters())
    before = module.net.fc.weight.detach().clone()
    torch.optim.SGD(module.net.parameters(), lr=0.1).step()
    assert not torch.equal(before, module.net.fc.weight)


def test_width_mismatches_are_refused(tmp_path: Path, teacher_ckpt: Path) -> None:
    from distill.models import WideResNet
    from distill.modules.classifier import ClassifierModule

    with pytest.raises(ConfigError, match="outputs 10 classes but the data has 100"):
        ClassifierModule(WideResNet(10, 1, 10), num_classes=100)
    cfg = tiny(
        tmp_path,
        teacher_ckpt,  # a 10-class teacher, built as one: refused for 100-class data
        "loss=ce_kd",
        "data.num_classes=100",
        "data.synthetic_size=100",
        "teacher.model.num_classes=10",
    )
    with pytest.raises(ConfigError, match="teacher.model .* outputs 10 classes"):
        student(cfg)


def test_num_classes_domain() -> None:
    from distill.config_checks import validate_options

    validate_options(compose_cfg("data=synthetic100"))
    with pytest.raises(ConfigError, match="data.num_classes must be an integer >= 2, got 1"):
        validate_options(compose_cfg("data=synthetic", "data.num_classes=1"))


# ----------------------------------------------------------------------------- sources


def test_cifar100_image_folder(tmp_path: Path) -> None:
    """All 100 class folders, labels in CIFAR-100 order, pixels exact, its own id and cache."""
    root = ppm_tree(tmp_path / "c100", CIFAR100_CLASSES, per_class=(1, 1))
    dm = datamodule(
        "data=cifar100_folder", f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"
    )
    dm.setup("fit")
    assert dm.classes == CIFAR100_CLASSES and dm.num_classes == 100
    assert dm.train_labels.tolist() == list(range(100)) == dm.test_labels.tolist()
    assert torch.equal(dm.train_images[39], ppm_pixels(root / "train/keyboard/0000.ppm"))
    assert dm.dataset_id.startswith("folder:cifar100:n=100:test=100:sha256=")
    (cache,) = (tmp_path / "cache").glob("*.pt")
    assert cache.name.startswith("cifar100-folder-")


def test_image_folder_must_hold_the_declared_classes(tmp_path: Path) -> None:
    subset = ppm_tree(tmp_path / "few", CIFAR100_CLASSES[:3], per_class=(1, 1))
    with pytest.raises(DataError) as err:
        list_image_folder(subset, "train", "cifar100")
    msg = str(err.value)
    assert "exactly the 100 CIFAR-100 class folders" in msg
    assert "missing: ['bear', 'beaver'" in msg and "(+87 more)" in msg  # 97 missing, 10 shown
    assert "unexpected: none" in msg
    ten = ppm_tree(tmp_path / "ten", CLASSES, per_class=(1, 1))
    with pytest.raises(DataError, match="unexpected: .*'airplane'"):
        load_folder(ten, dataset="cifar100")  # a CIFAR-10 copy is no CIFAR-100 copy


class FakeTorchvision:
    """Stands in for a torchvision dataset class: records its calls, or fails like offline."""

    calls: list[tuple[str, bool, bool]] = []
    offline = False
    classes: Sequence[str] = ()

    def __init__(self, root: str, train: bool = True, download: bool = False) -> None:
        type(self).calls.append((root, train, download))
        if type(self).offline:
            raise urllib.error.URLError("[Errno -2] Name or service not known")
        n = 4 if train else 2
        self.data = np.full((n, 32, 32, 3), 7, dtype=np.uint8)
        self.targets = [i % len(self.classes) for i in range(n)]


def fake(classes: Sequence[str], offline: bool = False) -> type[FakeTorchvision]:
    return type("Fake", (FakeTorchvision,), {"calls": [], "offline": offline, "classes": classes})


def test_cifar100_download_path_and_offline_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """data=cifar100 downloads torchvision's CIFAR100 into its root; offline it is one paragraph
    naming the three ways out, as CIFAR-10's."""
    import torchvision.datasets

    online = fake(CIFAR100_CLASSES)
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", online)
    dm = datamodule("data=cifar100", f"data.root={tmp_path}")
    assert dm.dataset_id == "torchvision:cifar100" and dm.classes == CIFAR100_CLASSES
    assert online.calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake(CIFAR100_CLASSES, offline=True))
    with pytest.raises(DataError) as err:
        datamodule("data=cifar100", f"data.root={tmp_path}").load()
    msg = str(err.value)
    assert msg.startswith(f"CIFAR-100 not found at '{tmp_path}' (download failed: ")
    for fix in (
        "data.download=true",
        "data.source=folder data.root=PATH",
        "data=cifar100_folder: data/cifar100-folder",
        "data.source=synthetic",
        "data=synthetic100",
    ):
        assert fix in msg
    assert "\n\n" not in msg and "Traceback" not in msg
    monkeypatch.setattr(torchvision.datasets, "CIFAR100", fake(CLASSES))
    with pytest.raises(DataError, match="other classes than CIFAR-100"):
        load_torchvision(tmp_path, True, "cifar100")


def test_cifar100_without_download_names_the_options(tmp_path: Path) -> None:
    """The real torchvision class, no network needed: nothing at the root, download off."""
    with pytest.raises(DataError) as err:
        datamodule("data=cifar100", f"data.root={tmp_path}", "data.download=false").load()
    msg = str(err.value)
    assert "CIFAR-100 not found" in msg and "(download disabled)" in msg
    assert "data=cifar100_folder" in msg and "data=synthetic100" in msg


# ----------------------------------------------------------------------------- identities

# Regression values: computed at commit ed8bff2 (before datasets were configurable) with the same
# calls (compose_cfg + data_key, teacher.run_name, make_synthetic, load_folder of ppm_tree); the
# CIFAR-10 data keys, ids and caches of existing runs must stay exactly these.
OLD_KEYS = {
    ("data=cifar10", "data.root=/fixed/cifar10"): "5c361f71",
    ("data=cifar10_folder", "data.root=/fixed/cifar10-jpeg"): "6b1f4931",
    ("data=synthetic",): "f167f1c0",
    ("data=synthetic", "data.train_subset=100", "data.val_size=20"): "27ca2ab7",
}
OLD_TEACHER_RUN = "wrn40_2-synthetic-subNone-e200-s0-df167f1c0"
OLD_SYNTHETIC_ID = "synthetic:n=1000:test=500:seed=0"
OLD_SYNTHETIC_SHA256 = "f1359c8160a93f071ffe2910ca636b718d5ee1dc2cde875c01a7d777c42219ed"
OLD_FOLDER_ID = "folder:n=20:test=10:sha256=d7cd8e6b114074b8"


def _key(*overrides: str) -> str:
    return data_key(OmegaConf.to_container(compose_cfg(*overrides).data, resolve=True))


def test_cifar10_identities_are_unchanged(tmp_path: Path) -> None:
    for overrides, key in OLD_KEYS.items():
        assert _key(*overrides) == key, overrides
    assert compose_cfg("data=synthetic").teacher.run_name == OLD_TEACHER_RUN
    assert CIFAR10DataModule(source="synthetic").dataset_id == OLD_SYNTHETIC_ID
    a = make_synthetic(100, 50, 0)
    digest = hashlib.sha256()
    for t in (a.train_images, a.train_labels, a.test_images, a.test_labels):
        digest.update(t.numpy().tobytes())
    assert digest.hexdigest() == OLD_SYNTHETIC_SHA256 and a.classes == CIFAR10_CLASSES
    root = ppm_tree(tmp_path / "tree", CLASSES)
    arrays = load_folder(root, tmp_path / "cache")
    assert arrays.dataset_id == OLD_FOLDER_ID
    where = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    assert [p.name for p in (tmp_path / "cache").glob("*.pt")] == [f"cifar10-folder-{where}.pt"]


def test_other_datasets_get_other_identities(tmp_path: Path) -> None:
    from distill.teacher.cache import teacher_fingerprint
    from distill.teacher.memo import memo_fingerprint

    keys = {
        _key("data=cifar10", "data.root=/fixed/x"),
        _key("data=cifar100", "data.root=/fixed/x"),  # same root, other dataset
        _key("data=cifar100_folder", "data.root=/fixed/x"),
        _key("data=synthetic"),
        _key("data=synthetic100"),
        _key("data=synthetic", "data.num_classes=100"),
    }
    assert len(keys) == 6
    runs = {compose_cfg(f"data={d}").teacher.run_name for d in ("synthetic", "synthetic100")}
    assert len(runs) == 2
    ids = [
        make_synthetic(200, 100).dataset_id,
        make_synthetic(200, 100, dataset="cifar100").dataset_id,
        make_synthetic(200, 100, num_classes=100).dataset_id,
    ]
    assert ids[1:] == [
        "synthetic:n=200:test=100:seed=0:cifar100:classes=100",
        "synthetic:n=200:test=100:seed=0:cifar10:classes=100",
    ]
    ckpt = tmp_path / "t.ckpt"
    ckpt.write_bytes(b"w")
    prints = [teacher_fingerprint(ckpt, "gradcam", "block3", {}, i, torch.arange(9)) for i in ids]
    memos = [memo_fingerprint("aa", i, 200, 4, "32-true") for i in ids]
    assert len({str(p) for p in prints}) == 3 and len({str(m) for m in memos}) == 3


def test_runs_saved_before_datasets_were_configurable_still_match() -> None:
    """A run directory's saved config without data.dataset / num_classes is CIFAR-10 with 10
    classes: a rerun with today's CIFAR-10 config is not a changed config; CIFAR-100 is."""
    old = {"data": {"source": "synthetic"}, "module": {"lr": 0.1}, "model": {"num_classes": 10}}
    new10 = {
        "data": {"source": "synthetic", "dataset": "cifar10", "num_classes": 10},
        "module": {"lr": 0.1, "num_classes": 10},
        "model": {"num_classes": 10},
    }
    assert config_diff(old, new10) == []
    new100 = {
        "data": {"source": "synthetic", "dataset": "cifar100", "num_classes": 100},
        "module": {"lr": 0.1, "num_classes": 100},
        "model": {"num_classes": 100},
    }
    assert config_diff(old, new100) == [
        "data.dataset",
        "data.num_classes",
        "model.num_classes",
        "module.num_classes",
    ]
