"""`diffkd phantom`: synthetic multicenter breast-imaging cohorts in the `folder` ingest layout.

    from diffkd.data.phantom import generate_cohort
    summary = generate_cohort("cohort", size="demo", seed=0)

Modules: clinical (latent case model and labels), centers (scanner profiles), ultrasound (B-mode
physics), doppler (flow over B-mode), mammo (microcalcification phantom), display (export
artefacts), readers (simulated radiologists), cohort (planning, rendering, writing), preview.
"""
from diffkd.data.phantom.cohort import CSV_COLUMNS, GENERATOR_VERSION, CohortSummary, generate_cohort, plan_center
from diffkd.data.phantom.preview import contact_sheet

__all__ = ["CSV_COLUMNS", "GENERATOR_VERSION", "CohortSummary", "contact_sheet", "generate_cohort", "plan_center"]
