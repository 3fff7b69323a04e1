"""The command grammar: `train {diffusion,teacher,student}`, `synth {run,audit}`, old verbs as announced aliases."""
from __future__ import annotations

import pytest

from diffkd.commands import build_parser, main


def test_help_says_what_the_program_is_for(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "multicenter medical imaging" in out and "thin" not in out


@pytest.mark.parametrize("argv, handler, renamed", [
    (["train", "diffusion", "--dataset", "d", "--out", "o"], "run_diffusion", None),
    (["diffusion", "train", "--dataset", "d", "--out", "o"], "run_diffusion",
     ("diffkd diffusion train", "diffkd train diffusion")),
    (["train", "teacher", "--config", "c", "--dataset", "d", "--out", "o"], "run_teacher", None),
    (["train", "student", "--config", "c", "--dataset", "d", "--out", "o"], "run_student", None),
    (["distill", "--config", "c", "--dataset", "d", "--out", "o"], "run_student",
     ("diffkd distill", "diffkd train student")),
    (["synth", "run", "--dataset", "d", "--model", "m"], "run_synth", None),
    (["synth", "--dataset", "d", "--model", "m"], "run_synth", ("diffkd synth", "diffkd synth run")),
    (["synth", "audit", "--dataset", "d", "--out", "o"], "run_audit", None),
])
def test_new_and_old_forms_reach_the_same_handler(argv, handler, renamed):
    args = build_parser().parse_args(argv)
    assert args.handler.__name__ == handler and getattr(args, "renamed", None) == renamed
    assert args.dataset == "d"


def test_shared_options_mean_the_same_in_every_command():
    parser = build_parser()
    for argv in (["train", "teacher", "--config", "c", "--out", "o"], ["train", "student", "--config", "c", "--out", "o"],
                 ["train", "diffusion", "--out", "o"], ["tune", "kd", "--config", "c", "--out", "o"],
                 ["loco", "--config", "c", "--out", "o"], ["run", "--config", "c", "--out", "o"]):
        args = parser.parse_args([*argv, "--dataset", "d", "--address", "auto"])
        assert (args.dataset, args.address) == ("d", "auto"), argv


def test_an_old_verb_runs_after_printing_the_new_form(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("teacher: {arch: resnet18}\n")
    assert main(["distill", "--dataset", "ds", "--config", str(config), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "`diffkd distill` is now `diffkd train student`" in err and "has no `student` section" in err
