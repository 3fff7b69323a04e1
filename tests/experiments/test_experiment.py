"""The one config reader: sections as dataclasses, the shared `pipeline` base, old layouts with a warning."""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from diffkd.config import ConfigError, LayoutDeprecationWarning
from diffkd.experiments.experiment import DiffusionStage, ExperimentConfig, load_experiment, load_section

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def _write(tmp_path, data) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("name", ["demo.yaml", "paper.yaml", "diffusion_example.yaml", "teacher_example.yaml"])
def test_every_shipped_config_is_in_the_current_layout(name):
    with warnings.catch_warnings():
        warnings.simplefilter("error", LayoutDeprecationWarning)
        for section in ("diffusion", "teacher", "student", "synth", "audit"):
            load_section(CONFIGS / name, section)


def test_a_section_read_alone_equals_the_same_section_of_the_whole_experiment():
    whole = load_experiment(CONFIGS / "demo.yaml")
    assert isinstance(whole, ExperimentConfig)
    for section in ("diffusion", "synth", "audit", "teacher", "student", "baselines"):
        assert load_section(CONFIGS / "demo.yaml", section) == getattr(whole, section), section


def test_the_top_level_pipeline_is_the_base_of_every_stage_pipeline(tmp_path):
    path = _write(tmp_path, {"pipeline": {"image_size": 48, "batch_size": 8},
                             "teacher": {"pipeline": {"image_size": 96}}, "student": {"arch": "resnet18"}})
    teacher, student = load_section(path, "teacher"), load_section(path, "student")
    assert (teacher.pipeline.image_size, teacher.pipeline.batch_size) == (96, 8)  # the stage's block wins
    assert (student.pipeline.image_size, student.pipeline.batch_size) == (48, 8)
    experiment = load_experiment(path)  # `diffkd run` reads the same file the same way
    assert experiment.teacher.pipeline == teacher.pipeline and experiment.student.pipeline == student.pipeline


def test_the_old_diffusion_layout_reads_as_the_new_one_with_a_warning(tmp_path):
    new = load_section(CONFIGS / "diffusion_example.yaml", "diffusion")
    current = yaml.safe_load((CONFIGS / "diffusion_example.yaml").read_text())
    old = {**current, "diffusion": current["diffusion"]["model"], "diffusion_loop": current["diffusion"]["loop"]}
    with pytest.warns(LayoutDeprecationWarning, match="write `diffusion: {model: <the old diffusion section>"):
        upgraded = load_section(_write(tmp_path, old), "diffusion")
    assert upgraded == new and upgraded.model.model.image_size == 256 and upgraded.loop.zero_stage == 2
    only_network = {"diffusion": {"model": {"image_size": 32, "block_out_channels": [32, 64]}}}
    with pytest.warns(LayoutDeprecationWarning):
        assert load_section(_write(tmp_path, only_network), "diffusion").model.model.image_size == 32


def test_missing_and_unknown_sections_are_clear(tmp_path):
    path = _write(tmp_path, {"teacher": {"arch": "resnet18"}})
    assert load_section(path, "diffusion") == DiffusionStage()  # absent: the stage's defaults
    with pytest.raises(ConfigError, match="has no `student` section"):
        load_section(path, "student", required=True)
    with pytest.raises(ConfigError, match="no config section 'pipline'"):
        load_section(path, "pipline")
    with pytest.raises(ConfigError, match="unknown key.*archh.*teacher"):
        load_section(_write(tmp_path, {"teacher": {"archh": "resnet18"}}), "teacher")
