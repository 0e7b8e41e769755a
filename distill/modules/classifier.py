"""Cross-entropy classifier training (teacher / CE baseline) as a LightningModule.

Students subclass :class:`ClassifierModule` and override :meth:`ClassifierModule.compute_loss`.
Defaults are the attention-transfer CIFAR recipe: SGD lr 0.1, momentum 0.9, weight decay 5e-4,
lr x0.2 at epochs 60/120/160 (200 epochs, set on the trainer).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric
from torchmetrics.classification import MulticlassAccuracy

from distill.config_checks import ConfigError
from distill.precision import use_channels_last

__all__ = [
    "EPOCH_RECORD_KEY",
    "CheckpointMismatchError",
    "ClassifierModule",
    "ErrorRate",
    "NonFiniteLossError",
    "arch_name",
    "check_checkpoint_compatible",
    "check_output_width",
    "default_optimizer",
    "default_scheduler",
]

OptimizerFactory = Callable[..., torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]

EPOCH_RECORD_KEY = "epoch_metrics"  # checkpoint key of ClassifierModule's epoch-metric record


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/inf; training stops instead of stepping on it."""


class CheckpointMismatchError(RuntimeError):
    """A checkpoint does not fit the configured network."""


class ErrorRate(MulticlassAccuracy):
    """Top-1 error in percent: ``100 * (1 - accuracy)`` (micro-averaged)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes=num_classes, average="micro")

    def compute(self) -> Tensor:
        return 100.0 * (1.0 - super().compute())


def default_optimizer() -> OptimizerFactory:
    """attention-transfer: SGD lr 0.1, momentum 0.9 (no Nesterov), weight decay 5e-4 (all)."""
    return functools.partial(
        torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=False
    )


def default_scheduler() -> SchedulerFactory:
    """attention-transfer: lr x0.2 at epochs 60, 120, 160 (stepped once per epoch)."""
    return functools.partial(
        torch.optim.lr_scheduler.MultiStepLR, milestones=[60, 120, 160], gamma=0.2
    )


def arch_name(net: nn.Module) -> str:
    """Architecture name of ``net`` (``net.arch`` when it has one, else the class name)."""
    arch = getattr(net, "arch", None)
    return str(arch) if arch is not None else type(net).__name__


def output_width(net: nn.Module) -> int | None:
    """Number of classes ``net`` outputs: ``net.num_classes``, else ``net.fc.out_features``
    (None when it declares neither)."""
    width = getattr(net, "num_classes", None)
    fc = getattr(net, "fc", None)
    if width is None and isinstance(fc, nn.Linear):
        width = fc.out_features
    return int(width) if width is not None else None


def check_output_width(net: nn.Module, num_classes: int, who: str = "model") -> None:
    """:class:`~distill.config_checks.ConfigError` when ``net`` declares another number of
    classes than the data (``data.num_classes``)."""
    width = output_width(net)
    if width is not None and width != num_classes:
        raise ConfigError(
            f"the {who} ({arch_name(net)}) outputs {width} classes but the data has "
            f"{num_classes} (data.num_classes): set {who}.num_classes=${{data.num_classes}}"
        )


class ClassifierModule(pl.LightningModule):
    """Trains ``net`` with cross-entropy; logs train/<term>, train/err, val/err, test/err and lr.

    The epoch values of train/<term> and train/err are torchmetrics states (batch-size weighted
    means, error counts) saved in every checkpoint (``EPOCH_RECORD_KEY``) with the last finished
    epoch's train/* and val/* values: a run resumed inside an epoch logs the same epoch values as
    an uninterrupted one, and a resume with no epoch left (:meth:`epoch_metrics`) still knows them.

    Args:
        net: the network (e.g. ``distill.models.WideResNet``).
        optimizer: ``params -> Optimizer`` factory (Hydra ``_partial_: true``); None = recipe SGD.
        scheduler: ``optimizer -> LRScheduler`` factory; None = recipe MultiStepLR; False = none.
        scheduler_interval: "epoch" or "step" (how often the scheduler is stepped).
        channels_last: channels_last memory format for the net and its inputs; ``"auto"``: on
            when the trainer runs mixed precision (:func:`distill.precision.use_channels_last`).
        compile: ``torch.compile`` the net in place (state_dict keys are unchanged).
        num_classes: number of classes (``data.num_classes`` in the configs; must match the
            net's output width); None: the net's (``net.num_classes`` / ``net.fc``), else 10.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None | bool = None,
        scheduler_interval: str = "epoch",
        channels_last: bool | str = False,
        compile: bool = False,
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer or default_optimizer()
        self.scheduler_factory = default_scheduler() if scheduler is None else scheduler
        self.scheduler_interval = scheduler_interval
        self.channels_last_setting, self.use_compile = channels_last, compile
        self.use_channels_last = use_channels_last(channels_last, "32-true")  # auto: at setup
        if num_classes is not None:
            check_output_width(net, num_classes)
        n_cls = num_classes or output_width(net) or 10
        self.arch = arch_name(net)
        self.save_hyperparameters(
            {
                "arch": self.arch,
                "num_classes": n_cls,
                "channels_last": channels_last,
                "compile": compile,
            },
            logger=False,
        )
        self.train_err, self.val_err, self.test_err = (
            ErrorRate(n_cls),
            ErrorRate(n_cls),
            ErrorRate(n_cls),
        )
        self.train_means = nn.ModuleDict()  # train/<term>: one MeanMetric per term, at first use
        self._finished: dict[str, float] = {}  # train/*, val/* of the last finished epoch
        self._resume_record: dict[str, Any] | None = None

    # ------------------------------------------------------------------ model

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision) if self._trainer is not None else "32-true"
        self.use_channels_last = use_channels_last(self.channels_last_setting, precision)
        if self.use_channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.use_compile and not getattr(self, "_compiled", False):
            self.net.compile()
            self._compiled = True

    def forward(self, x: Tensor) -> Tensor:
        if self.use_channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def compute_loss(self, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Training loss of a batch: ``(loss, logits, terms)``; terms are logged as train/<name>."""
        logits = self(batch["image"])
        ce = F.cross_entropy(logits, batch["label"])
        return ce, logits, {"ce": ce}

    # ------------------------------------------------------------------ steps

    def _check_finite(self, loss: Tensor, terms: Mapping[str, Tensor]) -> None:
        if bool(torch.isfinite(loss.detach()).all()):
            return
        bad = [k for k, v in terms.items() if not bool(torch.isfinite(v.detach()).all())] or [
            "loss"
        ]
        vals = ", ".join(
            f"{k}={terms[k].detach().float().mean().item() if k in terms else loss.item()}"
            for k in bad
        )
        raise NonFiniteLossError(
            f"non-finite loss at global step {self.global_step} (epoch {self.current_epoch}): "
            f"{vals}. Lower the learning rate / loss weights, or disable mixed precision "
            "(trainer.precision=32)."
        )

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> Tensor:
        loss, logits, terms = self.compute_loss(batch)
        self._check_finite(loss, terms)
        bs = batch["label"].shape[0]
        for name, value in terms.items():
            self.log_train_mean(name, value, bs)
        if "loss" not in terms:
            self.log_train_mean("loss", loss, bs)
        self.train_err(logits.detach(), batch["label"])
        self.log(
            "train/err", self.train_err, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs
        )
        return loss

    def log_train_mean(self, name: str, value: Tensor, batch_size: int) -> None:
        """Log ``train/<name>``: the epoch's mean weighted by batch size, kept in a MeanMetric
        whose state is part of the resume point (the same epoch value after a resume)."""
        metric = self._train_metric(name)
        metric.update(value.detach(), weight=batch_size)
        self.log(
            f"train/{name}", metric, on_step=False, on_epoch=True, batch_size=batch_size,
            metric_attribute=f"train_means.{name}",
        )  # fmt: skip

    def _train_metric(self, name: str) -> Metric:
        """train/err's metric for ``"err"``, else the MeanMetric of ``train/<name>`` (made once)."""
        if name == "err":
            return self.train_err
        if name not in self.train_means:
            self.train_means[name] = MeanMetric(nan_strategy="disable").to(self.device)
        return self.train_means[name]

    def _train_metrics(self) -> dict[str, Metric]:
        return {"err": self.train_err, **self.train_means}

    def _eval_step(self, batch: Mapping[str, Any], metric: ErrorRate, name: str) -> None:
        logits = self(batch["image"])
        bs = batch["label"].shape[0]
        self.log(
            f"{name}/loss",
            F.cross_entropy(logits, batch["label"]),
            on_epoch=True,
            batch_size=bs,
            sync_dist=True,
        )
        metric(logits, batch["label"])
        self.log(f"{name}/err", metric, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.val_err, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, self.test_err, "test")

    def on_train_epoch_end(self) -> None:
        """Keep the finished epoch's train/* values and the latest val/* values (what ``fit``
        leaves in ``callback_metrics``) for the checkpoint record."""
        values = {
            f"train/{name}": float(metric.compute())  # cached: Lightning logs this same value
            for name, metric in self._train_metrics().items()
            if metric.update_count
        }
        logged = self.trainer.callback_metrics
        values.update(
            {k: float(v) for k, v in logged.items() if k.startswith("val/") and v.numel() == 1}
        )
        self._finished = values

    def epoch_metrics(self) -> dict[str, float]:
        """train/* and val/* of the last finished epoch: of this process's training, or recorded
        in the checkpoint it resumed (a run resumed with no epoch left to train)."""
        return dict(self._finished)

    def on_train_start(self) -> None:
        """Resumed inside an epoch: continue that epoch's train/* aggregates from the checkpoint
        (rank 0 takes the sum over all processes, the others start from zero)."""
        self._warn_eval_modules()
        record, self._resume_record = self._resume_record, None
        if not record or record.get("epoch") != self.current_epoch or self.global_rank != 0:
            return
        for name, state in record.get("train_state", {}).items():
            metric = self._train_metric(name)
            metric.reset()
            metric.merge_state({k: v.to(metric.device) for k, v in state.items()})

    def _warn_eval_modules(self) -> None:
        """Lightning's generic "modules in eval mode" warning is silenced by ``distill.train``
        (the frozen teacher, by design): warn here about any other module in eval mode."""
        names = [n for n, m in self.named_modules() if not m.training]
        names = [n for n in names if n != "teacher" and not n.startswith("teacher.")]
        if names and self.global_rank == 0:
            warnings.warn(
                f"{len(names)} module(s) of the trained network are in eval mode when training "
                f"starts ({', '.join(names[:5])}): their BatchNorm/Dropout layers will not train",
                stacklevel=2,
            )

    def on_train_epoch_start(self) -> None:
        opt = self.optimizers()
        if isinstance(opt, torch.optim.Optimizer) or hasattr(opt, "param_groups"):
            lr = float(opt.param_groups[0]["lr"])
            self.log("lr", lr, on_step=False, on_epoch=True, sync_dist=True)

    # ------------------------------------------------------------------ optim

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(params=self.parameters())
        if not self.scheduler_factory:
            return optimizer
        scheduler = self.scheduler_factory(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": self.scheduler_interval},
        }

    # ------------------------------------------------------------------ checkpoints

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["arch"] = self.arch
        checkpoint[EPOCH_RECORD_KEY] = {
            "epoch": self.current_epoch,
            "train_state": {n: _global_state(m) for n, m in self._train_metrics().items()},
            "finished": dict(self._finished),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        _check_state(checkpoint, self, "<checkpoint>")
        record = checkpoint.get(EPOCH_RECORD_KEY)  # None in checkpoints of older versions
        self._resume_record = record
        self._finished = dict(record.get("finished", {})) if record else {}


def _global_state(metric: Metric) -> dict[str, Tensor]:
    """A copy of ``metric``'s state summed over all processes (under DDP; else its own)."""
    with metric.sync_context(should_unsync=True):
        return {k: v.detach().cpu().clone() for k, v in metric.metric_state.items()}


def _check_state(checkpoint: Mapping[str, Any], module: nn.Module, source: str) -> None:
    """Raise :class:`CheckpointMismatchError` if ``checkpoint`` was made for another network."""
    hp = checkpoint.get("hyper_parameters") or {}
    want = getattr(module, "arch", None)
    have = checkpoint.get("arch") or hp.get("arch")
    own = module.state_dict()
    state = checkpoint.get("state_dict") or {}
    shapes_differ = [
        k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)
    ]
    missing = [k for k in own if k.startswith("net.") and k not in state]
    if (have is not None and want is not None and have != want) or shapes_differ or missing:
        raise CheckpointMismatchError(
            f"checkpoint '{source}' was made for architecture '{have or 'unknown'}', but the "
            f"configured model is '{want}'. Use a checkpoint of the same model, choose the "
            "matching model=..., "
            "or start a new run (run_name=... or ckpt_path=null)."
        )


def check_checkpoint_compatible(ckpt_path: str | Path, module: nn.Module) -> None:
    """Fail fast (before ``fit``) when ``ckpt_path`` holds another architecture than ``module``."""
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    except Exception as err:  # corrupted / truncated file
        raise CheckpointMismatchError(f"cannot read checkpoint '{ckpt_path}': {err}") from None
    _check_state(checkpoint, module, str(ckpt_path))
