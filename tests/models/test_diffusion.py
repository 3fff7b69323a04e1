"""Stage 1: the conditional denoiser, its plain step, EMA, and the diffusers pipeline folder."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from diffkd.data.pipeline import load_arrays
from diffkd.models.diffusion import (ConditionalDiffusionPipeline, DiffusionModelConfig, build_denoiser,
                                     load_pipeline, save_pipeline, training_scheduler)
from diffkd.models.diffusion import TRAINING_INFO
from diffkd.train.diffusion_task import (DenoiserWithEMA, DiffusionConfig, DiffusionTask,
                                         diffusion_loss, generator_pipeline_config, to_model_range)

TINY = DiffusionModelConfig(image_size=16, block_out_channels=(16, 32), condition_dim=32)


def tiny_config(**kw) -> DiffusionConfig:
    return DiffusionConfig(model=kw.pop("model", TINY), centers=["A", "B"], **kw)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_dataset) -> dict:
    ds = tiny_dataset(tmp_path_factory.mktemp("diff") / "ds", per_center=8)
    arrays = load_arrays(ds, None, generator_pipeline_config(tiny_config(), batch_size=16))
    return {k: (v.tolist() if v.dtype == object else torch.from_numpy(v)) for k, v in arrays.items()}


def test_batches_map_back_to_the_model_range(batch):
    x = to_model_range(batch["image"], tiny_config())
    assert x.shape == (16, 1, 16, 16)
    assert -1.0 - 1e-5 <= float(x.min()) and float(x.max()) <= 1.0 + 1e-5
    assert float(x.max()) > 0.5 and float(x.min()) < -0.5  # bright discs and dark squares survive


def test_the_plain_step_trains_without_ray(batch):
    cfg = tiny_config()
    task = DiffusionTask(cfg)
    model = task.build_model()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    t = torch.full((16,), 300)

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(diffusion_loss(model.model, batch, task.scheduler, cfg, train=False,
                                        generator=torch.Generator().manual_seed(0), timesteps=t).loss)

    before = fixed_loss()
    for _ in range(30):
        out = task.step(model, batch)
        assert out.num_samples == 16 and out.loss.ndim == 0
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        task.after_optimizer_step(model)
    after = fixed_loss()
    assert after < 0.7 * before
    # The EMA moved away from the initial weights but is not the live model.
    assert int(model.ema_steps) == 30
    live, ema = model.model.unet.conv_in.weight, model.ema.unet.conv_in.weight
    assert not torch.equal(live, ema) and not ema.requires_grad


def test_v_prediction_targets_differ_from_epsilon(batch):
    eps_cfg = tiny_config(model=DiffusionModelConfig(**{**TINY.__dict__, "prediction_type": "epsilon"}))
    v_cfg = tiny_config(model=DiffusionModelConfig(**{**TINY.__dict__, "prediction_type": "v_prediction"}))
    model = DiffusionTask(eps_cfg).build_model().model.eval()
    t = torch.full((16,), 900)
    losses = [float(diffusion_loss(model, batch, training_scheduler(c.model), c, train=False,
                                   generator=torch.Generator().manual_seed(1), timesteps=t).loss)
              for c in (eps_cfg, v_cfg)]
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


def test_condition_dropout_reaches_the_null_tokens():
    model = build_denoiser(TINY, ["A", "B"])
    enc = model.condition_encoder
    cond = enc.encode_rows([{"label": 1, "center": "A", "modality": "us", "age": 60.0},
                            {"label": 0, "center": "elsewhere", "modality": "us"}])
    assert cond["center_idx"].tolist() == [0, enc.center_unknown]
    dropped = enc(**cond, drop=torch.tensor([True, True]))
    assert torch.allclose(dropped[0], dropped[1])  # fully dropped rows are identical, whatever they were
    kept = enc(**cond)
    assert not torch.allclose(kept[0], kept[1])
    with pytest.raises(ValueError, match="condition row 0: label 7"):
        enc.encode_rows([{"label": 7, "center": "A"}])


def test_wrong_image_size_is_a_clear_error(batch):
    cfg = tiny_config(model=DiffusionModelConfig(image_size=32, block_out_channels=(16, 32), condition_dim=32))
    task = DiffusionTask(cfg)
    with pytest.raises(ValueError, match=r"expects \(1, 32, 32\)"):
        task.step(task.build_model(), batch)


def test_the_pipeline_folder_round_trips_to_identical_samples(tmp_path):
    torch.manual_seed(0)
    denoiser = build_denoiser(TINY, ["A", "B"])
    out = tmp_path / "models" / "diffusion"
    save_pipeline(denoiser, training_scheduler(TINY).config, out, extra_json={TRAINING_INFO: {"note": "x"}})
    assert sorted(os.listdir(out)) == sorted(["model_index.json", "unet", "scheduler", "condition_encoder",
                                              TRAINING_INFO])
    assert os.listdir(out / "condition_encoder") and "config.json" in os.listdir(out / "condition_encoder")
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "ConditionalDiffusionPipeline"
    rows = [{"label": 1, "center": "A", "modality": "us", "age": 50.0}, {"label": 0, "center": "B"}]
    original = ConditionalDiffusionPipeline(denoiser.unet, load_pipeline(out).scheduler, denoiser.condition_encoder)
    original.set_progress_bar_config(disable=True)
    a = original(rows, num_inference_steps=5, generator=torch.Generator().manual_seed(3)).images
    loaded = ConditionalDiffusionPipeline.from_pretrained(str(out), low_cpu_mem_usage=False)
    loaded.set_progress_bar_config(disable=True)
    b = loaded(rows, num_inference_steps=5, generator=torch.Generator().manual_seed(3)).images
    c = loaded(rows, num_inference_steps=5, generator=torch.Generator().manual_seed(4)).images
    assert a.shape == (2, 16, 16, 1) and 0 <= a.min() and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(b, c)
    assert loaded.condition_encoder.centers == ["A", "B"]
    # Saving again replaces the folder atomically, leaving no staging directories behind.
    save_pipeline(denoiser, training_scheduler(TINY).config, out)
    assert [p for p in os.listdir(out.parent) if p.startswith(".")] == []


def test_per_row_generators_make_each_image_independent_of_its_batch(tmp_path):
    denoiser = build_denoiser(TINY, ["A", "B"])
    save_pipeline(denoiser, training_scheduler(TINY).config, tmp_path / "p")
    pipe = load_pipeline(tmp_path / "p", sampler="dpm")
    row = {"label": 1, "center": "A", "modality": "us"}
    alone = pipe([row], num_inference_steps=4, generator=[torch.Generator().manual_seed(9)]).images
    together = pipe([{"label": 0, "center": "B"}, row], num_inference_steps=4,
                    generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(9)]).images
    np.testing.assert_allclose(alone[0], together[1], atol=1e-5)


def test_ema_state_lives_in_the_model_state_dict():
    model = DenoiserWithEMA(build_denoiser(TINY, ["A", "B"]))
    keys = model.state_dict().keys()
    assert any(k.startswith("ema.") for k in keys) and "ema_steps" in keys
    assert all(not p.requires_grad for p in model.ema.parameters())


def test_the_paper_size_example_config_parses():
    from pathlib import Path

    from diffkd.experiments.experiment import load_section

    path = Path(__file__).resolve().parents[2] / "configs" / "diffusion_example.yaml"
    stage = load_section(path, "diffusion")
    assert stage.model.model.image_size == 256 and stage.model.model.block_out_channels[-1] == 512
    assert stage.loop.zero_stage == 2
    assert load_section(path, "synth").num_inference_steps == 50
    assert load_section(path, "audit").max_per_set == 2000
    with pytest.raises(ValueError, match="divisible"):
        DiffusionModelConfig(image_size=90, block_out_channels=(32, 64, 64))


def test_a_new_center_extends_the_vocabulary_and_only_its_row_trains(batch, tmp_path):
    from diffkd.models.diffusion import with_new_centers

    torch.manual_seed(0)
    base = build_denoiser(TINY, ["A", "B"])
    extended, rows = with_new_centers(base, ["A", "B", "C"])
    encoder = extended.condition_encoder
    assert encoder.centers == ["A", "B", "C"] and rows == [2]
    assert (encoder.center_index("A"), encoder.center_unknown, encoder.center_null) == (0, 3, 4)
    old, new = base.condition_encoder.center_embedding.weight, encoder.center_embedding.weight
    assert torch.equal(new[:2], old[:2]) and torch.equal(new[3:], old[2:])  # known, UNKNOWN, NULL kept
    assert torch.equal(new[2], old[2])  # C starts as UNKNOWN: what the model did for an unseen center

    save_pipeline(base, training_scheduler(TINY).config, tmp_path / "base")
    cfg = tiny_config(base_model=str(tmp_path / "base"))
    cfg.centers = ["A", "B", "C"]
    task = DiffusionTask(cfg)
    model = task.build_model()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["model.condition_encoder.center_embedding.weight"]
    table = model.model.condition_encoder.center_embedding.weight
    before = table.detach().clone()
    opt = torch.optim.AdamW([table], lr=1e-2, weight_decay=0.1)  # weight decay would shrink every row
    c_batch = {**batch, "center_idx": torch.full_like(batch["center_idx"], 2)}
    for _ in range(3):
        out = task.step(model, c_batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        task.after_optimizer_step(model)
    changed = (table.detach() != before).any(dim=1)
    assert changed.tolist() == [False, False, True, False, False]
