"""Harness profiles: a reproduction protocol (cells, seeds, Hydra overrides per step and cell).

A profile is a Hydra config in ``configs/harness/`` whose schema is :class:`Profile`, stored in
Hydra's ConfigStore as ``harness_profile`` and named first in each profile's defaults list.
:meth:`Profile.load` composes it with Hydra's compose API and merges it onto the schema once more
(so a ``--profile PATH.yaml`` without that defaults entry is checked too): a misspelled key or a
value of the wrong type is refused with OmegaConf's message, which names the key.

The table's cells are not listed here: they are ``distill.presets.table_methods()`` without and
with KD, so a CAM method with its two loss presets needs no harness edit.

A profile with ``pairs`` (``{name: {teacher: [overrides], student: [overrides]}}``) runs its
protocol once per teacher -> student pair: :meth:`Profile.expand` gives one sub-profile per pair,
named ``<profile>/<pair>`` (results in ``results/<profile>/<pair>/``, its own teacher), whose
``teacher`` / ``student`` overrides are the profile's followed by the pair's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore

from distill.harness.records import teacher_checkpoint

ROOT = Path(__file__).resolve().parents[2]
PROFILE_DIR = ROOT / "configs" / "harness"
SCHEMA_NAME = "harness_profile"  # the schema's name in Hydra's ConfigStore
RESULTS_ROOT = "${paths.log_dir}"  # how paths under the results folder are stored in configs
# run_name of a cell in a multirun over cells and seeds: the local path's ``<cell>-s<seed>``
SWEPT_RUN_NAME = "${hydra:runtime.choices.loss}-s${seed}"


class HarnessError(RuntimeError):
    """Bad profile/cell names, or results that cannot be trusted."""


def table_cells() -> list[str]:
    """Every cell of the paper's table, in table order: each method of
    :func:`distill.presets.table_methods` without and with KD (``m``, ``m_kd``)."""
    from distill.presets import table_methods  # imports cams (torch): only when it is needed

    return [method + kd for method in table_methods() for kd in ("", "_kd")]


@dataclass
class Pair:
    """One teacher -> student pair of a multi-pair profile: the overrides its teacher run and its
    student runs add to the profile's ``teacher`` / ``student`` ones."""

    teacher: list[str] = field(default_factory=list)
    student: list[str] = field(default_factory=list)


@dataclass
class Profile:
    """A reproduction protocol: which cells, seeds and Hydra overrides (also the profile files'
    schema: every key of a profile file is a field here, with this type)."""

    name: str
    seeds: list[int]
    cells: list[str] | None = None  # null or absent: every table cell; may add baseline presets
    # extra cells run beside the table and reported in its second table "baselines" (at, dkd, ...)
    baselines: list[str] = field(default_factory=list)
    common: list[str] = field(default_factory=list)
    teacher: list[str] = field(default_factory=list)
    student: list[str] = field(default_factory=list)
    precompute: list[str] = field(default_factory=list)
    method_overrides: dict[str, list[str]] = field(default_factory=dict)
    n_jobs: int = 1  # deprecated: devices cpu:N
    devices: str = "auto"  # local workers: auto | GPU indices "0,1" | cpu:N (harness.devices)
    launcher: str = "local"  # local | slurm
    slurm: dict[str, Any] = field(default_factory=dict)  # hydra.launcher keys (--launcher slurm)
    results_dir: str = "results"
    description: str = ""
    # several teacher -> student pairs, each run as its own sub-profile (see expand); empty: one
    pairs: dict[str, Pair] = field(default_factory=dict)
    pair: str | None = None  # set by expand on a pair's sub-profile; not a profile-file key

    def expand(self, pair: str | None = None) -> list[Profile]:
        """The profiles to run: ``[self]`` without ``pairs``, else one per pair (only ``pair``
        when given), named ``<name>/<pair>``, with the pair's overrides after the profile's."""
        if not self.pairs:
            if pair is not None:
                raise HarnessError(f"profile {self.name!r} has no pairs: drop --pair {pair}")
            return [self]
        if pair is not None and pair not in self.pairs:
            raise HarnessError(f"unknown pair {pair!r}; choose one of {sorted(self.pairs)}")
        return [
            replace(
                self,
                name=f"{self.name}/{name}",
                teacher=[*self.teacher, *spec.teacher],
                student=[*self.student, *spec.student],
                pairs={},
                pair=name,
            )
            for name, spec in self.pairs.items()
            if pair is None or name == pair
        ]

    @classmethod
    def load(
        cls, name: str, directory: Path = PROFILE_DIR, results_dir: str | None = None
    ) -> Profile:
        """Profile ``name`` from ``directory``, or from a YAML file when ``name`` ends in .yaml."""
        path = Path(name) if name.endswith((".yaml", ".yml")) else Path(directory) / f"{name}.yaml"
        if not path.exists():
            known = sorted(p.stem for p in Path(directory).glob("*.yaml"))
            raise HarnessError(f"unknown profile {name!r}; choose one of {known}")
        data = compose_profile(path)
        if results_dir is not None:
            data["results_dir"] = results_dir
        if data.get("pair") is not None:
            raise HarnessError(f"profile {name!r} sets pair: list its pairs under pairs instead")
        data["pairs"] = {k: Pair(**v) for k, v in (data.get("pairs") or {}).items()}
        profile = cls(**data)
        known = table_cells()
        if profile.cells is None:
            profile.cells = known
        profile.cells = list(dict.fromkeys([*profile.cells, *profile.baselines]))
        from distill.presets import baseline_presets

        known = [*known, *baseline_presets()]  # a profile may list the baselines' cells too
        bad = [c for c in profile.cells if c not in known]
        if bad:
            raise HarnessError(f"profile {name!r} names unknown cells {bad}; known: {known}")
        return profile

    @property
    def out(self) -> Path:
        return (ROOT / self.results_dir / self.name).resolve()  # absolute results_dir wins

    def run_dir(self, cell: str, seed: int) -> Path:
        return self.out / "runs" / f"{cell}-s{seed}"

    @property
    def teacher_dir(self) -> Path:
        return self.out / "runs" / "teacher"

    def location(self, task: str, run: str) -> list[str]:
        return [f"paths.log_dir={self.out}", f"task_name={task}", f"run_name={run}"]

    def teacher_overrides(self) -> list[str]:
        return [*self.common, *self.teacher, *self.location("runs", "teacher")]

    def method_extra(self, cell: str) -> list[str]:
        """Overrides for this cell's CAM method only (e.g. reduced permutations); spelled
        ``++key=value`` so they compose with any loss preset."""
        return list(self.method_overrides.get(cell.removesuffix("_kd"), []))

    def cell_overrides(self, cell: str, seed: int) -> list[str]:
        return self._student_overrides(self.method_extra(cell), cell, str(seed), f"{cell}-s{seed}")

    def sweep_overrides(self, cells: list[str], seeds: list[int]) -> list[str]:
        """A multirun (``-m``) over ``seeds`` x ``cells`` (seed by seed) whose jobs have the
        overrides, run name and run directory of :meth:`cell_overrides`: the cells must share
        their :meth:`method_extra`."""
        extra = self.method_extra(cells[0])
        if any(self.method_extra(c) != extra for c in cells):
            raise ValueError(f"cells {cells} have different method overrides")
        seed_list = ",".join(map(str, seeds))
        return self._student_overrides(extra, ",".join(cells), seed_list, SWEPT_RUN_NAME)

    def _student_overrides(self, extra: list[str], loss: str, seed: str, run: str) -> list[str]:
        # relative to the results root (paths.log_dir): a copied results folder stays valid
        ckpt = teacher_checkpoint(self.teacher_dir, RESULTS_ROOT)
        return [
            *self.common,
            *self.student,
            *extra,
            f"seed={seed}",  # before loss: a sweep's jobs go seed by seed
            f"loss={loss}",
            f"teacher.checkpoint={ckpt}",
            *self.location("runs", run),
        ]


ConfigStore.instance().store(name=SCHEMA_NAME, node=Profile)


def compose_profile(path: Path) -> dict[str, Any]:
    """The profile file ``path`` composed by Hydra and checked against :class:`Profile`, as
    plain data (``${...}`` in an override is kept as written: it is resolved by ``train.py``)."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(str(path.resolve().parent), version_base="1.3"):
            cfg = compose(config_name=path.name)
        cfg = OmegaConf.merge(OmegaConf.structured(Profile), cfg)
        data = OmegaConf.to_container(cfg, resolve=False, throw_on_missing=True)
    except (HydraException, OmegaConfBaseException, yaml.YAMLError) as err:
        raise HarnessError(f"invalid profile {path}: {err}") from err
    assert isinstance(data, dict)
    return {str(k): v for k, v in data.items()}
