from dataclasses import dataclass, field

import pytest

from diffkd.config import ConfigError, from_dict, load_yaml


@dataclass
class Inner:
    steps: int = 1


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)
    rate: float = 0.1


def test_nested_sections_build_dataclasses():
    assert from_dict(Outer, {"inner": {"steps": 3}}) == Outer(Inner(3), 0.1)


def test_a_typo_is_an_error_naming_the_key_and_section():
    with pytest.raises(ConfigError, match=r"stpes.*inner"):
        from_dict(Outer, {"inner": {"stpes": 3}})


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_yaml(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
