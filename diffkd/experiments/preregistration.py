"""An ablation's analysis plan, written before training, and the finished run compared with it.

`diffkd ablate --plan-only` (and every `diffkd ablate` whose output folder holds none) writes
OUT/plan.json first: the cohort's fingerprint (the dataset's files), the external centers, a digest of
the experiment config, the arms and seeds, the primary endpoint (the pooled external AUC difference
`full - neither`), the secondary endpoints, the analysis method and alpha, the expected minimum
detectable difference under stated assumptions, when it was written, and (filled in once, when
training starts) when the first trial started. Once a trial has finished the plan cannot be rewritten:
a new plan needs a new output folder.

At the end the run is compared with its plan. Every deviation is listed (config changed, arm dropped
or added, seed missing, external centers or dataset changed, plan written after a trial had finished,
plan file edited), and the tables say "pre-registered" (none) or "exploratory" (with the reasons).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable

from diffkd.evaluate.pooled import POWER, VarianceParts, interval_width
from diffkd.runtime.digest import fingerprint
from diffkd.runtime.files import atomic_write_json

PLAN_FILE = "plan.json"
PRE_REGISTERED = "pre-registered"
EXPLORATORY = "exploratory"
ALPHA = 0.05
PRIMARY_ARM, PRIMARY_COMPARATOR = "full", "neither"
# Settings that change where or how visibly a run goes, never what it computes: left out of the digest.
RUNTIME_KEYS = frozenset({"ray", "ablation", "progress", "progress_interval_s", "storage_path", "run_name", "resume",
                          "max_failures", "num_actors", "cpus_per_actor", "cpus_per_worker", "chunk_rows"})
# Settings that name a file the run reads: digested by the file's content, so that the same config
# checked out in another folder (or on another machine) has the same digest.
FILE_KEYS = frozenset({"space"})
UNSIGNED = ("digest", "first_trial_started_at")  # fields the digest does not cover (the start is filled in later)


class PlanError(ValueError):
    """A plan that cannot be written or read; the message says what to do."""


@dataclass(frozen=True)
class PlanningAssumptions:
    """What the expected precision is computed from, before any model is trained."""

    auc: float = 0.78  # the arms' external AUC
    arm_correlation: float = 0.8  # correlation of two arms' AUC estimates on the same cases
    seed_sd: float = 0.03  # SD over seeds of one seed's paired difference


def config_digest(config: dict) -> str:
    """A digest of what the experiment config computes (RUNTIME_KEYS left out, at any depth; a FILE_KEYS
    value by its file's content where the file exists)."""
    def scientific(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: _file_content(v) if k in FILE_KEYS else scientific(v)
                    for k, v in value.items() if k not in RUNTIME_KEYS}
        return value

    return fingerprint(scientific(config))


def _file_content(value: Any) -> Any:
    """A file setting's content digest, or the value itself when it names no readable file."""
    if isinstance(value, str) and os.path.isfile(value):
        with open(value, "rb") as f:
            return {"file_sha256": hashlib.sha256(f.read()).hexdigest()}
    return value


def plan_digest(plan: dict) -> str:
    return fingerprint({k: v for k, v in plan.items() if k not in UNSIGNED})


def expected_precision(positives: int, negatives: int, seeds: int, assumptions: PlanningAssumptions) -> dict:
    """Half-width of the 95% CI and the minimum detectable difference (80% power) expected for the
    primary endpoint: Hanley-McNeil variance of one AUC on these cases, paired between two arms with
    the assumed correlation, plus the assumed seed variance over `seeds` seeds, through the same
    interval as the analysis (diffkd.evaluate.pooled)."""
    theta = assumptions.auc
    q1, q2 = theta / (2 - theta), 2 * theta ** 2 / (1 + theta)
    one_auc = (theta * (1 - theta) + (positives - 1) * (q1 - theta ** 2) + (negatives - 1) * (q2 - theta ** 2)) \
        / (positives * negatives)
    case = 2 * one_auc * (1 - assumptions.arm_correlation)
    seed = assumptions.seed_sd ** 2
    parts = VarianceParts(case=case, seed=seed, spread=seed, interaction=0.0)
    return {"ci_half_width": interval_width(parts, seeds), "mdd_80": interval_width(parts, seeds, power=POWER),
            "power": POWER, "se": math.sqrt(parts.total(seeds)), "cases_positive": positives,
            "cases_negative": negatives, "assumptions": vars(assumptions),
            "method": "Hanley-McNeil variance of an AUC at the assumed value, paired with the assumed correlation, "
                      "plus the assumed seed variance / K; generalized-pivot interval as in the analysis"}


def build_plan(*, cohort_fingerprint: str, centers: dict[str, dict], external: list[str], config: dict,
               arms: list[str], seeds: list[int], arms_left_out: list[str], analysis: dict,
               expected: dict | None, center: str, reader: str | None = None) -> dict:
    """The plan's content (without the times and the digest, which `write_plan` adds); `center`: where
    the primary endpoint is read (all external centers pooled, or the only one)."""
    primary = {"measure": "pooled external AUC difference (mean over seeds of the per-seed paired difference)",
               "arm": PRIMARY_ARM, "comparator": PRIMARY_COMPARATOR, "center": center,
               "estimable": PRIMARY_ARM in arms and PRIMARY_COMPARATOR in arms}
    secondary = [f"{arm} - {PRIMARY_ARM}, pooled external AUC difference, {center} and each external center"
                 for arm in arms if arm not in (PRIMARY_ARM, PRIMARY_COMPARATOR)]
    secondary += ["each arm's mean external AUC over seeds, per external center and pooled",
                  f"{PRIMARY_ARM} - {PRIMARY_COMPARATOR} on each external center",
                  "each student's external AUC minus its teacher's (distillation.csv)"]
    if reader:
        secondary += [f"the radiologists' reading ({reader}, no training seed): external AUC, and each arm minus it",
                      f"{PRIMARY_ARM} stacked on {reader} (logistic regression fitted on each trial's internal "
                      f"validation rows) minus {reader} alone"]
    return {"cohort": {"fingerprint": cohort_fingerprint, "centers": centers}, "external": sorted(external),
            "config_digest": config_digest(config), "arms": list(arms), "arms_left_out": list(arms_left_out),
            "seeds": list(seeds), "reader": reader, "primary_endpoint": primary, "secondary_endpoints": secondary,
            "analysis": {**analysis, "alpha": ALPHA, "sides": 2}, "expected": expected}


def read_plan(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, PLAN_FILE)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as err:
        raise PlanError(f"{path} is not valid JSON ({err}); it was edited by hand or cut short. The plan of this "
                        "folder is lost: start a new plan in a new --out folder") from None


def write_plan(out_dir: str, content: dict, done: list[str]) -> dict:
    """Write OUT/plan.json from `content` (build_plan) and return it; refused when a plan is there and a
    trial has finished (`done`: the finished trials' names). A plan written into a folder that already
    holds finished trials (and no plan) records them: that run cannot be pre-registered."""
    existing = read_plan(out_dir)
    path = os.path.join(out_dir, PLAN_FILE)
    if existing is not None and done:
        raise PlanError(f"{path} was written at {existing.get('written_at')} and trial(s) have finished since "
                        f"({', '.join(done[:3])}{', ...' if len(done) > 3 else ''}): a plan cannot be rewritten "
                        "after its first trial finished. Run the ablation against this plan (deviations are "
                        "listed), or start a new plan in a new --out folder")
    plan = {**content, "written_at": _now(), "trials_finished_before_plan": done, "first_trial_started_at": None}
    plan["digest"] = plan_digest(plan)
    os.makedirs(out_dir, exist_ok=True)
    atomic_write_json(path, plan)
    return plan


def record_first_trial_start(out_dir: str) -> dict | None:
    """Fill in when training started, once (the plan's other fields stay as written)."""
    plan = read_plan(out_dir)
    if plan is not None and not plan.get("first_trial_started_at"):
        plan["first_trial_started_at"] = _now()
        atomic_write_json(os.path.join(out_dir, PLAN_FILE), plan)
    return plan


def deviations(plan: dict | None, *, cohort_fingerprint: str, external: Iterable[str], config: dict,
               finished: dict[str, list[int]], analysis: dict) -> list[str]:
    """Every way the run differs from its plan (an empty list: it followed the plan).

    finished: arm -> the seeds whose trial finished."""
    if plan is None:
        return ["no plan.json was written before training (run `diffkd ablate --plan-only` first)"]
    out = []
    if plan.get("digest") != plan_digest(plan):
        out.append("plan.json was edited after it was written (its digest does not match its content)")
    if plan.get("trials_finished_before_plan"):
        out.append(f"the plan was written after {len(plan['trials_finished_before_plan'])} trial(s) had finished")
    if plan.get("config_digest") != config_digest(config):
        out.append(f"config digest changed: planned {plan.get('config_digest')}, run {config_digest(config)}")
    if plan.get("cohort", {}).get("fingerprint") != cohort_fingerprint:
        out.append(f"dataset changed: planned cohort {plan.get('cohort', {}).get('fingerprint')}, "
                   f"run {cohort_fingerprint}")
    if sorted(plan.get("external", [])) != sorted(external):
        out.append(f"external centers changed: planned {', '.join(plan.get('external', []))}, "
                   f"run {', '.join(sorted(external))}")
    planned_seeds = set(plan.get("seeds", []))
    for arm in plan.get("arms", []):
        seeds = set(finished.get(arm, []))
        if not seeds:
            out.append(f"arm {arm} dropped: planned, no finished trial")
            continue
        missing, extra = sorted(planned_seeds - seeds), sorted(seeds - planned_seeds)
        if missing:
            out.append(f"arm {arm}: seed(s) {', '.join(map(str, missing))} missing")
        if extra:
            out.append(f"arm {arm}: seed(s) {', '.join(map(str, extra))} not in the plan")
    for arm in sorted(set(finished) - set(plan.get("arms", []))):
        out.append(f"arm {arm} added: not in the plan")
    planned_analysis = {k: v for k, v in plan.get("analysis", {}).items() if k not in ("alpha", "sides")}
    if planned_analysis != analysis:
        out.append(f"analysis changed: planned {planned_analysis}, run {analysis}")
    return out


def evidence_status(found: list[str]) -> str:
    return PRE_REGISTERED if not found else EXPLORATORY


def plan_record(plan: dict | None, found: list[str]) -> dict:
    """What ablation.json says about the plan: its digest and times, the status and every deviation."""
    keep = ("digest", "written_at", "first_trial_started_at", "config_digest", "primary_endpoint", "expected")
    return {"status": evidence_status(found), "deviations": found,
            **({k: plan.get(k) for k in keep} if plan else {})}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
