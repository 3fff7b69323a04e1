"""Clinical-grade evaluation: from predictions to metrics.json and the report.

Plain functions over pandas / numpy; nothing here knows about Ray or torch.

- `metrics`: AUC with DeLong or bootstrap CIs, DeLong paired test, unpaired test, thresholds fixed on
  internal data, operating points with Wilson CIs.
- `calibration`, `decision`: calibration intercept / slope / Brier / reliability; net benefit.
- `baselines`: the seed-001 clinical, deep-feature (mRMR + LASSO) and combined models
  (`fit_baselines`).
- `readers`: radiologist reads (`load_readers`), operating points, McNemar.
- `summary`: `build_metrics(predictions, ...)` -> the metrics.json dict; `headline_table`.
- `figures`, `report`: `write_report(out_dir, predictions, ReportInputs(...), readers, EvaluateConfig())`
  writes DIR/report/{index.html, metrics.json, predictions.parquet}; `rebuild_report` redoes it.
"""
