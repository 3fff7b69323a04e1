"""`diffkd run`: the whole DiffKD-DCIS pipeline on any ingested dataset.

    splits -> diffusion -> synthesis -> synthetic audit -> teachers (real-only, real+synthetic)
    -> KD search (Ray Tune, internal validation only) -> students (KD, KD from the real-only
    teacher, plain, pairing-free group KD) -> baselines (An et al. 2025) -> report

The stages are declared once in `diffkd.experiments.stages`; each records its outputs in `OUT/run_state.json` (`diffkd.experiments.runstate`): rerunning the same
command resumes after the last finished stage. With `parallel_stages` > 1, stages that read none of
each other's outputs train at once (the generator beside the real-image teachers, students and baselines). Stages that need what a dataset lacks (a second
modality, reader reads) are skipped with the reason written into the report.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import pandas as pd

from diffkd.config import ConfigError
from diffkd.data.dataset import ImageDataset
from diffkd.data.source_cache import start_shared_source_cache
from diffkd.data.splits import check_no_leakage, make_splits
from diffkd.experiments.experiment import ExperimentConfig
from diffkd.experiments.runstate import RunState
from diffkd.experiments.stages import (AUDIT_GRIDS, SEARCH_PREFIX, Pipeline, pipeline_stages, plan_stages,
                                       report_stage, stage_inputs)
from diffkd.runtime import raycompat

log = logging.getLogger("diffkd.run")


def run_pipeline(dataset: str, external: list[str], cfg: ExperimentConfig, out: str | os.PathLike,
                 readers_csv: str | None = None, truth: str | None = None) -> dict:
    """Run every stage the dataset supports; return {"report", "metrics", "failed"}.

    `out` receives models/, tune/, audit/, report/. A stage that fails is recorded in "failed" (and
    in the report); the stages that do not read its outputs still run, and rerunning resumes.
    truth: a synthetic cohort's truth.csv, handed to the report stage only (per-center ceilings).
    """
    out = Path(out).resolve()  # stages run in Ray workers and Tune trials with other working directories
    if truth is not None:  # checked now, read only by the report: no training stage gets the path
        truth = str(Path(truth).resolve())
        if not os.path.isfile(truth):
            raise ConfigError(f"truth file {truth} does not exist (the phantom writes it as OUT/truth.csv)")
    (out / "models").mkdir(parents=True, exist_ok=True)
    ds = ImageDataset(dataset)
    if not ds.exists():
        raise ConfigError(f"{dataset} is not a diffkd dataset (no _manifest.json): run `diffkd ingest` first")
    real = ds.metadata().to_pandas()
    external = list(external) or list(cfg.splits.external)  # --external wins over the config's
    assignments = make_splits(real, external, cfg.splits.val_fraction, cfg.splits.seed)
    check_no_leakage(assignments)
    log.info("dataset %s: %d images, %d cases, centers %s; external: %s", dataset, len(real),
             real["case_id"].nunique(), ", ".join(sorted(real["center"].unique())), ", ".join(external) or "none")
    plan = plan_stages(ds, assignments, cfg, readers_csv)
    for name, why in plan.skipped.items():
        log.info("skipping %s: %s", name, why)
    for change in plan.changes:
        log.info("note: %s", change)

    raycompat.init(cfg.ray.address or None, **({"num_cpus": cfg.ray.num_cpus} if cfg.ray.num_cpus else {}))
    # every stage and search trial below reads the same rows: decode each center's images once for all
    # of them (held while this function runs)
    shared_cache = start_shared_source_cache()  # noqa: F841
    state = RunState.load(out)
    pipeline = Pipeline(ds, external, assignments, cfg, out, state, stage_inputs(dataset, external, cfg), plan,
                        parallel=cfg.parallel_stages)
    pipeline.execute(pipeline_stages(pipeline))

    skipped = _skipped_sections(pipeline)
    notes = [*plan.changes, *_report_notes(pipeline)]  # stages left out, choices made, for the report's limitations
    notes += [f"stage {name} {why}" for name, why in state.failed.items()]
    if not pipeline.model_dirs():
        raise RuntimeError("no classifier finished, so there is nothing to report: "
                           + "; ".join(f"{n} {why}" for n, why in state.failed.items()))
    audited, baselines = pipeline.results.get("audit"), pipeline.results.get("baselines")
    grids = [str(out / "audit" / name) for name in AUDIT_GRIDS] if audited is not None else []
    report = pipeline.finish(report_stage(pipeline, readers_csv, truth, audited and audited["summary"], grids,
                                          baselines and baselines["summary"], skipped, notes))
    return {**report, "failed": dict(state.failed)}


def _skipped_sections(p: Pipeline) -> dict[str, str]:
    """Report section -> why it has no content."""
    cfg, state, skipped = p.cfg, p.state, {}
    if p.results.get("synth") is None:
        skipped["synthetic"] = ("the diffusion stage is disabled in the config (diffusion.enabled: false)"
                                if not cfg.diffusion.enabled else
                                f"no synthetic images: {_why_not(state, 'diffusion', 'synth')}")
    elif p.results["audit"] is None:
        skipped["synthetic"] = f"the synthetic-data audit {state.failed['audit']}"
    if not cfg.baselines.enabled:
        skipped["baselines"] = "baselines.enabled is false in the config"
    elif p.results["baselines"] is None:
        skipped["baselines"] = f"the baselines stage {state.failed['baselines']}"
    return skipped


def _report_notes(p: Pipeline) -> list[str]:
    """What the report's limitations say about the stages left out and the searches."""
    cfg, notes = p.cfg, []
    if cfg.pairing_free.enabled and not p.plan.pairing_free:
        notes.append(p.plan.skipped["student_pairing_free"])
    searches = {s.name.removeprefix(SEARCH_PREFIX): p.results[s.name] for s in p.executed
                if s.name.startswith(SEARCH_PREFIX) and p.results[s.name] is not None}
    if searches:
        notes.append(_search_note(searches))
    elif not cfg.tune.enabled:
        notes.append("no hyperparameter search (tune.enabled: false): every student arm trained with the config's "
                     "settings, the same (zero) search budget for each")
    notes.append(_validation_note(p.assignments, cfg.student.student_modality, searched=bool(searches)))
    return notes


def _why_not(state: RunState, *stages: str) -> str:
    return "; ".join(f"{name} {state.failed[name]}" for name in stages if name in state.failed) or "not run"


def _search_note(searches: dict[str, dict]) -> str:
    """The search budget, arm by arm, for the report."""
    parts = [f"{name}: {s['trials']} trials over {', '.join(s['best_params'])} ({s['trial_epochs']} epochs run)"
             for name, s in searches.items()]
    space = next(iter(searches.values()))["space"] if searches else ""
    return (f"hyperparameter search: every student arm was searched with the same number of trials of {space} "
            f"(internal-validation AUC per case; teachers were not searched): {'; '.join(parts)}")


def _validation_note(assignments: pd.DataFrame, modality: str, searched: bool) -> str:
    """One internal-validation split serves several choices; say which, so internal AUCs are read as optimistic."""
    val = assignments[(assignments["split"] == "val") & (assignments["modality"] == modality)
                      & ~assignments["synthetic"].astype(bool)]
    uses = ["each model's epoch (early stopping)", *(["the search's settings"] if searched else []),
            "each model's operating threshold"]
    return (f"the one internal-validation split ({val['case_id'].nunique()} {modality} cases) chose "
            f"{', '.join(uses[:-1])} and {uses[-1]}: internal-validation figures are optimistic, "
            "the external centers are the unbiased estimate")
