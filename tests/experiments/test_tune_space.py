"""Search spaces as YAML: parsing, checks with clear errors, and applying sampled values to a config."""
from pathlib import Path

import pytest

from diffkd.config import ConfigError
from diffkd.experiments.tune_space import Distribution, apply_params, load_space

ROOT = Path(__file__).resolve().parents[2]


def _write(tmp_path, text):
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_the_shipped_kd_space_loads_and_maps_to_ray():
    space = load_space(ROOT / "tune_spaces" / "kd.yaml")
    assert space.objective == "val_auc" and space.mode == "max"
    assert space.params["distill.terms.logit.temperature"] == Distribution("loguniform", (1.0, 10.0))
    assert {"distill.terms.logit.weight", "distill.terms.gkd_pro.weight", "loop.lr"} <= set(space.params)
    from ray.tune.search.sample import Float

    ray_space = space.ray_param_space()
    assert isinstance(ray_space["distill.terms.logit.temperature"], Float)
    assert 1.0 <= ray_space["distill.terms.logit.temperature"].sample() <= 10.0
    # the student's schedule is searched too, and ASHA's budget stretches to the longest choice
    assert {"loop.epochs", "loop.patience", "distill.synthetic_labels"} <= set(space.params)
    assert space.max_epochs(5) == 30 and space.max_epochs(40) == 40
    assert load_space(ROOT / "tune_spaces" / "kd_demo.yaml").max_epochs(6) == 6  # epochs not searched there


@pytest.mark.parametrize("config", [ROOT / "configs" / "demo.yaml", ROOT / "configs" / "paper.yaml"],
                         ids=lambda p: p.name)
def test_every_shipped_space_names_real_fields_of_the_student_it_searches(config):
    from diffkd.config import to_dict
    from diffkd.experiments.experiment import load_experiment
    from diffkd.experiments.tune import student_from_dict

    experiment = load_experiment(config)
    space = load_space(ROOT / experiment.tune.space)
    base = to_dict(experiment.student)
    for end in (0, 1):  # the low and the high end of each range
        sample = {name: dist.args[end] for name, dist in space.params.items()}
        student_from_dict(apply_params(base, sample))  # every path exists and every value type fits


def test_a_space_in_the_old_flat_distill_layout_is_read_with_a_warning_naming_the_new_paths(tmp_path):
    from diffkd.config import LayoutDeprecationWarning

    old = "params:\n  distill.alpha: {uniform: [0.3, 0.9]}\n  distill.den_weight: {uniform: [0.0, 1.0]}\n"
    with pytest.warns(LayoutDeprecationWarning, match="'distill.terms.logit.weight'"):
        space = load_space(_write(tmp_path, old))
    assert set(space.params) == {"distill.terms.logit.weight", "distill.terms.gkd_den.weight"}


def test_an_external_objective_is_refused(tmp_path):
    path = _write(tmp_path, "objective: test_auc\nparams:\n  loop.lr: {loguniform: [0.001, 0.01]}\n")
    with pytest.raises(ConfigError, match="not an internal-validation metric"):
        load_space(path)


@pytest.mark.parametrize("spec, message", [
    ("{lognormal: [1, 2]}", "unknown distribution 'lognormal'"),
    ("{uniform: [2, 1]}", "low 2 must be below high 1"),
    ("{loguniform: [0, 1]}", "loguniform needs low > 0"),
    ("{uniform: [1]}", "uniform takes 2 numbers"),
    ("[1, 2]", "must be one mapping"),
])
def test_bad_distributions_name_file_and_parameter(tmp_path, spec, message):
    path = _write(tmp_path, f"params:\n  loop.lr: {spec}\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_space(path)
    assert str(path) in str(err.value) and "loop.lr" in str(err.value)


def test_unknown_top_level_and_scheduler_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unknown key"):
        load_space(_write(tmp_path, "trials: 3\nparams:\n  a.b: {choice: [1, 2]}\n"))
    with pytest.raises(ConfigError, match="unknown key"):
        load_space(_write(tmp_path, "scheduler: {grace: 1}\nparams:\n  a.b: {choice: [1, 2]}\n"))
    with pytest.raises(ConfigError, match="needs a non-empty `params`"):
        load_space(_write(tmp_path, "objective: val_auc\n"))


def test_apply_params_sets_dotted_paths_without_touching_the_base():
    base = {"student": {"distill": {"temperature": 4.0, "alpha": 0.9}}, "loop": {"lr": 1e-3}}
    out = apply_params(base, {"student.distill.temperature": 2.5, "loop.lr": 3e-4})
    assert out["student"]["distill"] == {"temperature": 2.5, "alpha": 0.9} and out["loop"]["lr"] == 3e-4
    assert base["student"]["distill"]["temperature"] == 4.0
    with pytest.raises(ConfigError, match="'student.distill.temprature' unknown"):
        apply_params(base, {"student.distill.temprature": 1.0})


def test_distribution_contains():
    assert Distribution("randint", (1, 4)).contains(3) and not Distribution("randint", (1, 4)).contains(4)
    assert Distribution("choice", ("mse", "attention")).contains("mse")
    assert not Distribution("uniform", (0.0, 1.0)).contains(1.5)
