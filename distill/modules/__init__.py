"""Lightning modules: CE classifier (teacher); students subclass it, override ``compute_loss``."""

from distill.modules.classifier import (
    CheckpointMismatchError,
    ClassifierModule,
    ErrorRate,
    NonFiniteLossError,
    check_checkpoint_compatible,
)

__all__ = [
    "CheckpointMismatchError",
    "ClassifierModule",
    "ErrorRate",
    "NonFiniteLossError",
    "check_checkpoint_compatible",
]
