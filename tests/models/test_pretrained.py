"""Pretrained starts: `pretrained:` for classifiers (local file, timm folder, hf-hub id) and `init_from:` for the
diffusion UNet. Every test saves the weights it loads; nothing is downloaded."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from diffkd.models.classifiers import create_classifier, initialised_from, save_classifier


def _same(a: torch.nn.Module, b: torch.nn.Module, skip: str = "@") -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


def test_a_saved_timm_folder_starts_the_model_with_its_weights(tmp_path):
    torch.manual_seed(0)
    source = create_classifier("resnet18", in_chans=1)
    save_classifier(source, str(tmp_path / "teacher"))
    started = create_classifier("resnet18", in_chans=1, pretrained=str(tmp_path / "teacher"))
    assert _same(source, started)  # head included: the folder says 2 classes, as the model has
    assert not _same(source, create_classifier("resnet18", in_chans=1))  # without it: random


def test_an_rgb_weights_file_is_adapted_to_gray_input_with_a_fresh_head(tmp_path):
    torch.manual_seed(0)
    imagenet_like = create_classifier("resnet18", in_chans=3, num_classes=1000)
    save_file(imagenet_like.state_dict(), str(tmp_path / "rgb.safetensors"))
    torch.save(imagenet_like.state_dict(), tmp_path / "rgb.pth")
    for name in ("rgb.safetensors", "rgb.pth"):
        gray = create_classifier("resnet18", in_chans=1, pretrained=str(tmp_path / name))
        assert torch.allclose(gray.conv1.weight, imagenet_like.conv1.weight.sum(1, keepdim=True))  # timm's rule
        assert torch.equal(gray.layer4[1].conv2.weight, imagenet_like.layer4[1].conv2.weight)
        assert gray.fc.weight.shape == (2, 512)


def test_weights_of_another_architecture_or_nowhere_are_refused_with_the_reason(tmp_path):
    save_classifier(create_classifier("resnet18"), str(tmp_path / "r18"))
    with pytest.raises(ValueError, match="holds a 'resnet18' model.*'resnet34'"):
        create_classifier("resnet34", pretrained=str(tmp_path / "r18"))
    save_file(create_classifier("resnet18").state_dict(), str(tmp_path / "r18.safetensors"))
    with pytest.raises(ValueError, match="lacks .* of the 'resnet34' model's tensors"):
        create_classifier("resnet34", pretrained=str(tmp_path / "r18.safetensors"))  # timm alone half-loads it
    with pytest.raises(FileNotFoundError, match="neither a weights file"):
        create_classifier("resnet18", pretrained=str(tmp_path / "absent"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        create_classifier("resnet18", pretrained=str(tmp_path / "empty"))


def test_an_hf_hub_id_out_of_reach_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # never touch the network
    with pytest.raises(RuntimeError, match="hf-hub:timm/resnet18.a1_in1k.*local folder"):
        create_classifier("resnet18", pretrained="hf-hub:timm/resnet18.a1_in1k")
    assert initialised_from("hf-hub:timm/resnet18.a1_in1k").startswith(
        "hf-hub:timm/resnet18.a1_in1k (revision not resolved")
    assert initialised_from("") == "scratch"


def test_hf_hub_ids_are_pinned_to_the_revision_they_resolve_to(monkeypatch):
    import huggingface_hub

    from diffkd.models.classifiers import pretrained_overlay, resolve_pretrained

    asked = []

    def model_info(self, repo, revision=None):
        asked.append((repo, revision))
        return type("Info", (), {"sha": "0123456789abcdef0123456789abcdef01234567"})()

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    resolve_pretrained.cache_clear()
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert initialised_from("hf-hub:org/net") == f"hf-hub:org/net@{sha}"
    assert initialised_from("hf-hub:org/net@v2") == f"hf-hub:org/net@{sha}" and ("org/net", "v2") in asked
    pinned = "hf-hub:org/net@" + "f" * 40
    n = len(asked)
    assert initialised_from(pinned) == pinned and len(asked) == n  # a commit given is not looked up
    assert pretrained_overlay(pinned, "resnet18") == {"hf_hub_id": "org/net@" + "f" * 40}
    resolve_pretrained.cache_clear()


class _RunsCode:
    def __reduce__(self):
        return (exec, ("import pathlib; pathlib.Path('PWNED').write_text('x')",))


def test_a_weights_file_holding_pickled_code_is_refused_and_never_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = create_classifier("resnet18", in_chans=1).state_dict()
    state["extra"] = _RunsCode()
    torch.save(state, tmp_path / "evil.pth")
    with pytest.raises(Exception, match="(?i)weights.only|unpickl|global"):
        create_classifier("resnet18", in_chans=1, pretrained=str(tmp_path / "evil.pth"))
    assert not (tmp_path / "PWNED").exists()


def test_a_local_start_is_recorded_by_name_and_digest_not_by_path(tmp_path):
    save_classifier(create_classifier("resnet18"), str(tmp_path / "r18"))
    recorded = initialised_from(str(tmp_path / "r18"))
    assert recorded.startswith("r18 (sha256 ") and str(tmp_path) not in recorded


def test_teacher_and_student_stages_build_from_their_pretrained_setting(tmp_path):
    from diffkd.data.pipeline import PipelineConfig
    from diffkd.train.student import StudentConfig, StudentTask, plain_variant
    from diffkd.train.teacher import TeacherConfig, build_teacher

    source = create_classifier("resnet18", in_chans=1)
    save_classifier(source, str(tmp_path / "r18"))
    teacher = build_teacher(TeacherConfig(arch="resnet18", pretrained=str(tmp_path / "r18"),
                                          pipeline=PipelineConfig(image_size=32)))
    assert _same(source, teacher)
    small = create_classifier("mobilenetv3_small_050", in_chans=1)
    save_classifier(small, str(tmp_path / "mnv3"))
    cfg = StudentConfig(arch="mobilenetv3_small_050", pretrained=str(tmp_path / "mnv3"),
                        pipeline=PipelineConfig(image_size=32))
    assert _same(small, StudentTask(cfg).build_student())
    assert plain_variant(cfg).pretrained == cfg.pretrained  # the no-KD control starts from the same weights


def test_the_diffusion_unet_starts_from_a_diffusers_folder(tmp_path):
    from diffkd.models.diffusion import DiffusionModelConfig, build_denoiser
    from diffkd.train.diffusion_task import DiffusionConfig, DiffusionTask, generator_start

    model = DiffusionModelConfig(image_size=16, block_out_channels=[16, 32], layers_per_block=1, condition_dim=16)
    source = build_denoiser(model, ["A"]).unet
    source.save_pretrained(tmp_path / "pipe" / "unet")  # a pipeline folder's unet/ works, as a UNet folder does
    config = DiffusionConfig(model=model, centers=["A"], init_from=str(tmp_path / "pipe"))
    started = DiffusionTask(config).build_model()
    assert _same(source, started.model.unet) and _same(source, started.ema.unet)
    assert generator_start(config) == str(tmp_path / "pipe") and generator_start(DiffusionConfig()) == "scratch"

    wider = DiffusionModelConfig(image_size=16, block_out_channels=[32, 32], layers_per_block=1, condition_dim=16)
    with pytest.raises(ValueError, match="does not match diffusion.model"):
        DiffusionTask(DiffusionConfig(model=wider, centers=["A"], init_from=str(tmp_path / "pipe"))).build_model()
    with pytest.raises(ValueError, match="exclude each other"):
        DiffusionConfig(init_from="a", base_model="b")
