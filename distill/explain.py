"""Moved to :mod:`distill.teacher` (teacher loading) and :mod:`distill.loss_config` (CAM
building). This alias module is kept only for ``benchmarks/alpha_scale.py``; import from
:mod:`distill.teacher` instead."""

from distill.teacher.loading import TeacherError, load_teacher

__all__ = ["TeacherError", "load_teacher"]
