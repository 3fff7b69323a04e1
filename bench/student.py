"""The student stage, measured side by side in one run; prints one JSON line.

1. footprint: parameters of teacher and student; CPU latency per image at batch 1 and 32 (one
   thread), both models in torch and both in ONNX Runtime, so every speed-up compares like with
   like (same runtime, same batch). Targets: >= 10x fewer parameters, >= 5x faster.
2. kd_effect: external AUC of student_kd (paired logit KD, T=4, alpha=0.9) minus student_plain (same
   architecture, no teacher, no synthetic images), per seed with the DeLong CI of the paired
   difference, and over seeds (mean, t-interval). No diffusion here: this isolates distillation.
3. pairing_free: one teacher trained on us_doppler only, students on B-mode of other patients. Group
   KD (GKD-Pro + GKD-Den, no instance terms) minus instance feature KD on random same-class pairs, with
   the same total KD weight and the same cross-entropy weight (1: neither arm blends a logit term into
   cross-entropy's share), external AUC, same statistics.
4. asha: the same search (tune_spaces/kd.yaml's parameters, Optuna, same seed and trial count) with
   ASHA vs FIFO (every trial its full budget): best internal-validation AUC and total trial-epochs.

Data: the phantom at demo size with a Doppler share (`diffkd phantom --size demo --doppler-fraction`),
ingested like a user's data; the last center is external. A --workdir keeps the data and teacher
between runs. On a shared 2-core machine everything is slow (minutes per student) and latency moves
with the load (`load_avg_1m` is recorded); `--quick` shrinks every part for a smoke run whose AUC
figures mean nothing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit  # noqa: E402


def log(msg: str) -> None:
    print(f"[bench/student] {msg}", file=sys.stderr, flush=True)


# ---- 1. footprint ---------------------------------------------------------------------------------

def footprint(teacher_arch: str, student_arch: str, image_size: int, repeats: int) -> dict:
    from diffkd.models.classifiers import create_classifier
    from diffkd.models.footprint import count_parameters, latency_table

    torch.set_num_threads(1)
    models = {"teacher": create_classifier(teacher_arch, in_chans=1).eval(),
              "student": create_classifier(student_arch, in_chans=1).eval()}
    out: dict = {"teacher_arch": teacher_arch, "student_arch": student_arch, "image_size": image_size,
                 "threads": 1, "params_teacher": count_parameters(models["teacher"]),
                 "params_student": count_parameters(models["student"])}
    table = {name: latency_table(model, image_size, repeats=repeats) for name, model in models.items()}
    for batch in (1, 32):
        key = f"b{batch}"
        out[f"ms_per_image_{key}"] = {f"{name}_{runtime}": table[name][runtime][key]
                                      for name in models for runtime in ("torch", "onnx")}
        # like with like: teacher and student in the same runtime at the same batch
        out[f"speedup_{key}"] = {runtime: table["teacher"][runtime][key] / table["student"][runtime][key]
                                 for runtime in ("torch", "onnx")}
    out["param_ratio"] = out["params_teacher"] / out["params_student"]
    out["targets_met"] = {"params_10x": out["param_ratio"] >= 10,
                          "speed_5x_b1": min(out["speedup_b1"].values()) >= 5}
    return out


# ---- data and teacher -----------------------------------------------------------------------------

def prepare(workdir: str, args) -> tuple:
    from diffkd.data.dataset import ImageDataset
    from diffkd.data.ingest import ingest
    from diffkd.data.phantom import generate_cohort
    from diffkd.data.splits import make_splits

    data = os.path.join(workdir, "data")
    if not ImageDataset(data).exists():
        cohort = os.path.join(workdir, "phantom")
        log(f"phantom: {args.patients or 'demo'} patients, Doppler share {args.doppler_fraction}")
        summary = generate_cohort(cohort, size="demo", patients=args.patients, centers=args.centers,
                                  seed=0, doppler_fraction=args.doppler_fraction, overwrite=True)
        for center in summary.centers:
            ingest(os.path.join(cohort, center["name"]), center["name"], data)
    ds = ImageDataset(data)
    centers = ds.centers()
    splits = make_splits(ds.metadata().to_pandas(), external=[centers[-1]], val_fraction=0.25, seed=0)
    return ds, splits


def teacher(ds, splits, workdir: str, args, modality: str) -> tuple[str, dict]:
    """The teacher of one modality (as `diffkd run` trains them): B-mode for paired KD, Doppler for pairing-free."""
    from diffkd.data.pipeline import PipelineConfig
    from diffkd.train.teacher import TeacherConfig, train_teacher

    out = os.path.join(workdir, f"teacher_{modality}")
    info_path = os.path.join(out, "training.json")
    if not os.path.exists(info_path):
        log(f"teacher {args.teacher_arch}: {modality} only, {args.teacher_epochs} epochs")
        cfg = TeacherConfig(arch=args.teacher_arch, pipeline=PipelineConfig(image_size=args.image_size,
                                                                           modalities=(modality,)),
                            loop=_loop(args, args.teacher_epochs, f"teacher-{modality}", workdir, patience=0))
        train_teacher(ds, splits, cfg, out, model_name=f"teacher_{modality}")
    with open(info_path) as f:
        return out, json.load(f)["metrics"]


def _loop(args, epochs: int, name: str, workdir: str, seed: int = 0, **kw):
    from diffkd.train.loop_config import LoopConfig

    return LoopConfig(epochs=epochs, batch_size=args.batch_size, lr=args.lr, seed=seed, progress=False,
                      storage_path=os.path.join(workdir, "runs"),
                      run_name=f"{name}-{time.strftime('%H%M%S')}-{seed}", **kw)


# ---- 2./3. paired comparisons of students over seeds ------------------------------------------------

def student_run(ds, splits, cfg, workdir: str, name: str) -> "object":
    from diffkd.train.student import train_student

    out = os.path.join(workdir, "students", name)
    started = time.perf_counter()
    result = train_student(ds, splits, cfg, out_dir=out, model_name=name)
    log(f"{name}: val AUC {result.val_auc:.3f}, external {result.metrics.get('external', {}).get('auc', math.nan):.3f}"
        f" ({time.perf_counter() - started:.0f} s)")
    return result.predictions


def compare(ds, splits, make_a, make_b, names: tuple[str, str], seeds: list[int], workdir: str) -> dict:
    """External AUC of a minus b per seed (DeLong CI of the paired difference), then across seeds."""
    from diffkd.evaluate.metrics import delong_test, mean_t_ci

    per_seed = []
    for seed in seeds:
        preds = {}
        for make, name in ((make_a, names[0]), (make_b, names[1])):
            p = student_run(ds, splits, make(seed), workdir, f"{name}-seed{seed}")
            preds[name] = p[p["split"] == "test"].set_index("case_id").sort_index()
        a, b = preds[names[0]], preds[names[1]]
        test = delong_test(a["label"].to_numpy(), a["prob"].to_numpy(), b.loc[a.index, "prob"].to_numpy())
        per_seed.append({"seed": seed, f"auc_{names[0]}": test.auc_a, f"auc_{names[1]}": test.auc_b,
                         "diff": test.difference, "diff_ci95": list(test.ci), "p_delong": test.p, "n": test.n})
    diffs = [r["diff"] for r in per_seed]
    mean, ci = mean_t_ci(diffs)
    return {"a": names[0], "b": names[1], "per_seed": per_seed, "mean_diff": mean, "mean_diff_ci95_t": list(ci),
            "seeds_a_better": sum(d > 0 for d in diffs)}


# ---- 4. ASHA vs full budget --------------------------------------------------------------------------

def asha_vs_fifo(ds, splits, base, workdir: str, args) -> dict:
    from diffkd.experiments.tune import tune_student
    from diffkd.experiments.tune_space import load_space

    space = load_space(os.path.join(os.path.dirname(__file__), "..", "tune_spaces", "kd.yaml"))
    out = {}
    for scheduler in ("asha", "fifo"):
        run_space = dataclasses.replace(space, num_samples=args.trials,
                                        scheduler=dataclasses.replace(space.scheduler, name=scheduler))
        started = time.perf_counter()
        outcome = tune_student(ds.uri, splits, base, run_space, os.path.join(workdir, f"tune-{scheduler}-"
                                                                             f"{time.strftime('%H%M%S')}"))
        out[scheduler] = {"best_val_auc": outcome.best_objective, "trial_epochs": outcome.trial_epochs,
                          "trials": outcome.num_trials, "seconds": time.perf_counter() - started,
                          "best_params": outcome.best_params}
        log(f"{scheduler}: best val AUC {outcome.best_objective:.3f}, {outcome.trial_epochs} trial-epochs")
    out["epochs_saved"] = 1 - out["asha"]["trial_epochs"] / out["fifo"]["trial_epochs"]
    out["best_val_auc_diff"] = out["asha"]["best_val_auc"] - out["fifo"]["best_val_auc"]
    return out


# ---- main ---------------------------------------------------------------------------------------

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default=None, help="keeps data, teacher and students (default: a temp dir)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--patients", type=int, default=None, help="phantom patients (default: demo preset)")
    parser.add_argument("--centers", type=int, default=None)
    parser.add_argument("--doppler-fraction", type=float, default=0.4)
    parser.add_argument("--image-size", type=int, default=96, help="training image size")
    parser.add_argument("--latency-size", type=int, default=224, help="image size of the latency comparison")
    parser.add_argument("--teacher-arch", default="resnet50")
    parser.add_argument("--student-arch", default="mobilenetv3_small_100")
    parser.add_argument("--teacher-epochs", type=int, default=12)
    parser.add_argument("--student-epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--trials", type=int, default=6, help="trials of each search (ASHA vs FIFO)")
    parser.add_argument("--repeats", type=int, default=20, help="latency repetitions at batch 1")
    parser.add_argument("--only", default="footprint,kd,pairing_free,asha",
                        help="comma-separated parts to run")
    parser.add_argument("--quick", action="store_true", help="tiny everything: a smoke run, not a measurement")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.patients, args.centers = 1, args.patients or 120, args.centers or 3
        args.image_size, args.teacher_epochs, args.student_epochs = 48, 2, 2
        args.teacher_arch, args.trials, args.repeats, args.latency_size = "resnet18", 2, 5, 96
    parts = set(args.only.split(","))

    from diffkd.data.pipeline import PipelineConfig
    from diffkd.runtime.raycompat import init_local
    from diffkd.train.student import DistillConfig, StudentConfig, plain_variant

    workdir = args.workdir or tempfile.mkdtemp(prefix="bench-student-")
    os.makedirs(workdir, exist_ok=True)
    started = time.perf_counter()
    result: dict = {"bench": "student", "quick": args.quick, "load_avg_1m": os.getloadavg()[0]}
    if "footprint" in parts:
        result["footprint"] = footprint(args.teacher_arch, args.student_arch, args.latency_size, args.repeats)
        log(f"footprint: {result['footprint']['param_ratio']:.1f}x fewer parameters, "
            f"{result['footprint']['speedup_b1']['torch']:.1f}x faster (torch, batch 1)")
    if parts & {"kd", "pairing_free", "asha"}:
        init_local(num_cpus=max(4, os.cpu_count() or 1))
        ds, splits = prepare(workdir, args)
        teacher_dir, teacher_metrics = teacher(ds, splits, workdir, args, "us")
        result["teacher"] = {"arch": args.teacher_arch, **teacher_metrics}
        result["data"] = {"cases": {s: int((splits["split"] == s).sum()) for s in ("train", "val", "test")},
                          "modalities": splits["modality"].value_counts().to_dict(),
                          "external_center": sorted(set(splits.loc[splits["split"] == "test", "center"]))}
        pipeline = PipelineConfig(image_size=args.image_size)
        seeds = list(range(args.seeds))

        def student(seed: int, **kw) -> StudentConfig:
            return StudentConfig(arch=args.student_arch, **{"teacher_dir": teacher_dir, **kw}, pipeline=pipeline,
                                 loop=_loop(args, args.student_epochs, "student", workdir, seed))

        if "kd" in parts:
            result["kd_effect"] = compare(
                ds, splits, lambda s: student(s, distill=DistillConfig({"logit": {"weight": 0.9, "temperature": 4.0}})),
                lambda s: plain_variant(student(s)), ("student_kd", "student_plain"), seeds, workdir)
        if "pairing_free" in parts:
            doppler_dir, doppler_metrics = teacher(ds, splits, workdir, args, "us_doppler")
            result["teacher_us_doppler"] = {"arch": args.teacher_arch, **doppler_metrics}
            # the same teacher, cross-entropy weight (1) and total KD weight (1.5) in both arms
            group = DistillConfig({"gkd_pro": {"weight": 1.0}, "gkd_den": {"weight": 0.5, "warmup_epochs": 1}})
            instance = DistillConfig({"feature": {"weight": 1.5}})
            result["pairing_free"] = compare(
                ds, splits, lambda s: student(s, teacher_dir=doppler_dir, mode="pairing_free", distill=group),
                lambda s: student(s, teacher_dir=doppler_dir, mode="pairing_free", distill=instance),
                ("group_kd", "instance_kd_random_pairs"), seeds, workdir)
        if "asha" in parts:
            result["asha"] = asha_vs_fifo(ds, splits, student(0), workdir, args)
    result["seconds"] = time.perf_counter() - started
    emit(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
