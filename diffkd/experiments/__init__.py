"""Experiments built from the stages: the experiment schema and its reader (`experiment`), the whole
pipeline (`run`) with its resumable state (`runstate`), hyperparameter searches (`tune`, over the
spaces of `tune_space`), ablations (`ablate`) and leave-one-center-out (`loco`)."""
