"""Is a classifier's training healthy? Three checks on the per-epoch history the training loop keeps.

    health = check_health(fitted.history, constant_cross_entropy(train_labels, class_weights))
    -> {"checks": {...numbers...}, "flags": ["inverted", ...]}

1. ``loss_not_below_constant``: after warm-up, the training cross-entropy should fall below what a
   constant prediction scores, the entropy of the (class-weighted) training prevalence; ln 2 = 0.693
   with balanced class weights. Flagged when it is not, on more than half of the judged epochs.
2. ``inverted``: the internal-validation AUC stays below 0.5 for `inverted_epochs` epochs in a row, or
   for every epoch of a shorter run of at least two (the model ranks the classes the wrong way round).
3. ``unstable_auc``: between consecutive judged epochs the internal-validation AUC moves by more than
   `swing_z` standard errors of the difference, each epoch's DeLong SE on that validation set combined
   as if independent (a conservative bound: two epochs of one model on one set are positively
   correlated, so the real noise of the difference is smaller).

Warm-up: the first `warmup_share` of the epochs (at least one) are not judged by checks 1 and 3; a
model is allowed to start at chance and to move fast while it learns. Plain functions of lists, no
Ray: the stages call them after `fit`, the tests call them directly.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

FLAG_TEXT = {
    "loss_not_below_constant": "training cross-entropy not below a constant predictor's",
    "inverted": "internal-validation AUC below 0.5 for several epochs in a row (inverted)",
    "unstable_auc": "internal-validation AUC swings between epochs far beyond its sampling noise",
}


@dataclass(frozen=True)
class HealthThresholds:
    warmup_share: float = 0.25  # first share of the epochs (at least one) not judged by the loss and swing checks
    loss_share: float = 0.5  # flag when the training CE is >= the constant's on more than this share of judged epochs
    inverted_epochs: int = 3  # consecutive epochs with internal AUC < 0.5 (all epochs when the run is shorter)
    swing_z: float = 3.0  # an epoch-to-epoch AUC change beyond z standard errors of the difference


def constant_cross_entropy(labels: Iterable[int], class_weights: Sequence[float] | None = None) -> float:
    """Cross-entropy of the best constant prediction on `labels` under the loss's class weights.

    F.cross_entropy's weighted mean is Σ w_y·(−log p_y) / Σ w_y; the constant p minimising it is the
    weighted prevalence W_1 / (W_0 + W_1) with W_c = w_c·n_c, and the minimum is that prevalence's entropy.
    """
    labels = [int(x) for x in labels]
    counts = [labels.count(0), labels.count(1)]
    weights = class_weights or (1.0, 1.0)
    mass = [w * n for w, n in zip(weights, counts)]
    if sum(mass) <= 0:
        raise ValueError("constant_cross_entropy: no training labels")
    p = mass[1] / sum(mass)
    return -sum(q * math.log(q) for q in (p, 1.0 - p) if q > 0)


def warmup_epochs(epochs: int, share: float) -> int:
    return min(epochs, max(1, math.ceil(share * epochs)))


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def training_ce(epoch: dict) -> float:
    """An epoch's training cross-entropy: `ce` where the stage logs it apart from its other terms, else `loss`."""
    value = epoch.get("ce", epoch.get("loss", math.nan))
    return float(value) if _finite(value) else math.nan


def longest_run(flags: Sequence[bool]) -> int:
    best = current = 0
    for flag in flags:
        current = current + 1 if flag else 0
        best = max(best, current)
    return best


def check_health(history: Sequence[dict], constant_ce: float,
                 thresholds: HealthThresholds = HealthThresholds()) -> dict:
    """The three checks (module doc) on a run's per-epoch history: {"checks": numbers, "flags": [names]}."""
    n = len(history)
    warm = warmup_epochs(n, thresholds.warmup_share) if n > 1 else 0
    judged = history[warm:]
    ce = [training_ce(h) for h in judged]
    ce_known = [v for v in ce if math.isfinite(v)]
    not_below = sum(v >= constant_ce for v in ce_known)
    checks: dict = {"epochs": n, "warmup_epochs": warm, "constant_ce": round(constant_ce, 4),
                    "train_ce_first": _rounded(training_ce(history[0])) if history else None,
                    "train_ce_last": _rounded(ce_known[-1]) if ce_known else None,
                    "train_ce_min": _rounded(min(ce_known)) if ce_known else None,
                    "epochs_judged": len(ce_known), "epochs_ce_not_below_constant": not_below}
    flags = []
    if ce_known and not_below > thresholds.loss_share * len(ce_known):
        flags.append("loss_not_below_constant")

    aucs = [float(h["val_auc"]) if _finite(h.get("val_auc")) else math.nan for h in history]
    known = [a for a in aucs if math.isfinite(a)]
    if known:
        below = longest_run([math.isfinite(a) and a < 0.5 for a in aucs])
        needed = max(2, min(thresholds.inverted_epochs, len(known)))  # one epoch alone is no pattern
        checks.update(val_auc_min=_rounded(min(known)), val_auc_max=_rounded(max(known)),
                      val_auc_last=_rounded(known[-1]), epochs_auc_below_half=sum(a < 0.5 for a in known),
                      longest_run_auc_below_half=below)
        if below >= needed:
            flags.append("inverted")
        swing, limit, swings = _swings(history, max(warm, 1) - 1, thresholds.swing_z)
        checks.update(max_auc_change=_rounded(swing), auc_change_limit=_rounded(limit), auc_swings=swings)
        if swings:
            flags.append("unstable_auc")
    return {"checks": checks, "flags": flags}


def assess(name: str, history: Sequence[dict], train_labels: Iterable[int],
           class_weights: Sequence[float] | None = None) -> dict:
    """Check a finished run of stage `name`, say so in one log line (a warning when flagged), return the result."""
    health = check_health(history, constant_cross_entropy(train_labels, class_weights))
    (log.warning if health["flags"] else log.info)(health_line(name, health))
    return health


def _swings(history: Sequence[dict], start: int, z: float) -> tuple[float | None, float | None, int]:
    """(largest |ΔAUC| between consecutive epochs from `start` on, the noise limit at that pair, how many
    pairs exceed their limit). A pair without a DeLong SE on both sides is not judged."""
    largest, limit_at_largest, count = None, None, 0
    for earlier, later in zip(history[start:], history[start + 1:]):
        a, b = earlier.get("val_auc"), later.get("val_auc")
        se_a, se_b = earlier.get("val_auc_se"), later.get("val_auc_se")
        if not all(_finite(v) for v in (a, b, se_a, se_b)):
            continue
        change, limit = abs(b - a), z * math.hypot(se_a, se_b)
        count += change > limit
        if largest is None or change > largest:
            largest, limit_at_largest = change, limit
    return largest, limit_at_largest, count


def _rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None or not math.isfinite(value) else round(float(value), digits)


def health_line(name: str, health: dict) -> str:
    """The one console line a stage prints about its training health."""
    c, flags = health["checks"], health["flags"]
    verdict = "FLAGGED (" + "; ".join(FLAG_TEXT[f] for f in flags) + ")" if flags else "healthy"
    parts = [f"[{name}] training health: {verdict}"]
    if c.get("train_ce_last") is not None:
        parts.append(f"train CE {c['train_ce_last']:.3f} at the last epoch vs constant {c['constant_ce']:.3f} "
                     f"(not below it in {c['epochs_ce_not_below_constant']}/{c['epochs_judged']} epochs after "
                     f"warm-up)")
    if c.get("val_auc_min") is not None:
        parts.append(f"internal AUC {c['val_auc_min']:.3f}-{c['val_auc_max']:.3f} "
                     f"({c['longest_run_auc_below_half']} epoch(s) in a row below 0.5)")
    if c.get("max_auc_change") is not None:
        parts.append(f"largest epoch-to-epoch AUC change {c['max_auc_change']:.3f} "
                     f"(noise limit {c['auc_change_limit']:.3f})")
    return "; ".join(parts)
