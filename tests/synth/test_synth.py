"""Synthesis on Ray Data actors into the synthetic partition, resume, the audit, and use by the teacher."""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from diffkd.data.schema import CLINICAL_COLUMNS, arrow_schema
from diffkd.data.splits import SplitConfig
from diffkd.models.diffusion import DiffusionModelConfig, load_pipeline
from diffkd.synth.audit import AuditConfig, audit, generate_label_pairs
from diffkd.synth.sampling import SynthConfig, cell_counts, condition_table, existing_case_ids, run_id_for, synthesize
from diffkd.train.diffusion_task import DiffusionConfig, DiffusionTrainConfig, train_diffusion
from diffkd.train.loop_config import LoopConfig

TINY = DiffusionModelConfig(image_size=16, block_out_channels=(16, 32), condition_dim=32)


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory, tiny_dataset):
    """A tiny generator trained through the shared loop (Ray Train + DeepSpeed) on a two-center dataset."""
    root = tmp_path_factory.mktemp("synth")
    ds = tiny_dataset(root / "ds", per_center=24, size=32)
    loop = LoopConfig(epochs=3, batch_size=8, lr=2e-3, weight_decay=0.0, progress=False,
                      storage_path=str(root / "runs"))
    result = train_diffusion(ds, SplitConfig(val_fraction=0.25), DiffusionTrainConfig(DiffusionConfig(model=TINY), loop),
                             str(root / "models" / "diffusion"))
    return ds, result


def test_the_generator_trains_through_ray_train_and_deepspeed(trained):
    ds, result = trained
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert all(np.isfinite(h["val_loss"]) for h in result.history)
    info = json.loads(open(os.path.join(result.model_dir, "diffkd_training.json")).read())
    assert info["split"]["val_fraction"] == 0.25 and info["train_rows"] == result.train_rows == 36
    assert info["ema_steps"] > 0
    pipe = load_pipeline(result.model_dir)
    assert pipe.condition_encoder.centers == ["A", "B"] and pipe.unet.config.sample_size == 16


def test_condition_tables_are_balanced_or_follow_the_real_mix():
    import pandas as pd

    rows = pd.DataFrame({"center": ["A"] * 6 + ["B"] * 2, "label": [0, 0, 0, 0, 1, 1, 0, 1],
                         "modality": "us", "case_id": [f"c{i}" for i in range(8)],
                         **{c: None for c in CLINICAL_COLUMNS}})
    rows["age"] = [30.0 + i for i in range(8)]
    balanced = cell_counts(rows, SynthConfig(per_cell=5), ["A", "B"])
    assert balanced == {("A", 0): 5, ("A", 1): 5, ("B", 0): 5, ("B", 1): 5}
    real = cell_counts(rows, SynthConfig(mode="real", total=16), ["A", "B"])
    assert real == {("A", 0): 8, ("A", 1): 4, ("B", 0): 2, ("B", 1): 2} and sum(real.values()) == 16
    table = condition_table(rows, SynthConfig(per_cell=5), "run1")
    assert len(table) == 20 and table["case_id"].is_unique and table["patient_id"].is_unique
    # Conditions come from real rows of the same cell, and a rebuild is identical (what resume relies on).
    a0 = table[(table["center"] == "A") & (table["label"] == 0)]
    assert set(a0["age"]) <= {30.0, 31.0, 32.0, 33.0}
    assert table.equals(condition_table(rows.sample(frac=1, random_state=1), SynthConfig(per_cell=5), "run1"))
    with pytest.raises(ValueError, match="have no rows the generator was trained on"):
        condition_table(rows, SynthConfig(centers=["Z"]), "run1")


def test_synthesis_resumes_after_an_interruption_without_duplicates(trained):
    ds, result = trained
    cfg = SynthConfig(per_cell=3, num_inference_steps=3, batch_size=2, num_actors=2, chunk_rows=2)

    class Interrupted(Exception):
        pass

    def stop_after_first_chunk(done: int, total: int) -> None:
        raise Interrupted(f"{done}/{total}")

    with pytest.raises(Interrupted):
        synthesize(ds, result.model_dir, cfg, progress=stop_after_first_chunk)
    run_id = run_id_for(result.model_dir, cfg)
    partial = existing_case_ids(ds, run_id)
    assert 0 < len(partial) < 12

    second = synthesize(ds, result.model_dir, cfg)
    assert second.requested == 12 and second.existing == len(partial) and second.written == 12 - len(partial)
    again = synthesize(ds, result.model_dir, cfg)
    assert again.written == 0 and again.existing == 12

    table = ds.read_table(synthetic=True)
    assert table.num_rows == 12 and len(set(table.column("case_id").to_pylist())) == 12
    assert table.schema.equals(arrow_schema())
    rows = table.to_pylist()
    for row in rows:
        assert row["synthetic"] is True and row["source"] == run_id
        assert row["patient_id"].startswith("synthetic-") and row["case_id"].startswith(f"synthetic-{run_id}-")
        assert hashlib.sha256(row["image"]).hexdigest() == row["sha256"]
        image = Image.open(io.BytesIO(row["image"]))
        assert image.format == "PNG" and image.mode == "L" and image.size == (row["width"], row["height"]) == (16, 16)
        assert row["age"] is not None and row["birads"] in ("4a", "4c")  # clinical values from the condition table
    counts = {(r["center"], r["label"]) for r in rows}
    assert counts == {("A", 0), ("A", 1), ("B", 0), ("B", 1)}
    assert ds.manifest["synthetic"]["A"]["rows"] + ds.manifest["synthetic"]["B"]["rows"] == 12


def test_the_teacher_pipeline_mixes_synthetic_rows(trained, ray_local):
    from diffkd.data.pipeline import PipelineConfig, iter_shard_batches, make_dataset

    ds, _ = trained
    if not ds.centers(synthetic=True):
        pytest.skip("needs the rows written by the resume test")
    real_ids = ds.metadata().column("case_id").to_pylist()
    stream = make_dataset(ds, real_ids, PipelineConfig(image_size=32, batch_size=8), train=True, synthetic_ratio=0.5)
    batches = list(iter_shard_batches(stream, 8))
    flags = np.concatenate([b["synthetic"].numpy() for b in batches])
    assert flags.any() and (~flags).sum() == len(real_ids)
    assert all(b["image"].shape[1:] == (1, 32, 32) for b in batches)


def test_label_pairs_differ_only_by_the_label(trained, tmp_path):
    import shutil

    import torch

    ds, result = trained
    cfg = AuditConfig(label_pairs=4, pair_steps=2, pair_guidance=2.0)
    pairs = generate_label_pairs(ds, result.model_dir, cfg)
    cells = set(zip(pairs.rows["center"], pairs.rows["label"]))
    assert len(pairs.rows) == 4 and len(cells) == 4  # 2 centers x 2 labels: every cell once
    assert pairs.dcis.shape == pairs.upgrade.shape == (4, 1, 16, 16)
    assert not np.allclose(pairs.dcis, pairs.upgrade)
    # Give both labels the same embedding: then nothing else differs, so the images are identical.
    same = tmp_path / "same_label"
    shutil.copytree(result.model_dir, same)
    pipe = load_pipeline(same)
    with torch.no_grad():
        table = pipe.condition_encoder.label_embedding.weight
        table[1] = table[0]
    pipe.save_pretrained(same, safe_serialization=True)
    tied = generate_label_pairs(ds, str(same), cfg)
    np.testing.assert_array_equal(tied.dcis, tied.upgrade)


@pytest.mark.slow
def test_the_audit_flags_a_planted_copy(trained, tmp_path):
    ds, result = trained
    if not ds.centers(synthetic=True):
        synthesize(ds, result.model_dir, SynthConfig(per_cell=3, num_inference_steps=3, num_actors=1))
    # Plant an exact copy of a training image (center A) as if the generator had memorised it.
    info = json.loads(open(os.path.join(result.model_dir, "diffkd_training.json")).read())
    from diffkd.synth.sampling import generator_training_rows

    victim_id = generator_training_rows(ds, result.model_dir)["case_id"].iloc[0]
    victim = next(r for r in ds.read_table(["A", "B"]).to_pylist() if r["case_id"] == victim_id)
    image = np.asarray(Image.open(io.BytesIO(victim["image"])).resize((16, 16), Image.Resampling.BILINEAR))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    planted = {**victim, "case_id": "synthetic-planted-0", "patient_id": "synthetic-planted", "image": buf.getvalue(),
               "height": 16, "width": 16, "synthetic": True, "source": "planted",
               "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}
    ds.write_synthetic(victim["center"], pa.Table.from_pylist([planted], schema=arrow_schema()), run_id="planted")
    assert info["train_rows"] > 0

    summary = audit(ds, str(tmp_path / "audit"), model_dir=result.model_dir,
                    cfg=AuditConfig(epochs=2, batch_size=8, kid_subsets=5))
    details = json.loads((tmp_path / "audit" / "synthetic_audit.json").read_text())
    assert "synthetic-planted-0" in details["near_copies"]["flagged_case_ids"]
    assert summary["near_copies"] >= 1 and summary["n_synthetic"] == 13
    for key in ("fid", "fid_real_reference", "kid", "kid_real_reference", "conditional_accuracy",
                "conditional_accuracy_real", "conditional_auc", "tstr_auc", "trtr_auc"):
        assert isinstance(summary[key], float), key
    assert summary["fid"] >= 0 and 0 <= summary["conditional_accuracy"] <= 1
    assert summary["label_pairs"] == AuditConfig().label_pairs and -1 <= summary["label_effect"] <= 1
    for name in ("synthetic_grid.png", "synthetic_near_copies.png", "synthetic_label_pairs.png"):
        assert Image.open(tmp_path / "audit" / name).format == "PNG"


def test_a_mask_conditioned_model_samples_from_the_drawn_rows_masks(tmp_path):
    import pandas as pd
    import torch

    from diffkd.models.diffusion import build_denoiser, save_pipeline, training_scheduler
    from diffkd.synth.sampling import ImageSampler

    model_cfg = DiffusionModelConfig(image_size=16, block_out_channels=(16, 32), condition_dim=32, mask_channel=True)
    torch.manual_seed(0)
    save_pipeline(build_denoiser(model_cfg, ["A"]), training_scheduler(model_cfg).config, tmp_path / "m")
    lesion = np.zeros((16, 16), np.uint8)
    lesion[4:10, 5:12] = 1
    sampler = ImageSampler(str(tmp_path / "m"), None, 3, 2.0, masks={"real-1": lesion})
    batch = pd.DataFrame({"center": ["A", "A"], "label": [1, 0], "modality": "us", "age": [50.0, None],
                          "condition_case_id": ["real-1", "real-2"], "row_seed": [1, 2], "row": [0, 1]})
    out = sampler(batch)
    assert out["mask"].iloc[1] is None  # no known mask: none is invented
    mask = np.asarray(Image.open(io.BytesIO(out["mask"].iloc[0])))
    assert mask.shape == (16, 16) and set(np.unique(mask)) == {0, 255} and (mask > 0).sum() == lesion.sum()
    # The mask channel reaches the UNet: another mask gives another image from the same noise.
    other = ImageSampler(str(tmp_path / "m"), None, 3, 2.0, masks={"real-1": 1 - lesion})(batch)
    assert out["image"].iloc[0] != other["image"].iloc[0] and out["image"].iloc[1] == other["image"].iloc[1]


def test_a_new_center_gets_its_own_embedding_and_synthetic_rows(trained, tmp_path, tiny_rows):
    import shutil

    from diffkd.data.dataset import ImageDataset

    ds, base = trained
    shutil.copytree(ds.root, tmp_path / "ds")
    grown = ImageDataset(tmp_path / "ds")
    grown.write_center("C", tiny_rows("C", 16, size=32))
    out = str(tmp_path / "diffusion_c")
    # 3 steps per epoch: the first (warm-up) step has lr 0, and the best epoch is exported
    loop = LoopConfig(epochs=2, batch_size=4, lr=5e-3, weight_decay=0.0, progress=False,
                      storage_path=str(tmp_path / "runs"))
    result = train_diffusion(grown, SplitConfig(val_fraction=0.25),
                             DiffusionTrainConfig(DiffusionConfig(base_model=base.model_dir), loop), out)
    info = json.loads(open(os.path.join(out, "diffkd_training.json")).read())
    assert info["learnt_centers"] == ["C"] and len(result.history) == 2
    before, after = load_pipeline(base.model_dir), load_pipeline(out)
    assert after.condition_encoder.centers == ["A", "B", "C"]
    for name, weight in before.unet.state_dict().items():  # the UNet is shared, untouched
        assert np.array_equal(weight.numpy(), after.unet.state_dict()[name].numpy()), name
    old, new = before.condition_encoder.center_embedding.weight, after.condition_encoder.center_embedding.weight
    assert np.array_equal(new[:2].detach().numpy(), old[:2].detach().numpy())
    assert not np.array_equal(new[2].detach().numpy(), old[2].detach().numpy())  # C moved off UNKNOWN
    made = synthesize(grown, out, SynthConfig(per_cell=2, centers=["C"], num_inference_steps=4, num_actors=1))
    assert made.per_center == {"C": 4}
