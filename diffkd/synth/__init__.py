"""Stage 1b: synthetic images from the trained generator, and the audit that judges them.

- `sampling`: `synthesize` — condition tables, the Ray Data actor pool, resumable writes.
- `audit`: `audit` — the audit classifiers and the measures gathered into synthetic_audit.json.
- `stats`: the audit's measures on plain arrays (FID, KID, near copies, label recovery and effect).
- `figures`: the audit's figures.
"""
from diffkd.synth.audit import AuditConfig, audit, generate_label_pairs, with_synthesis_sampling
from diffkd.synth.sampling import SynthConfig, SynthResult, condition_table, synthesize

__all__ = ["AuditConfig", "SynthConfig", "SynthResult", "audit", "condition_table", "generate_label_pairs",
           "synthesize", "with_synthesis_sampling"]
