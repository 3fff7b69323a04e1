"""Ray Tune over the student stage: sizing, the test split kept out, results, a real search and its resume."""
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow.fs
import pytest
import yaml

from diffkd.data.pipeline import PipelineConfig
from diffkd.distill.objective import DistillConfig
from diffkd.train.loop_config import LoopConfig
from diffkd.train.student import StudentConfig
from diffkd.experiments.tune import (DRIVER_CPUS, _searcher, arm_space, load_best_config, plan_concurrency, plot_search,
                                     run_trial, search_base, student_from_dict, training_rows, tune_student)
from diffkd.config import ConfigError, to_dict
from diffkd.experiments.tune_space import Distribution, SchedulerSpec, SearchSpec, TuneSpace, apply_params

ROOT = Path(__file__).resolve().parents[2]


def _space(num_samples=4, concurrent="auto", scheduler="asha"):
    return TuneSpace(params={"distill.terms.logit.temperature": Distribution("loguniform", (1.0, 8.0)),
                             "distill.terms.logit.weight": Distribution("uniform", (0.3, 0.9)),
                             "loop.lr": Distribution("loguniform", (3e-4, 3e-3))},
                     num_samples=num_samples, max_concurrent_trials=concurrent,
                     scheduler=SchedulerSpec(scheduler, grace_period=1, reduction_factor=2),
                     search=SearchSpec("optuna", seed=0), source="test space")


def _student(teacher_dir="", runs="runs", **loop):
    return StudentConfig(arch="mobilenetv3_small_050", teacher_dir=teacher_dir,
                         distill=DistillConfig({"logit": {"weight": 0.9}, "feature": {"weight": 0.5}}),
                         pipeline=PipelineConfig(image_size=32, augment=False),
                         loop=LoopConfig(**{"epochs": 2, "batch_size": 16, "shuffle_buffer": 0, "warmup_fraction": 0.25,
                                            "storage_path": runs, **loop}))


# ---- no Ray needed ---------------------------------------------------------------------------------

def test_a_space_may_vary_a_distillation_option_the_config_leaves_at_its_default():
    cfg = _student()  # its logit term sets only a weight; the temperature is the loss's default
    base = search_base(cfg, _space())
    trial = student_from_dict(apply_params(base, {"distill.terms.logit.temperature": 2.5, "loop.lr": 1e-3}))
    assert trial.distill.options("logit") == {"temperature": 2.5}
    lr_only = TuneSpace(params={"loop.lr": Distribution("loguniform", (1e-4, 1e-3))})
    assert "temperature" not in search_base(cfg, lr_only)["distill"]["terms"]["logit"]  # only what a space varies
    typo = TuneSpace(params={"distill.terms.logit.temprature": Distribution("loguniform", (1.0, 8.0))})
    with pytest.raises(ConfigError, match="temprature"):
        apply_params(search_base(cfg, typo), {"distill.terms.logit.temprature": 2.0})


def test_a_finished_trial_whose_json_log_a_resume_emptied_is_read_from_its_progress_csv(tmp_path):
    from diffkd.experiments.tune import _history

    pd.DataFrame({"epoch": [1, 2], "val_auc": [0.6, 0.7]}).to_csv(tmp_path / "progress.csv", index=False)
    (tmp_path / "result.json").write_text("")

    class Emptied:  # what Ray Tune hands back for such a trial
        metrics_dataframe = None
        path = str(tmp_path)
        filesystem = pyarrow.fs.LocalFileSystem()

    assert _history(Emptied())["val_auc"].tolist() == [0.6, 0.7]


def test_trials_in_flight_fit_the_cluster():
    cfg = _student()  # 1 worker x 1 CPU + 0.75 CPU of data pipeline + the driver's sliver
    assert plan_concurrency(_space(4), cfg, {"CPU": 4.0}) == 2  # 2 physical cores as 4 logical CPUs
    assert plan_concurrency(_space(4, concurrent=8), cfg, {"CPU": 4.0}) == 2  # capped: more would deadlock
    assert plan_concurrency(_space(3), cfg, {"CPU": 64.0}) == 3  # never more than there are trials
    gpu = _student(use_gpu=True, cpus_per_worker=2)
    assert plan_concurrency(_space(16), gpu, {"CPU": 64.0, "GPU": 8.0}) == 8  # every GPU busy
    with pytest.raises(ValueError, match="one trial needs"):
        plan_concurrency(_space(4), cfg, {"CPU": 1.5})
    assert DRIVER_CPUS > 0  # {"CPU": 0} is refused by Ray ("empty head and zero worker bundles")


@pytest.mark.parametrize("search", ["random", "optuna"])
def test_the_searcher_itself_holds_no_more_trials_in_flight_than_planned(search):
    """Ray Tune ignores `max_concurrent_trials` for random search's generator: the bench's search
    started all 8 trials on 2 CPUs and their workers waited for each other's cores."""
    from ray.tune.experiment import Experiment

    space = dataclasses.replace(_space(5, scheduler="fifo"), search=SearchSpec(search, seed=0))
    searcher = _searcher(space, 2)
    if search == "random":
        searcher.add_configurations([Experiment("t", lambda config: None, config=space.ray_param_space(),
                                                num_samples=5)])
    else:
        searcher.set_search_properties("val_auc", "max", space.ray_param_space())

    def next_trial(i):
        return searcher.next_trial() if search == "random" else searcher.suggest(f"t{i}")

    first = [next_trial(i) for i in range(4)]
    assert [t is not None for t in first] == [True, True, False, False]
    done = first[0].trial_id if search == "random" else "t0"
    searcher.on_trial_complete(done, {"val_auc": 0.6} if search == "optuna" else None)
    assert next_trial(9) is not None  # a finished trial frees its place


def test_each_arm_searches_the_parameters_that_apply_to_it_with_the_same_trials():
    from diffkd.config import ConfigError

    space = _space(num_samples=5)
    kd = arm_space(space, _student(teacher_dir="teacher"))
    plain = arm_space(space, _student())  # no teacher: the distillation settings mean nothing to it
    assert list(kd.params) == ["distill.terms.logit.temperature", "distill.terms.logit.weight", "loop.lr"]
    assert list(plain.params) == ["loop.lr"]
    assert kd.num_samples == plain.num_samples == 5  # the same budget
    kd_only = TuneSpace(params={"distill.terms.logit.weight": Distribution("uniform", (0.3, 0.9))}, source="kd only")
    with pytest.raises(ConfigError, match="kd only.*loop.lr"):
        arm_space(kd_only, _student())  # the plain arm would get no search while the KD arm gets one
    no_logit = _student(teacher_dir="teacher")
    no_logit.distill = DistillConfig({"gkd_pro": {"weight": 0.5}})
    assert list(arm_space(space, no_logit).params) == ["loop.lr"]  # a term it does not have is not searched


def test_trials_never_receive_the_external_split():
    table = pd.DataFrame({"case_id": ["a", "b", "c"], "split": ["train", "val", "test"]})
    assert list(training_rows(table)["case_id"]) == ["a", "b"]
    with pytest.raises(RuntimeError, match="external test rows"):
        run_trial({}, dataset="ds", assignments=table, base={}, runs_dir="runs")


def test_search_plots_are_written(tmp_path):
    space = _space()
    trials = pd.DataFrame({"trial": ["t2", "t1", "t3"], "distill.terms.logit.temperature": [3.0, 1.5, 6.0],
                           "distill.terms.logit.weight": [0.6, 0.4, 0.8], "loop.lr": [2e-3, 1e-3, 5e-4],
                           "val_auc": [0.7, 0.6, float("nan")], "epochs": [2, 1, 0]})
    curves = pd.DataFrame({"trial": ["t1", "t2", "t2"], "epoch": [1, 1, 2], "val_auc": [0.6, 0.65, 0.7]})
    files = plot_search(trials, curves, space, str(tmp_path))
    for path in files.values():
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- real searches (slow) -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tune_data(tmp_path_factory, two_modality_dataset, two_modality_splits):
    import torch

    from diffkd.models.classifiers import create_classifier, save_classifier

    root = tmp_path_factory.mktemp("tune")
    ds = two_modality_dataset(root / "ds", n_us=24, n_doppler=4)
    torch.manual_seed(0)
    teacher = str(root / "teacher")
    save_classifier(create_classifier("resnet18", in_chans=1, num_classes=2), teacher)
    return ds, two_modality_splits(ds), teacher


def _live_placement_groups(ray) -> list[str]:
    return [pg for pg, info in ray.util.placement_group_table().items() if info["state"] != "REMOVED"]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_four_trial_search_finishes_on_two_cpus_and_writes_its_best_config(tune_data, ray_local, tmp_path):
    ds, table, teacher = tune_data
    space = _space(4)
    cfg = _student(teacher, runs=str(tmp_path / "unused"))
    outcome = tune_student(ds.uri, table, cfg, space, str(tmp_path / "search"))

    assert outcome.complete and outcome.num_trials == 4
    trials = pd.read_csv(outcome.files["trials"])
    assert len(trials) == 4 and trials["val_auc"].notna().all()
    assert outcome.best_objective == trials["val_auc"].max()
    assert 4 <= outcome.trial_epochs <= 8  # ASHA may stop trials after their grace epoch
    best = load_best_config(outcome.files["best_config"])
    for name, dist in space.params.items():
        value = to_dict(best)
        for key in name.split("."):
            value = value[key]
        assert dist.contains(value) and value == pytest.approx(outcome.best_params[name])
    assert best.teacher_dir == teacher and best.arch == cfg.arch  # the rest of the base config is kept
    curves = pd.read_csv(outcome.files["curves"])
    assert trials["trial"].nunique() == 4
    assert set(curves["trial"].astype(str)) == set(trials["trial"].astype(str))
    for key in ("objective_plot", "curves_plot"):
        assert Path(outcome.files[key]).stat().st_size > 1000
    with pytest.raises(ValueError, match="pass --resume"):
        tune_student(ds.uri, table, cfg, space, str(tmp_path / "search"))
    # Trials ASHA stopped must not keep their workers' CPUs reserved (the reaper removes their groups).
    deadline = time.monotonic() + 60
    while _live_placement_groups(ray_local) and time.monotonic() < deadline:
        time.sleep(2)
    assert not _live_placement_groups(ray_local)


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_an_interrupted_search_resumes(tune_data, ray_local, tmp_path):
    """Ctrl-C a `diffkd tune` process once its first trial has reported, then finish it with --resume."""
    ds, table, teacher = tune_data
    config = tmp_path / "config.yaml"
    cfg = _student(teacher, runs=str(tmp_path / "unused"))
    from diffkd.config import to_dict

    config.write_text(yaml.safe_dump({"student": to_dict(cfg)}))
    space_file = tmp_path / "space.yaml"
    space_file.write_text(yaml.safe_dump({
        "num_samples": 4, "max_concurrent_trials": 1,
        "scheduler": {"name": "fifo"}, "search": {"name": "optuna", "seed": 0},
        "params": {"distill.terms.logit.temperature": {"loguniform": [1.0, 8.0]}, "loop.lr": {"loguniform": [3e-4, 3e-3]}}}))
    out = tmp_path / "search"
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_TMPDIR": ray_tmp}
    command = [sys.executable, "-m", "diffkd.cli", "tune", "--space", str(space_file), "--dataset", ds.uri,
               "--external", "C", "--config", str(config), "--out", str(out)]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            if any(p.stat().st_size > 0 for p in (out / "search").glob("*/result.json")):
                break
            time.sleep(2)
        assert proc.poll() is None, f"the search ended before it could be interrupted:\n{proc.stdout.read()}"
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    interrupted = pd.read_csv(out / "trials.csv") if (out / "trials.csv").exists() else None
    assert proc.returncode != 0, log
    assert interrupted is None or (interrupted["epochs"] > 0).sum() < 4

    from diffkd.experiments.tune_space import load_space

    outcome = tune_student(ds.uri, table, cfg, load_space(str(space_file)), str(out), resume=True)
    assert outcome.complete and outcome.num_trials == 4
    trials = pd.read_csv(outcome.files["trials"])
    assert (trials["epochs"] == 2).all()  # FIFO: every trial ran its full budget, across the interruption
    assert Path(outcome.files["best_config"]).exists()


def test_cli_errors_are_clear_before_anything_starts(tmp_path, capsys):
    from diffkd.cli import main

    config = tmp_path / "c.yaml"
    config.write_text("teacher: {arch: resnet18}\n")
    assert main(["distill", "--dataset", "ds", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "has no `student` section" in capsys.readouterr().err
    config.write_text("student: {arch: mobilenetv3_small_050}\n")
    assert main(["distill", "--dataset", "ds", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    assert "pass --teacher DIR" in capsys.readouterr().err
    assert main(["tune", "kd", "--space", "x.yaml", "--dataset", "ds", "--config", str(config),
                 "--out", str(tmp_path / "t")]) == 2
    assert "either by name" in capsys.readouterr().err
