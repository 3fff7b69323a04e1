"""`Pipeline.execute`: stages one at a time, or several at once in threads where none reads another's outputs."""
import threading
import time

import pytest

from diffkd.experiments.runstate import RunState
from diffkd.experiments.stages import Pipeline, Stage


class Recorder:
    """Stage functions that record when they start and end, and how many ran at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.running = 0
        self.most_at_once = 0
        self.in_main_thread: dict[str, bool] = {}

    def stage(self, name, reads=(), seconds=0.2, exclusive=False, fail=False, config=None, classifier=False):
        def run():
            with self.lock:
                self.events.append(("start", name))
                self.in_main_thread[name] = threading.current_thread() is threading.main_thread()
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
            time.sleep(seconds)
            with self.lock:
                self.running -= 1
                self.events.append(("end", name))
            if fail:
                raise RuntimeError(f"{name} broke")
            return {"name": name}
        return Stage(name, tuple(reads), {"x": config}, run, f"models/{name}", classifier=classifier,
                     exclusive=exclusive)

    def index(self, kind, name):
        return self.events.index((kind, name))


def pipeline(tmp_path, parallel):
    return Pipeline(ds=None, external=[], assignments=None, cfg=None, out=tmp_path, state=RunState.load(tmp_path),
                    common={}, parallel=parallel)


def test_independent_stages_overlap_and_readers_wait_for_what_they_read(tmp_path):
    rec, p = Recorder(), pipeline(tmp_path, parallel=2)
    p.execute([rec.stage("diffusion", seconds=0.4), rec.stage("synth", reads=("diffusion",)),
               rec.stage("baselines"), rec.stage("teacher_real_only")])
    assert rec.most_at_once == 2
    assert rec.index("start", "baselines") < rec.index("end", "diffusion")  # beside the generator, not after it
    assert rec.index("start", "synth") > rec.index("end", "diffusion")
    assert set(p.results) == {"diffusion", "synth", "baselines", "teacher_real_only"}
    assert [s.name for s in p.executed] == ["diffusion", "synth", "baselines", "teacher_real_only"]  # declared


def test_no_more_stages_run_at_once_than_the_slots(tmp_path):
    rec, p = Recorder(), pipeline(tmp_path, parallel=2)
    p.execute([rec.stage(f"s{i}", seconds=0.1) for i in range(5)])
    assert rec.most_at_once == 2
    assert len(p.state.stages) == 5


def test_one_slot_runs_in_declaration_order_in_this_thread(tmp_path):
    rec, p = Recorder(), pipeline(tmp_path, parallel=1)
    p.execute([rec.stage("a", seconds=0), rec.stage("b", seconds=0)])
    assert rec.events == [("start", "a"), ("end", "a"), ("start", "b"), ("end", "b")]
    assert rec.in_main_thread == {"a": True, "b": True}


def test_an_exclusive_stage_runs_alone_in_the_main_thread_and_nothing_declared_after_it_overtakes_it(tmp_path):
    rec, p = Recorder(), pipeline(tmp_path, parallel=2)
    p.execute([rec.stage("a", seconds=0.3), rec.stage("search", exclusive=True), rec.stage("b", seconds=0.1)])
    search_start, search_end = rec.index("start", "search"), rec.index("end", "search")
    assert search_start > rec.index("end", "a")
    assert rec.index("start", "b") > search_end
    assert rec.most_at_once == 1
    assert rec.in_main_thread == {"a": False, "search": True, "b": False}  # Tune expects the main thread


def test_a_generator_reading_a_result_waits_for_that_stage_only(tmp_path):
    rec, p = Recorder(), pipeline(tmp_path, parallel=2)
    seen = {}

    def declarations():
        yield rec.stage("synth", seconds=0.3)
        yield rec.stage("baselines", seconds=0.6)
        seen["synth"] = p.result("synth")  # shapes the next declaration, as the teacher's mixing does
        seen["baselines_ended"] = "baselines" in p.results
        yield rec.stage("teacher", reads=("synth",), config=seen["synth"]["name"])

    p.execute(declarations())
    assert seen == {"synth": {"name": "synth"}, "baselines_ended": False}
    assert rec.index("start", "teacher") < rec.index("end", "baselines")
    assert p.result("not_declared") is None


def test_a_failed_stage_is_recorded_its_readers_are_not_run_and_the_rest_finish(tmp_path):
    rec, p = Recorder(), pipeline(tmp_path, parallel=2)
    p.execute([rec.stage("teacher", fail=True), rec.stage("student", reads=("teacher",)), rec.stage("baselines")])
    assert p.results == {"teacher": None, "student": None, "baselines": {"name": "baselines"}}
    assert p.state.failed["teacher"].startswith("failed: RuntimeError: teacher broke")
    assert p.state.failed["student"].startswith("not run")
    assert ("start", "student") not in rec.events


def test_a_fault_outside_the_stage_functions_reaches_the_caller(tmp_path, monkeypatch):
    rec, p = Recorder(), pipeline(tmp_path, parallel=2)

    def broken_record(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(p.state, "try_run", broken_record)
    with pytest.raises(OSError, match="disk full"):
        p.execute([rec.stage("a"), rec.stage("b")])


def test_the_report_lists_models_the_same_way_whatever_order_they_ended_in(tmp_path):
    rec, p = Recorder(), pipeline(tmp_path, parallel=2)
    names = ["teacher_real_only", "teacher_us_doppler", "student_pairing_free", "teacher", "student_kd",
             "student_plain"]
    p.execute([rec.stage(n, seconds=0.05 * (len(names) - i), classifier=True) for i, n in enumerate(names)])
    assert list(p.model_dirs()) == ["teacher", "teacher_real_only", "teacher_us_doppler", "student_kd",
                                    "student_pairing_free", "student_plain"]
