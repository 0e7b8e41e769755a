"""Shared fixtures and helpers: repository paths, the shared CIFAR-10 copy, tiny image folders,
subprocesses, config composition (``compose_cfg``), the seconds-scale student config (``TINY``,
``tiny``, fixture ``tiny_cfg``) and building the configured student (``student``)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

# pytest-xdist (`-n auto` in pyproject): one share of the cores per worker, set before torch is
# imported (here and in the subprocesses tests start), so that workers do not oversubscribe them
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO_ROOT.parent / "shared" / "data" / "cifar10-jpeg"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_cifar() -> Path:
    """The shared JPEG CIFAR-10 copy (../shared/data/cifar10-jpeg); skips the test when absent."""
    if not (SHARED_CIFAR / "train").is_dir():
        pytest.skip(f"shared CIFAR-10 copy not found at {SHARED_CIFAR}")
    return SHARED_CIFAR


def write_image_folder(
    root: Path,
    per_class: tuple[int, int] = (2, 1),
    classes: Sequence[str] = CLASSES,
    size: tuple[int, int] = (32, 32),
    mode: str = "RGB",
    seed: int = 0,
) -> Path:
    """Write a tiny lossless (PNG) image folder ``root/{train,test}/<class>/NNNN.png``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    for split, n in zip(("train", "test"), per_class, strict=True):
        for name in classes:
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
                Image.fromarray(arr.squeeze(-1) if channels == 1 else arr, mode).save(
                    d / f"{i:04d}.png"
                )
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``image_folder(**kwargs)`` writes a tiny image folder under tmp_path."""

    def make(name: str = "cifar", **kwargs: object) -> Path:
        return write_image_folder(tmp_path / name, **kwargs)  # type: ignore[arg-type]

    return make


def run_python(
    args: Sequence[str], cwd: Path = REPO_ROOT, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run ``python <args>`` in a clean-ish environment (no wandb network, no Hydra full errors)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "HYDRA_"))}
    env.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"})
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@pytest.fixture(scope="session")
def teacher_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random WRN-10-2 saved like a Lightning checkpoint (``net.*`` keys): a fast teacher."""
    import torch

    from distill.models import WideResNet

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.ckpt"
    state = {f"net.{k}": v for k, v in WideResNet(10, 2).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"arch": "wrn10_2"}}, path)
    return path


# ----------------------------------------------------------------------------- configs

TINY = [  # a seconds-scale student run on synthetic data
    "data=synthetic",
    "data.synthetic_size=64",
    "data.synthetic_test_size=32",
    "data.batch_size=32",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "print_config=false",
    "teacher.model.depth=10",
    "loss.agreement_batches=1",
]
# what tiny() adds: the test-set fidelity pass and the CAM figure (0.6-1.4 s a run) are tested on
# their own (tests/test_fidelity.py, test_visualize.py, test_student.py), which turn them on
QUIET = ["callbacks.fidelity.enabled=false", "loss.grid_every_n_epochs=0"]
FIDELITY_ON = "callbacks.fidelity.enabled=true"


def compose_cfg(*overrides: str, hydra: bool = False) -> Any:
    """``train.yaml`` composed with ``overrides`` (with the ``hydra`` node when ``hydra``)."""
    from hydra import compose, initialize_config_dir

    from distill.train import CONFIG_DIR

    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=hydra)


def tiny(tmp_path: Path, ckpt: Path, *extra: str) -> Any:
    """The TINY student config writing under ``tmp_path`` with teacher checkpoint ``ckpt``,
    without the fidelity pass and the CAM figure (:data:`QUIET`; kept when ``extra`` picks the
    callbacks group, which may not have them)."""
    quiet = [] if any(o.startswith("callbacks=") for o in extra) else QUIET
    return compose_cfg(
        *TINY,
        *quiet,
        f"paths.log_dir={tmp_path}",
        f"teacher.checkpoint={ckpt}",
        f"module.cache_root={tmp_path}/cache",
        f"module.memo_root={tmp_path}/memo",
        *extra,
    )


@pytest.fixture
def tiny_cfg(tmp_path: Path, teacher_ckpt: Path) -> Callable[..., Any]:
    """Factory: ``tiny_cfg(*overrides)`` is :func:`tiny` for this test's tmp_path and teacher."""
    return lambda *extra: tiny(tmp_path, teacher_ckpt, *extra)


def student(cfg: Any) -> Any:
    """Instantiate the configured student; re-raise the error Hydra wraps, as train.py does."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(cfg.module, net=hydra.utils.instantiate(cfg.model))
    except InstantiationException as err:
        raise err.__cause__ or err from None
