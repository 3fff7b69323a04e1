"""Rerunning `diffkd run` resumes after the last finished stage, and config changes re-run what they affect."""
import pytest

from diffkd.runstate import RunState


def test_finished_stages_are_skipped_and_a_changed_stage_reruns_everything_after_it(tmp_path):
    calls = []

    def stage(name):
        return lambda: calls.append(name) or {"name": name}

    state = RunState.load(tmp_path)
    state.run("a", {"x": 1}, stage("a"), log=lambda m: None)
    state.run("b", {"y": 1}, stage("b"), log=lambda m: None)

    again = RunState.load(tmp_path)
    assert again.run("a", {"x": 1}, stage("a"), log=lambda m: None) == {"name": "a"}
    assert again.run("b", {"y": 1}, stage("b"), log=lambda m: None) == {"name": "b"}
    assert calls == ["a", "b"]

    changed = RunState.load(tmp_path)
    changed.run("a", {"x": 2}, stage("a"), log=lambda m: None)
    changed.run("b", {"y": 1}, stage("b"), log=lambda m: None)  # unchanged, but after a re-run stage
    assert calls == ["a", "b", "a", "b"]


def test_a_failing_stage_is_not_recorded(tmp_path):
    state = RunState.load(tmp_path)

    def boom():
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        state.run("a", {}, boom, log=lambda m: None)
    assert "a" not in RunState.load(tmp_path).stages


def test_a_damaged_state_file_names_itself(tmp_path):
    (tmp_path / "run_state.json").write_text("{")
    with pytest.raises(ValueError, match="run_state.json"):
        RunState.load(tmp_path)
