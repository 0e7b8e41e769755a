"""The teacher of a student run: checkpoint loading, its CAM, online or cached maps.

* :mod:`distill.teacher.loading` — find, verify, load and freeze a teacher checkpoint.
* :mod:`distill.teacher.cache` — the offline map cache: fingerprint, shards, manifest, alignment.
* :mod:`distill.teacher.teacher` — :class:`Teacher`, the object the student module and
  ``python -m distill.precompute`` share.
"""

from distill.teacher.cache import (
    CacheError,
    ForeignCacheError,
    MapCache,
    align_maps,
    teacher_fingerprint,
)
from distill.teacher.loading import (
    TeacherError,
    check_teacher_data,
    load_teacher,
    resolve_teacher_checkpoint,
    teacher_digest,
)
from distill.teacher.teacher import Teacher, cached_indices, precompute_command

__all__ = [
    "CacheError",
    "ForeignCacheError",
    "MapCache",
    "Teacher",
    "TeacherError",
    "align_maps",
    "cached_indices",
    "check_teacher_data",
    "load_teacher",
    "precompute_command",
    "resolve_teacher_checkpoint",
    "teacher_digest",
    "teacher_fingerprint",
]
