"""Differentiable, batched class activation maps (torch only)."""
