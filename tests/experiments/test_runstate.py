"""Rerunning `diffkd run` resumes: a config change re-runs that stage and the stages reading it, nothing else."""
import pytest

from diffkd.experiments.runstate import RunState, StageUnavailable


class Stages:
    """A small pipeline shaped like `diffkd run`'s: teacher -> tune -> student; baselines alone."""

    def __init__(self):
        self.calls = []

    def stage(self, name):
        return lambda: self.calls.append(name) or {"name": name}

    def run(self, out, teacher=1, tune=1, student=1, baselines=1, fail=()):
        state = RunState.load(out)
        for name, config, after in (("teacher", teacher, []), ("tune", tune, ["teacher"]),
                                    ("student", student, ["tune"]), ("baselines", baselines, [])):
            fn = self.stage(name)
            if name in fail:
                fn = self.boom
            state.try_run(name, {"x": config}, fn, after=after)
        return state

    @staticmethod
    def boom():
        raise RuntimeError("worker died\nwith a second line")


def test_finished_stages_are_skipped(tmp_path):
    stages = Stages()
    stages.run(tmp_path)
    stages.run(tmp_path)
    assert stages.calls == ["teacher", "tune", "student", "baselines"]


def test_a_changed_stage_reruns_with_its_readers_only(tmp_path):
    stages = Stages()
    stages.run(tmp_path)
    stages.calls.clear()
    stages.run(tmp_path, baselines=2)  # the baselines read no other stage: nothing else re-runs
    assert stages.calls == ["baselines"]
    stages.calls.clear()
    stages.run(tmp_path, baselines=2, tune=2)  # the search and the student that reads it; not the teacher
    assert stages.calls == ["tune", "student"]
    stages.calls.clear()
    stages.run(tmp_path, baselines=2, tune=2, teacher=2)  # the teacher, and through the search the student
    assert stages.calls == ["teacher", "tune", "student"]


def test_a_stage_rerun_with_an_unchanged_config_still_reruns_its_readers(tmp_path):
    stages = Stages()
    stages.run(tmp_path)
    state = RunState.load(tmp_path)
    del state.stages["teacher"]  # e.g. its record lost: it runs again, and its outputs are new
    state._save()
    stages.calls.clear()
    stages.run(tmp_path)
    assert stages.calls == ["teacher", "tune", "student"]


def test_a_failing_stage_keeps_the_finished_ones_and_skips_only_its_readers(tmp_path):
    stages = Stages()
    state = stages.run(tmp_path, fail=("tune",))
    assert stages.calls == ["teacher", "baselines"]
    assert state.failed["tune"] == "failed: RuntimeError: worker died"
    assert state.failed["student"].startswith("not run: it needs tune")
    recorded = RunState.load(tmp_path).stages
    assert set(recorded) == {"teacher", "baselines"}
    stages.calls.clear()
    stages.run(tmp_path)  # the retry runs only what did not finish
    assert stages.calls == ["tune", "student"]


def test_run_refuses_a_stage_whose_inputs_did_not_finish(tmp_path):
    state = RunState.load(tmp_path)
    with pytest.raises(StageUnavailable, match="needs teacher"):
        state.run("student", {}, lambda: {}, after=["teacher"])
    with pytest.raises(RuntimeError):
        state.run("teacher", {}, Stages.boom)
    assert "teacher" not in RunState.load(tmp_path).stages


def test_a_damaged_state_file_names_itself(tmp_path):
    (tmp_path / "run_state.json").write_text("{")
    with pytest.raises(ValueError, match="run_state.json"):
        RunState.load(tmp_path)
