"""The experiment schema and the one reader every command uses.

A config file is YAML whose top-level sections are the fields of `ExperimentConfig`; each section has
one layout, filled into its stage's dataclass (`from_dict`: unknown keys are errors). `diffkd run`
reads the whole file (`load_experiment`); every other command reads the section it needs from the
same kind of file (`load_section`), so one file drives them all and other sections are ignored.

Two rules hold for every command alike:

- a top-level `pipeline` section is the base of every stage's own `pipeline` block (the stage's
  block wins key by key);
- layouts of earlier releases are rewritten into the current one with a `LayoutDeprecationWarning`
  naming the new form (`diffkd.experiments.legacy` for the file, `diffkd.config.legacy` for a
  section), for one release.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffkd.config import ConfigError, from_dict, load_yaml
from diffkd.data.splits import SplitConfig
from diffkd.distill.objective import DistillConfig
from diffkd.evaluate.baselines import BaselineConfig
from diffkd.evaluate.summary import EvaluateConfig
from diffkd.experiments.legacy import upgrade_sections
from diffkd.synth.audit import AuditConfig
from diffkd.synth.sampling import SynthConfig
from diffkd.train.diffusion_task import DiffusionTrainConfig
from diffkd.train.loop_config import LoopConfig
from diffkd.train.student import StudentConfig
from diffkd.train.teacher import TeacherConfig


@dataclass
class RayConfig:
    address: str = ""  # "" = a private local instance; "auto" or host:port joins a cluster
    num_cpus: int = 0  # logical CPUs of the local instance; 0 = max(4, cores)


@dataclass
class DiffusionStage(DiffusionTrainConfig):
    """The experiment file's diffusion section: what `train_diffusion` takes, and whether it runs."""
    loop: LoopConfig = field(default_factory=lambda: LoopConfig(epochs=20))
    enabled: bool = True


@dataclass
class TuneStage:
    """The hyperparameter search: every student arm or none, with the same budget.

    When enabled, each student arm (student_kd, student_plain, student_kd_real_only,
    student_pairing_free) gets its own search of `space` with the same number of trials, over the
    space's parameters that apply to it (distillation settings only to arms that distil, and only the
    terms an arm has). An arm that the space gives nothing to search is an error: it would get a
    smaller budget than the others. Teachers are not searched. The report states the budget.
    """

    enabled: bool = True
    space: str = "tune_spaces/kd.yaml"  # relative paths are resolved against the config file, then the CWD
    num_samples: int = 0  # 0 = the space's own count


def _group_terms() -> DistillConfig:
    return DistillConfig({"gkd_pro": {"weight": 1.0}, "gkd_den": {"weight": 1.0}})


@dataclass
class PairingFreeStage:
    """PaGKD's setting (Hu et al. 2026): a teacher on the richer modality, a student on B-mode, no image pairs.

    The student distils through its own `distill.terms`, by default GKD-Pro + GKD-Den only (GKD-Den
    after its warm-up), never the `student` section's paired terms: logit or feature KD (which would
    need pairs, and so run on random same-class pairs) only where this section names them.
    """

    enabled: bool = True
    teacher_modality: str = "us_doppler"
    student_modality: str = "us"
    distill: DistillConfig = field(default_factory=_group_terms)


@dataclass
class BaselineStage:
    enabled: bool = True
    config: BaselineConfig = field(default_factory=BaselineConfig)
    feature_model: TeacherConfig = field(default_factory=lambda: TeacherConfig(arch="resnet101"))


# The arms of `diffkd ablate` (diffkd/ablate.py trains them).
ARMS = ("full", "no_synthesis", "no_kd", "neither", "teacher", "teacher_student_budget", "pairing_free")


@dataclass
class AblationConfig:
    """The `ablation` section of an experiment config, for `diffkd ablate` (command-line flags override it)."""

    arms: list[str] = field(default_factory=lambda: list(ARMS))
    seeds: int = 3
    per_seed_generators: bool = False  # one diffusion model + synthesis per seed instead of one shared
    parallel: int = 0  # trials at once; 0 = as many as the cluster holds
    n_boot: int = 2000  # bootstrap replicates of the pooled CIs (diffkd.evaluate.pooled)
    target_half_width: float = 0.04  # the summary says how many seeds would bring a difference's CI to +/- this
    time_budget_min: float = 0.0  # stop starting trials after this long (0 = none); a rerun finishes them
    # A clinical column that is the radiologists' own reading (BI-RADS): when the external cases carry it,
    # the tables add it as a seed-free arm and the `full` student stacked on it (diffkd.evaluate.reader_arms),
    # and compare every arm with it. Empty: no reader.
    reader_column: str = "birads"
    # Planning assumptions for plan.json's expected precision (diffkd.experiments.preregistration): the arms'
    # external AUC, the correlation of two arms' AUC estimates on the same cases, the SD over seeds of one
    # seed's paired difference. They set no result, only what the plan says it expects to detect.
    plan_auc: float = 0.78
    plan_arm_correlation: float = 0.8
    plan_seed_sd: float = 0.03

    def __post_init__(self) -> None:
        unknown = [a for a in self.arms if a not in ARMS]
        if unknown:
            raise ValueError(f"ablation.arms: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
        if self.seeds < 1:
            raise ValueError(f"ablation.seeds must be >= 1, got {self.seeds}")
        if self.parallel < 0:
            raise ValueError("ablation.parallel must be 0 (as many as fit) or a positive number of trials")


@dataclass
class ExperimentConfig:
    name: str = "diffkd"
    splits: SplitConfig = field(default_factory=SplitConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    diffusion: DiffusionStage = field(default_factory=DiffusionStage)
    synth: SynthConfig = field(default_factory=SynthConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    synthetic_ratio: float = 0.5  # synthetic rows mixed into each training epoch, relative to real rows
    # stages of `diffkd run` trained at once where none reads another's outputs; each holds its own
    # workers (loop.cpus_per_worker), so the cluster must hold this many stages' workers at once
    parallel_stages: int = 1
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    tune: TuneStage = field(default_factory=TuneStage)
    pairing_free: PairingFreeStage = field(default_factory=PairingFreeStage)
    baselines: BaselineStage = field(default_factory=BaselineStage)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ablation: AblationConfig = field(default_factory=AblationConfig)  # diffkd ablate only

    def __post_init__(self) -> None:
        if self.parallel_stages < 1:
            raise ValueError(f"parallel_stages must be 1 (one stage at a time) or more, got {self.parallel_stages}")


SECTION_TYPES: dict[str, Any] = typing.get_type_hints(ExperimentConfig)
# Stage sections whose `pipeline` block takes the top-level `pipeline` section as its base.
PIPELINE_STAGES = ("teacher", "student")


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The file's sections in the current layout: old layouts upgraded (with a warning), the shared
    `pipeline` base merged into each stage's `pipeline` block (the stage's keys win) and removed."""
    data = upgrade_sections(load_yaml(path), str(path))
    base = data.pop("pipeline", None)
    if base is None:
        return data
    if not isinstance(base, dict):
        raise ConfigError(f"{path}: the top-level `pipeline` section must be a mapping")
    for stage in PIPELINE_STAGES:
        section = data.get(stage) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{path}: the `{stage}` section must be a mapping, got {section!r}")
        data[stage] = {**section, "pipeline": {**base, **(section.get("pipeline") or {})}}
    return data


def load_section(path: str | os.PathLike, name: str, required: bool = False) -> Any:
    """Section `name` of the config file `path` as its dataclass (the stage's defaults when absent).

    `required`: a file without the section is an error (for a command that would have nothing to do).
    """
    cls = SECTION_TYPES.get(name)
    if cls is None or not dataclasses.is_dataclass(cls):
        sections = [n for n, t in SECTION_TYPES.items() if dataclasses.is_dataclass(t)]
        raise ConfigError(f"no config section {name!r}; sections: {', '.join(sections)}")
    data = read_config(path)
    if required and name not in data:
        raise ConfigError(f"{path} has no `{name}` section")
    section = data.get(name)
    if section is not None and not isinstance(section, dict):
        raise ConfigError(f"{path}: the `{name}` section must be a mapping, got {section!r}")
    return from_dict(cls, section or {}, f"{path}: {name}")


def load_experiment(path: str | os.PathLike) -> ExperimentConfig:
    """The whole file, as `diffkd run` reads it; the tune space path is resolved beside the file."""
    cfg = from_dict(ExperimentConfig, read_config(path), where=str(path))
    space = Path(cfg.tune.space)
    if not space.is_absolute() and (Path(path).parent / space).exists():
        cfg.tune.space = str((Path(path).parent / space).resolve())
    elif not space.is_absolute() and (Path(path).parent.parent / space).exists():
        cfg.tune.space = str((Path(path).parent.parent / space).resolve())  # configs/ beside tune_spaces/
    return cfg
