"""`diffkd report --predictions P --out DIR`: rebuild the validation report from predictions.parquet."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from diffkd.config import from_dict

EPILOG = """\
examples:
  diffkd report --predictions runs/exp1/report/predictions.parquet --out runs/exp1_rebuilt
  diffkd report --predictions preds.parquet --out out --readers reads.csv --ci bootstrap --n-boot 2000
  diffkd report --predictions demo_out/report/predictions.parquet --out rebuilt --truth demo_out/phantom/truth.csv
      --dataset demo_out/data        # with the phantom's ceilings per center

By default the report_inputs.json (model sizes, synthetic audit and grids, config, skipped sections)
and readers.csv found beside the predictions are used, so a report folder rebuilds itself. Flags
given here override the evaluation settings stored there. The result is DIR/report/index.html with
metrics.json and predictions.parquet beside it.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "report", help="build the validation report (HTML + metrics.json) from predictions.parquet",
        description="Compute metrics, comparisons, calibration, decision curves and reader comparisons from "
                    "predictions.parquet and write DIR/report/ (self-contained index.html, metrics.json).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--predictions", required=True,
                        help="Parquet with case_id, patient_id, center, split, label, model, prob")
    parser.add_argument("--out", required=True, help="output directory; the report goes to OUT/report/")
    parser.add_argument("--inputs", default=None,
                        help="report_inputs.json (default: the one beside the predictions, if any)")
    parser.add_argument("--readers", default=None,
                        help="readers CSV: reader, experience, case_id and call|probability|birads "
                             "(default: readers.csv beside the predictions, if any)")
    parser.add_argument("--reference", default=None, help="model the others and the readers are compared with "
                                                          "(default student_kd)")
    parser.add_argument("--threshold", choices=("youden", "sensitivity"), default=None,
                        help="how the threshold is fixed on internal validation (default youden)")
    parser.add_argument("--target-sensitivity", type=float, default=None,
                        help="with --threshold sensitivity: the sensitivity to reach (default 0.9)")
    parser.add_argument("--ci", choices=("auto", "delong", "bootstrap"), default=None, dest="ci_method",
                        help="AUC confidence intervals and paired tests (default auto: DeLong where every patient "
                             "has one case, else the patient-clustered bootstrap)")
    parser.add_argument("--n-boot", type=int, default=None, help="bootstrap replicates (>= 1000; default 2000)")
    parser.add_argument("--seed", type=int, default=None, help="bootstrap seed (default 0)")
    parser.add_argument("--truth", default=None,
                        help="a synthetic cohort's truth.csv (the phantom's): per-center Bayes and image-visible AUC "
                             "ceilings beside every model's AUC (default: the one the stored inputs name, if any)")
    parser.add_argument("--dataset", default=None,
                        help="the dataset the truth's cases were ingested into, to map the phantom's case ids to "
                             "the stored pseudonyms (default: the dataset path in the stored inputs)")
    parser.add_argument("--title", default=None, help="page title")
    parser.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.evaluate.report import INPUTS_FILE, ReportInputs, rebuild_report
    from diffkd.evaluate.summary import EvaluateConfig, headline_table

    predictions = Path(args.predictions)
    inputs_path = args.inputs
    if inputs_path is None and (predictions.parent / INPUTS_FILE).exists():
        inputs_path = predictions.parent / INPUTS_FILE
    stored = ReportInputs.load(inputs_path).evaluate if inputs_path else {}
    overrides = {name: getattr(args, name) for name in ("reference", "threshold", "target_sensitivity",
                                                         "ci_method", "n_boot", "seed")
                 if getattr(args, name) is not None}
    config = from_dict(EvaluateConfig, {**stored, **overrides}, "evaluate")
    files = rebuild_report(predictions, args.out, inputs_path, args.readers, config, title=args.title,
                           truth=args.truth, dataset=args.dataset)
    print(f"report: {files.index}")
    print(headline_table(json.loads(files.metrics.read_text())))
    return 0
