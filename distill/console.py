"""What a run prints: :func:`say` for the toolkit's messages, :func:`quiet_lightning` for the
console noise a user cannot act on.

Under ``python train.py`` Hydra configures logging (``configs/hydra/default.yaml``: the message
alone on the console, time-stamped in ``<run_dir>/train.log``); :func:`say` logs there, and
prints when nothing is configured (``train(cfg)`` from Python). Lightning's own info lines are
routed to the same handlers (:func:`quiet_lightning`), minus its tips and accelerator lines
that do not apply.
"""

from __future__ import annotations

import logging

__all__ = ["NOISE", "quiet_lightning", "say"]

log = logging.getLogger("distill")

# Lightning info lines that carry nothing a user of this toolkit can act on
NOISE = (
    "💡 Tip",  # litlogger / litmodels advertisements
    "TPU available",
    "HPU available",
    "Using bfloat16 Automatic Mixed Precision",  # said by our precision line
    "Using 16bit Automatic Mixed Precision",
)


def say(message: str) -> None:
    """One message of the toolkit: to the configured log handlers (console + train.log), or
    printed when logging is not configured."""
    if logging.getLogger().hasHandlers():
        log.info(message)
    else:
        print(message, flush=True)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(NOISE)


def quiet_lightning() -> None:
    """Drop :data:`NOISE` from Lightning's loggers; when logging is configured (Hydra), let
    Lightning's lines reach its handlers (console and ``train.log``) instead of its own."""
    configured = logging.getLogger().hasHandlers()
    for name in ("pytorch_lightning", "lightning_fabric"):
        logger = logging.getLogger(name)
        if configured:
            for handler in [h for h in logger.handlers if type(h) is logging.StreamHandler]:
                logger.removeHandler(handler)
            logger.propagate = True
        for sub in (logger, logging.getLogger(f"{name}.utilities.rank_zero")):
            if not any(isinstance(f, _DropNoise) for f in sub.filters):
                sub.addFilter(_DropNoise())
