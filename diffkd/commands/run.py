"""`diffkd run` (the whole pipeline on an ingested dataset) and `diffkd demo` (phantom -> ingest -> run)."""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

from diffkd.commands import main
from diffkd.commands.options import add_address, add_dataset, names
from diffkd.runtime import console

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run every stage (diffusion, synthesis, teacher, student, baselines, "
                                          "report) on an ingested dataset",
                              description="Run the DiffKD-DCIS pipeline on any dataset made by `diffkd ingest`. "
                                          "Rerunning the same command resumes after the last finished stage.")
    add_dataset(p)
    p.add_argument("--external", default="", metavar="C1,C2",
                   help="external (held-out) centers: test split only, never trained on (default: the config's "
                        "splits.external)")
    p.add_argument("--config", required=True, help="experiment config YAML (e.g. configs/demo.yaml, configs/paper.yaml)")
    p.add_argument("--out", required=True, help="output folder: models/, report/, tune/, audit/, run_state.json")
    p.add_argument("--readers", default=None, help="reader study CSV (reader, experience, case_id, call|birads|probability)")
    add_address(p, default="the config's ray.address, else a private local instance")
    p.add_argument("--truth", default=None,
                   help="a synthetic cohort's truth.csv (the phantom's): the report shows each center's Bayes and "
                        "image-visible AUC beside the models'. Read by the report only, never by training")
    p.set_defaults(handler=run)

    d = subparsers.add_parser("demo", help="phantom -> ingest -> run with configs/demo.yaml",
                              description="The embedded default: a small synthetic multicenter ultrasound cohort, "
                                          "ingested and run through the whole pipeline exactly as a user's data is.")
    d.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    d.add_argument("--config", default=str(DEMO_CONFIG), help="experiment config (default configs/demo.yaml)")
    d.add_argument("--seed", type=int, default=0, help="phantom seed")
    d.add_argument("--doppler-fraction", type=float, default=0.3,
                   help="share of phantom patients imaged with Doppler only, for the pairing-free student (0.3)")
    d.set_defaults(handler=demo)


def run(args: argparse.Namespace) -> int:
    """The pipeline, with every library's own output filed under OUT/logs/<stage>.log (unless -v)."""
    # heavy (pandas, torch, Ray): loaded when the command runs, not for `diffkd --help`
    from diffkd.evaluate.summary import headline_table
    from diffkd.experiments.experiment import load_experiment
    from diffkd.experiments.run import run_pipeline

    cfg = load_experiment(args.config)
    if args.address:
        cfg.ray.address = args.address
    logs = Path(args.out) / "logs"
    with console.capture(logs, verbose=args.verbose), ray_for_command():
        result = run_pipeline(args.dataset, names(args.external), cfg, args.out, readers_csv=args.readers,
                              truth=args.truth)
    print(headline_table(json.loads(Path(result["metrics"]).read_text())))
    print(f"report: {result['report']}")
    print(f"logs: {logs}/ (one file per stage: Ray, DeepSpeed, Parquet and torch messages"
          + ("; of stages that ran at once, in run.log)" if cfg.parallel_stages > 1 else ")"))
    if result["failed"]:
        print(f"{len(result['failed'])} stage(s) did not finish: {', '.join(result['failed'])}; the report covers "
              "the others. Rerun the same command to retry them (finished stages are kept).")
        return 1
    return 0


@contextlib.contextmanager
def ray_for_command() -> Iterator[None]:
    """Shut down, when the block ends, the Ray instance the command started (while output is still
    captured: Ray's goodbye lines belong in the log); one that was running before is left running."""
    running_before = ray_running()
    try:
        yield
    finally:
        if not running_before and ray_running():
            import ray

            ray.shutdown()


def ray_running() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def demo(args: argparse.Namespace) -> int:
    """Exactly the commands a user runs: `diffkd phantom`, `diffkd ingest` per center, `diffkd run`."""
    def diffkd(argv: list[str]) -> int:  # each step as its own command, with the demo's -v
        return main(["-v", *argv] if args.verbose else argv)

    started = time.monotonic()
    out = Path(args.out)
    phantom, data = out / "phantom", out / "data"
    if not (phantom / "cohort.json").exists():
        _check(diffkd(["phantom", "--out", str(phantom), "--size", "demo", "--seed", str(args.seed),
                       "--doppler-fraction", str(args.doppler_fraction), "--workers", "2",
                       "--preview", str(out / "phantom_preview.png")]), "phantom")
    centers = sorted(p.name for p in phantom.iterdir() if (p / "clinical.csv").exists())
    for center in centers:
        _check(diffkd(["ingest", str(phantom / center), "--center", center, "--dataset", str(data),
                       "--clinical", str(phantom / center / "clinical.csv")]), f"ingest {center}")
    external = centers[-1:]  # the last center never trains anything: it is the external validation cohort
    _check(diffkd(["data", "info", str(data), "--external", ",".join(external)]), "data info")
    _check(diffkd(["run", "--dataset", str(data), "--external", ",".join(external), "--config", args.config,
                   "--out", str(out), "--readers", str(phantom / "readers.csv"),
                   "--truth", str(phantom / "truth.csv")]), "run")
    print(f"demo finished in {(time.monotonic() - started) / 60:.1f} min; report: {out / 'report' / 'index.html'}")
    return 0


def _check(status: int, step: str) -> None:
    if status:
        raise SystemExit(f"diffkd demo: the {step} step failed (exit {status}); see the messages above")
