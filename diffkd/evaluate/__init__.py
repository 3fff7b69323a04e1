"""Clinical-grade evaluation: from predictions to metrics.json and the report.

Plain functions over pandas / numpy; nothing here knows about Ray or torch.

- `metrics`: AUC with DeLong or patient-clustered bootstrap CIs, paired tests (DeLong or the clustered
  paired bootstrap), unpaired test, random-effects pooling of AUCs, thresholds fixed on internal
  data, operating points with Wilson CIs.
- `calibration`, `decision`: calibration intercept / slope / Brier / reliability, logistic
  recalibration on internal validation; net benefit.
- `truth`: a synthetic cohort's truth.csv joined to the predictions (per-center ceilings), read by
  the report only.
- `baselines`: An et al. 2025's clinical, deep-feature (mRMR + LASSO on cross-fitted or frozen
  extractor features) and combined models (`fit_baselines`).
- `readers`: radiologist reads (`load_readers`), operating points, McNemar.
- `summary`: `build_metrics(predictions, ...)` -> the metrics.json dict; `headline_table`.
- `figures`, `report`: `write_report(out_dir, predictions, ReportInputs(...), readers, EvaluateConfig())`
  writes DIR/report/{index.html, metrics.json, predictions.parquet}; `rebuild_report` redoes it.
"""
