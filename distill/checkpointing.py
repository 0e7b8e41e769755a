"""Resume points that survive kills: atomic, checksummed checkpoints written often enough.

* :class:`ChecksummedCheckpointIO` — every checkpoint Lightning writes (``last.ckpt``, SLURM's
  ``hpc_ckpt_N.ckpt``, the final one) goes through :func:`distill.integrity.atomic_write` and gets a
  ``X.sha256`` sidecar; every checkpoint it loads is verified first.
* :class:`ResumeCheckpoint` — keeps ``<run_dir>/checkpoints/last.ckpt`` current: at every epoch end,
  every ``every_n_train_steps`` steps and every ``every_n_minutes`` minutes inside an epoch, and
  when the run is stopped by SIGTERM, SIGINT (Ctrl+C) or SLURM's pre-emption signal.
* :func:`verify_checkpoint`, :func:`find_resume_checkpoint` — what ``ckpt_path=auto`` resumes.

A SIGINT/SIGTERM does not stop the process at once: Lightning finishes the current batch, the
checkpoint is written at that clean point, and :class:`RunInterrupted` is raised (exit 130 / 143).
A second Ctrl+C stops immediately (without a new checkpoint).
"""

from __future__ import annotations

import hashlib
import io
import re
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from distill.integrity import (
    IntegrityError,
    atomic_write,
    checksum_path,
    sha256_file,
    verify_checksum,
    write_checksum,
)

__all__ = [
    "ChecksummedCheckpointIO",
    "ResumeCheckpoint",
    "RunInterrupted",
    "find_resume_checkpoint",
    "verify_checkpoint",
]

TRUST_HINT = (
    "if you trust the file, record its checksum with "
    "python -c \"from distill.integrity import write_checksum; write_checksum('{path}')\""
)


class RunInterrupted(RuntimeError):
    """Training was stopped by a signal after saving a resume point; ``exit_code`` is 128+signum."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# ----------------------------------------------------------------------------- files


def verify_checkpoint(path: str | Path, fix: str) -> str:
    """SHA-256 of checkpoint ``path`` after checking it against its sidecar.

    Accepts the one torn state a kill can leave (sidecar ``"<new> <old>"`` written, rename of the
    new checkpoint not done yet: the file matches ``<old>``). Raises :class:`IntegrityError` naming
    the path and ``fix`` on a mismatch or a missing sidecar.
    """
    try:
        return str(verify_checksum(path, required=True, fix=fix))
    except IntegrityError as err:
        side = checksum_path(path)
        previous = side.read_text().split()[1:] if side.is_file() else []
        if not side.is_file():
            raise IntegrityError(f"{err}; {TRUST_HINT.format(path=path)}") from None
        digest = sha256_file(path)
        if digest in previous:
            return digest
        raise


class ChecksummedCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose saves are atomic and checksummed and whose loads are verified.

    Save order: serialize in memory, write the sidecar as ``"<new digest> <old digest>"``, rename
    the new file into place, rewrite the sidecar as ``"<new digest>"``. A kill at any point leaves
    a pair that :func:`verify_checkpoint` accepts (the old checkpoint or the new one).
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        if storage_options is not None:
            raise TypeError("ChecksummedCheckpointIO does not take storage_options")
        path = Path(path)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        data = buffer.getbuffer()
        digest = hashlib.sha256(data).hexdigest()
        side = checksum_path(path)
        # every digest the current file may have (more than one only after a torn save)
        old = side.read_text().split() if side.is_file() and path.is_file() else []
        pending = " ".join(dict.fromkeys([digest, *old])) + "\n"
        atomic_write(side, lambda fh: fh.write(pending.encode()))
        atomic_write(path, lambda fh: fh.write(data))
        write_checksum(path, digest)  # the bytes just written: no second read of the file

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> Any:
        verify_checkpoint(path, fix="resume another checkpoint or start fresh (ckpt_path=null)")
        return super().load_checkpoint(path, *args, **kwargs)

    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        checksum_path(path).unlink(missing_ok=True)


_HPC = re.compile(r"hpc_ckpt_\d+\.ckpt")


def find_resume_checkpoint(run_dir: Path) -> Path | None:
    """The newest resume point of a run: ``checkpoints/last.ckpt`` or a SLURM ``hpc_ckpt_N.ckpt``
    (written by Lightning on the requeue signal), by modification time; None if there is none."""
    candidates = [run_dir / "checkpoints" / "last.ckpt"]
    candidates += [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if _HPC.fullmatch(p.name)]
    found = [p for p in candidates if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


# ----------------------------------------------------------------------------- callback

_EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class ResumeCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that keeps one resume point, ``<dirpath>/last.ckpt``, always current.

    Args:
        dirpath: the checkpoint folder (``<run_dir>/checkpoints``).
        every_n_minutes: also save inside an epoch when this much wall time has passed since the
            last save (None or 0: only at epoch ends).
        every_n_train_steps: also save every this many optimizer steps (0: off).

    Saves at every epoch end (in ``on_train_epoch_end``: after validation and the module's own
    epoch-end hook), at the intervals above, and when Lightning stops on SIGTERM (SLURM
    pre-emption included) or SIGINT, which this callback turns into the same graceful stop at the
    end of the current batch. The intervals skip an epoch's last batch: the epoch-end save
    follows, and a resume point taken there (before validation) would skip the rest of the epoch.
    """

    def __init__(
        self,
        dirpath: str,
        every_n_minutes: float | None = 30.0,
        every_n_train_steps: int = 0,
    ) -> None:
        super().__init__(
            dirpath=dirpath,
            monitor=None,
            save_last=True,
            save_top_k=0,
            enable_version_counter=False,
            save_on_train_epoch_end=True,
            save_on_exception=True,  # on_exception below narrows it to graceful stops
        )
        self.every_seconds = 60.0 * every_n_minutes if every_n_minutes else None
        self.every_n_steps = int(every_n_train_steps or 0)
        self.stop_signal: str | None = None
        self._saved_at = time.monotonic()
        self._previous_handlers: dict[int, Any] = {}

    # ---------------------------------------------------------------- triggers
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self._saved_at = time.monotonic()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if (
            self._should_skip_saving_checkpoint(trainer)
            or batch_idx + 1 >= trainer.num_training_batches
        ):
            return  # the epoch's last batch: the epoch-end save follows
        step_due = self.every_n_steps > 0 and trainer.global_step % self.every_n_steps == 0
        time_due = self.every_seconds is not None and (
            time.monotonic() - self._saved_at >= self.every_seconds
        )
        if trainer.strategy.broadcast(bool(step_due or time_due)):
            self._save_resume_point(trainer)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._save_epoch_end(trainer)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Nothing: the epoch-end save comes after validation, in ``on_train_epoch_end``."""

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Save on a graceful stop (SIGTERM / SIGINT / SLURM); not on errors, whose state may be
        half-updated."""
        if isinstance(exception, SIGTERMException) and self._should_save_on_exception(trainer):
            self._save_resume_point(trainer)

    # ---------------------------------------------------------------- saving
    def _save_epoch_end(self, trainer: pl.Trainer) -> None:
        # not skipped when a mid-epoch save happened at the same step: the loop state differs
        if trainer.fast_dev_run or trainer.sanity_checking or trainer.state.fn != "fit":
            return
        self._save_resume_point(trainer)

    def _save_resume_point(self, trainer: pl.Trainer) -> None:
        self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        self._saved_at = time.monotonic()

    # ---------------------------------------------------------------- signals
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage == "fit":
            self._install(trainer)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.restore_signals()
        super().teardown(trainer, pl_module, stage)

    def restore_signals(self) -> None:
        """Put back the SIGINT/SIGTERM handlers found at setup (also after an interrupted fit,
        where Lightning skips the teardown hooks)."""
        for signum, handler in self._previous_handlers.items():
            _set_handler(signum, handler)
        self._previous_handlers = {}

    def _install(self, trainer: pl.Trainer) -> None:
        """SIGINT: stop gracefully like SIGTERM (a second one stops at once); SIGTERM: remember
        it (Lightning chains this handler with its own, which requests the stop)."""

        def on_sigint(signum: int, frame: Any) -> None:
            if self.stop_signal is not None:
                raise KeyboardInterrupt
            self.stop_signal = "SIGINT"
            print(
                "\ninterrupt: saving a resume point after this batch (Ctrl+C again to stop now)",
                flush=True,
            )
            trainer._signal_connector.received_sigterm = True

        def on_sigterm(signum: int, frame: Any) -> None:
            self.stop_signal = self.stop_signal or "SIGTERM"

        for signum, handler in ((signal.SIGINT, on_sigint), (signal.SIGTERM, on_sigterm)):
            previous = _set_handler(signum, handler)
            if previous is not None:
                self._previous_handlers.setdefault(signum, previous)

    def interrupted(self, trainer: pl.Trainer) -> RunInterrupted:
        """The error to raise after Lightning stopped on a signal."""
        name = self.stop_signal or "SIGTERM"
        where = f"epoch {trainer.current_epoch}, global step {trainer.global_step}"
        saved = self.last_model_path or "none"
        if self._last_global_step_saved == trainer.global_step:
            saved += f" (global step {trainer.global_step})"
        return RunInterrupted(
            f"interrupted by {name} at {where}; resume point: {saved}. "
            "Rerun the same command to resume.",
            _EXIT_CODES.get(name, 143),
        )


def _set_handler(signum: int, handler: Callable[..., Any] | Any) -> Any:
    """``signal.signal`` from the main thread only (returns the previous handler, else None)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signum, handler)
