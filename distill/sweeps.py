"""Hydra multiruns: job folders named by their overrides, and a summary table at the end.

* :func:`job_dirname` (resolver ``job_dirname``, ``hydra.sweep.subdir`` in
  ``configs/hydra/default.yaml``): ``loss.alpha=0.1``, ``loss=gradcam,seed=1`` ... — the job's
  values of the swept keys (those given as a sweep on the command line, e.g. ``loss.alpha=0.1,1``;
  else every override but paths), ``/`` and other unsafe characters replaced by ``_``, long names
  shortened with a hash. The same command gives the same names: a rerun resumes each job.
* :class:`SweepSummary` (Hydra callback): after the last job, the table "swept keys -> test
  error, validation error, fidelity" of every job with a ``metrics.json``, printed and written
  to ``<sweep dir>/summary.md``.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

__all__ = ["SweepSummary", "job_dirname", "summary_table", "swept_keys"]

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+-]")
_PATHLIKE = ("paths.", "run_name", "task_name", "teacher.checkpoint", "module.cache_root",
             "module.memo_root", "data.root", "ckpt_path", "hydra.")  # fmt: skip
_MAX = 120


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0]


def swept_keys(argv: list[str] | None = None) -> set[str] | None:
    """Keys given as a sweep (``a=1,2``, ``range(...)``, ...) on the command line; None when
    the command line cannot be read as Hydra overrides (e.g. inside a launcher's worker)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [a for a in (sys.argv[1:] if argv is None else argv) if "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(args)
    except Exception:  # noqa: BLE001 - not our command line
        return None
    return {o.get_key_element() for o in parsed if o.is_sweep_override()} or None


def job_dirname(num: Any, _root_: DictConfig) -> str:
    """The folder of multirun job ``num``: its swept overrides (module doc), else ``num``."""
    overrides = list(OmegaConf.select(_root_, "hydra.overrides.task", default=None) or [])
    swept = swept_keys()
    if swept is not None:
        chosen = [o for o in overrides if _key(o) in swept]
    else:
        chosen = [o for o in overrides if not _key(o).startswith(_PATHLIKE)]
    name = _UNSAFE.sub("_", ",".join(chosen))
    if len(name) > _MAX:
        name = f"{name[: _MAX - 9]}-{hashlib.sha256(name.encode()).hexdigest()[:8]}"
    return name or str(num)


# ----------------------------------------------------------------------------- summary


def _job_overrides(job: Path) -> dict[str, str]:
    path = job / ".hydra" / "overrides.yaml"
    try:
        items = OmegaConf.load(path)
    except (OSError, ValueError):
        return {}
    return {_key(str(o)): str(o).partition("=")[2] for o in items}


def _metric_keys(rows: list[dict[str, Any]]) -> list[str]:
    keys = ["test_error", "val_error"]
    extra = {
        k for m in rows for k, v in m.items()
        if k.startswith(("fidelity_", "faithfulness_")) and not k.endswith("seconds")
        and isinstance(v, int | float)
    }  # fmt: skip
    return [k for k in keys if any(m.get(k) is not None for m in rows)] + sorted(extra)


def _cell(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def summary_table(sweep_dir: Path) -> str | None:
    """Markdown table of the jobs of ``sweep_dir`` with a ``metrics.json``: the overrides that
    differ between jobs (the job folder when none do), then the metrics; None without jobs."""
    jobs = sorted(p.parent for p in sweep_dir.glob("*/metrics.json"))
    metrics = [json.loads((j / "metrics.json").read_text()) for j in jobs]
    if not jobs:
        return None
    overrides = [_job_overrides(j) for j in jobs]
    keys = sorted({k for o in overrides for k in o})
    varying = [k for k in keys if len({o.get(k) for o in overrides}) > 1] or ["job"]
    columns = _metric_keys(metrics)
    lines = [
        "| " + " | ".join([*varying, *columns]) + " |",
        "|" + "---|" * (len(varying) + len(columns)),
    ]
    for job, over, m in zip(jobs, overrides, metrics, strict=True):
        left = [job.name] if varying == ["job"] else [over.get(k, "") for k in varying]
        lines.append("| " + " | ".join([*left, *(_cell(m.get(c)) for c in columns)]) + " |")
    return "\n".join(lines) + "\n"


class SweepSummary(Callback):
    """Hydra callback (``configs/hydra/default.yaml``): print the :func:`summary_table` of the
    sweep directory after the last job and write it to ``<sweep dir>/summary.md``."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(OmegaConf.select(config, "hydra.sweep.dir")))
        table = summary_table(sweep_dir) if sweep_dir.is_dir() else None
        if table is None:
            return
        (sweep_dir / "summary.md").write_text(table)
        print(f"\nsweep summary ({sweep_dir / 'summary.md'}):\n{table}", flush=True)
