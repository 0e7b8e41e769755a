"""Explanation-guided knowledge distillation: data, WRN models, Lightning modules, harness."""

from distill.loss_config import register_configs

# The loss group's schema (loss/_schema, listed in configs/loss/ce.yaml's defaults) must be in
# Hydra's ConfigStore before any config is composed: train.py, precompute, the harness and
# compose() from Python all import this package first.
register_configs()
