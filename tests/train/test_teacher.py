"""The teacher stage: its step without Ray, clinical fusion with missing values, class weights, the timm
save layout, and (slow) the whole stage through Ray Train on a small learnable dataset."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from diffkd.data.pipeline import PipelineConfig
from diffkd.data.schema import ClinicalEncoding
from diffkd.models.classifiers import (classify, create_classifier, data_config, features, load_classifier,
                                       save_classifier)
from diffkd.train.loop_config import LoopConfig
from diffkd.train.teacher import TeacherConfig, TeacherTask, balanced_class_weights, teacher_loss

WIDTH = ClinicalEncoding().width


def config(**overrides) -> TeacherConfig:
    base = dict(arch="resnet18", drop_rate=0.0, pipeline=PipelineConfig(image_size=32, augment=False))
    base.update(overrides)
    return TeacherConfig(**base)


def image_batch(n: int = 32, seed: int = 0) -> dict:
    """Label 1 images carry a bright square; clinical vectors are all missing."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randn(n, 1, 32, 32, generator=g) * 0.3
    images[labels == 1, :, 10:20, 10:20] += 1.5
    clinical = torch.tensor([ClinicalEncoding().encode_row({})] * n, dtype=torch.float32)
    return {"image": images, "label": labels, "clinical": clinical, "case_id": [f"c{seed}-{i}" for i in range(n)]}


def fit_steps(model, batch, cfg, steps: int, weights=None) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        out = teacher_loss(model, batch, cfg, weights)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(float(out.loss.detach()))
    return losses


def test_the_step_is_a_plain_function_and_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    cfg = config()
    model = TeacherTask(cfg).build_model()
    out = teacher_loss(model, image_batch(), cfg)
    assert out.num_samples == 32 and out.loss.ndim == 0 and 0.0 <= out.metrics["accuracy"] <= 1.0
    assert out.metrics["ce"] == pytest.approx(float(out.loss))  # no smoothing, no fusion: the loss is the CE
    losses = fit_steps(model, image_batch(), cfg, 15)
    assert losses[-1] < 0.5 * losses[0]


def test_class_weights_balance_the_classes_and_need_both():
    assert balanced_class_weights([0, 0, 0, 1]) == pytest.approx((4 / 6, 4 / 2))
    with pytest.raises(ValueError, match="3 rows of label 0 and 0 of label 1"):
        balanced_class_weights([0, 0, 0])
    # the weights enter the loss: a weighted mean of the per-case losses
    torch.manual_seed(0)
    cfg = config()
    model = TeacherTask(cfg).build_model().eval()
    batch = image_batch()
    weights = torch.tensor([0.5, 2.0])
    with torch.no_grad():
        per_case = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"], reduction="none")
        weighted = float(teacher_loss(model, batch, cfg, weights).loss)
        plain = float(teacher_loss(model, batch, cfg).loss)
    case_weights = weights[batch["label"]]
    assert weighted == pytest.approx(float((case_weights * per_case).sum() / case_weights.sum()), rel=1e-5)
    assert plain == pytest.approx(float(per_case.mean()), rel=1e-5) and weighted != pytest.approx(plain)


def test_clinical_fusion_learns_from_clinical_values_and_copes_with_missing_ones():
    torch.manual_seed(0)
    cfg = config(clinical=True, column_dropout=0.3, image_loss_weight=0.0)
    model = TeacherTask(cfg).build_model()
    n = 32
    batch = {"image": torch.zeros(n, 1, 32, 32), "label": torch.arange(n) % 2}
    # identical images: the label is readable only from the clinical values (a suspicious axillary node)
    batch["clinical"] = torch.tensor([ClinicalEncoding().encode_row({"axillary_node_suspicious": bool(i % 2)})
                                      for i in range(n)], dtype=torch.float32)
    model.eval()
    fused, image_logits = model(batch["image"], batch["clinical"], return_image_logits=True)
    assert torch.allclose(fused, image_logits)  # the head starts at zero: training begins image-only
    model.train()
    fit_steps(model, batch, cfg, 40)
    model.eval()
    with torch.no_grad():
        fused, image_logits = model(batch["image"], batch["clinical"], return_image_logits=True)
        accuracy = float((fused.argmax(1) == batch["label"]).float().mean())
        missing = torch.tensor([ClinicalEncoding().encode_row({})] * n, dtype=torch.float32)
        unsure = torch.softmax(model(batch["image"], missing), 1)[:, 1]
    assert accuracy == 1.0
    assert torch.all((unsure > 0.2) & (unsure < 0.8))  # with the column missing, no confident guess


def test_hidden_columns_are_encoded_exactly_as_missing_values():
    head = create_classifier("resnet18", clinical_dim=WIDTH).head
    row = {"age": 61.0, "birads": "4c", "palpable": True, "nuclear_grade": 3}
    full = torch.tensor([ClinicalEncoding().encode_row(row)])
    columns = list(ClinicalEncoding().columns)
    hidden = torch.tensor([[name in ("birads", "age") for name in columns]])
    expected = dict(row, age=None, birads=None)
    assert torch.equal(head.hide_columns(full, hidden), torch.tensor([ClinicalEncoding().encode_row(expected)]))


def test_evaluate_reports_auc_and_loss_and_nan_for_one_class():
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(0)
    task = TeacherTask(config())
    model = task.build_model().eval()
    batches = [image_batch(16, seed=s) for s in range(3)]
    with torch.no_grad():
        metrics = task.evaluate(model, batches)
        probs = torch.cat([torch.softmax(classify(model, b), 1)[:, 1] for b in batches])
    labels = torch.cat([b["label"] for b in batches])
    assert metrics["val_auc"] == pytest.approx(roc_auc_score(labels.numpy(), probs.numpy()))
    assert metrics["val_loss"] > 0
    one_class = [dict(b, label=torch.zeros_like(b["label"])) for b in batches]
    with torch.no_grad():
        assert np.isnan(task.evaluate(model, one_class)["val_auc"])


def test_validation_scores_cases_as_the_report_does_not_images():
    """A case's images are averaged before the AUC: the unit early stopping and the search select on is the
    report's unit (`predict_splits`)."""
    from sklearn.metrics import roc_auc_score

    from diffkd.train.teacher import validation_metrics

    # case a (upgrade): images 0.9 and 0.1 -> 0.5; case b (DCIS): 0.6 and 0.6 -> 0.6; case c (upgrade): 0.7
    probs = torch.tensor([0.9, 0.1, 0.6, 0.6, 0.7])
    logits = torch.stack([torch.zeros(5), torch.log(probs / (1 - probs))], dim=1)
    labels = torch.tensor([1, 1, 0, 0, 1])
    metrics = validation_metrics([logits[:3], logits[3:]], [labels[:3], labels[3:]], ["a", "a", "b", "b", "c"])
    assert metrics["val_auc"] == pytest.approx(roc_auc_score([1, 0, 1], [0.5, 0.6, 0.7]))  # 0.5 per case
    assert roc_auc_score(labels, probs) == pytest.approx(2 / 3)  # what a per-image AUC would have said
    assert metrics["val_loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)))
    assert np.isnan(metrics["val_auc_se"])  # one case of DCIS: no DeLong variance


def test_validation_carries_the_delong_se_of_its_auc():
    from diffkd.evaluate.metrics import auc_delong_ci
    from diffkd.train.teacher import validation_metrics

    probs = torch.tensor([0.9, 0.2, 0.6, 0.4, 0.7, 0.3, 0.5, 0.55])
    labels = torch.tensor([1, 0, 1, 0, 1, 1, 0, 0])
    logits = torch.stack([torch.zeros(8), torch.log(probs / (1 - probs))], dim=1)
    metrics = validation_metrics([logits], [labels], [f"c{i}" for i in range(8)])
    expected = auc_delong_ci(labels.tolist(), probs.tolist())
    assert metrics["val_auc"] == pytest.approx(expected.auc) and metrics["val_auc_se"] == pytest.approx(expected.se)
    assert 0 < metrics["val_auc_se"] < 0.5


@pytest.mark.parametrize("arch", ["resnet18", "test_convnext"])
def test_a_saved_classifier_restores_with_plain_timm(tmp_path, arch):
    import timm
    from safetensors.torch import load_file

    torch.manual_seed(0)
    model = create_classifier(arch, in_chans=1).eval()
    (tmp_path / "predictions.parquet").write_text("kept")
    save_classifier(model, str(tmp_path), data_config(32, 1, 0.449, 0.226))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architecture"] == arch and cfg["num_classes"] == 2 and cfg["model_args"]["in_chans"] == 1
    assert cfg["label_names"] == ["DCIS", "upgrade"] and cfg["pretrained_cfg"]["mean"] == [0.449]
    save_classifier(model, str(tmp_path / "named"), label_names=("benign", "malignant"))  # the dataset's names
    assert json.loads((tmp_path / "named" / "config.json").read_text())["label_names"] == ["benign", "malignant"]
    assert "origin_url" not in cfg["pretrained_cfg"]  # no ImageNet provenance claimed for scratch weights
    plain = timm.create_model(cfg["architecture"], num_classes=cfg["num_classes"],
                              in_chans=cfg["model_args"]["in_chans"])
    plain.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(plain.eval()(x), model(x))
        assert torch.allclose(timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()(x), model(x))
    assert (tmp_path / "predictions.parquet").read_text() == "kept"
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".saving")]


def test_a_fusion_classifier_saves_its_head_beside_the_timm_model(tmp_path):
    torch.manual_seed(0)
    fusion = create_classifier("resnet18", clinical_dim=WIDTH).eval()
    with torch.no_grad():
        fusion.head.out[-1].weight.normal_()  # a trained head is not zero
    save_classifier(fusion, str(tmp_path))
    assert {"model.safetensors", "config.json", "fusion_head.safetensors", "fusion_head.json"} <= \
        set(os.listdir(tmp_path))
    loaded = load_classifier(str(tmp_path))
    batch = image_batch(4)
    with torch.no_grad():
        assert torch.allclose(classify(loaded, batch), classify(fusion, batch), atol=1e-6)
        assert features(loaded, batch["image"]).shape == (4, 512)
        assert features(loaded, batch["image"], pooled=False).shape[:2] == (4, 512)
    save_classifier(create_classifier("resnet18"), str(tmp_path))  # an image-only model replaces it
    assert "fusion_head.json" not in os.listdir(tmp_path)
    assert not hasattr(load_classifier(str(tmp_path)), "head")


def test_bad_teacher_settings_are_clear():
    with pytest.raises(ValueError, match="unknown timm architecture 'resnet5O'"):
        create_classifier("resnet5O")
    with pytest.raises(ValueError, match="class_weighting"):
        TeacherConfig(class_weighting="oversample")
    with pytest.raises(ValueError, match="clinical_dim=3"):
        create_classifier("resnet18", clinical_dim=3)


# ---- the stage through Ray Train -------------------------------------------------------------------

@pytest.mark.slow
def test_diffkd_train_teacher_trains_selects_exports_and_predicts_every_case(ray_local, tmp_path, two_modality_dataset,
                                                                             two_modality_splits):
    import pandas as pd
    import yaml

    from diffkd.cli import main

    ds = two_modality_dataset(tmp_path / "data", size=32)
    assignments = two_modality_splits(ds)
    config = {"pipeline": {"image_size": 32},  # the shared section; the teacher's own block overrides it
              "teacher": {"arch": "resnet18", "clinical": True, "pipeline": {"augment": False},
                          "loop": {"epochs": 4, "batch_size": 8, "lr": 2e-3, "patience": 3,
                                   "progress_interval_s": 1e9}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "teacher"
    args = ["train", "teacher", "--config", str(tmp_path / "config.yaml"), "--dataset", str(tmp_path / "data"),
            "--external", "C", "--val-fraction", "0.3", "--out", str(out), "--storage", str(tmp_path / "runs"),
            "--run-name", "t1"]
    assert main(args) == 0

    assert {"model.safetensors", "config.json", "fusion_head.safetensors", "predictions.parquet",
            "training.json"} <= set(os.listdir(out))
    assert json.loads((out / "config.json").read_text())["pretrained_cfg"]["input_size"] == [1, 32, 32]
    preds = pd.read_parquet(out / "predictions.parquet")
    assert sorted(preds["case_id"]) == sorted(assignments["case_id"])
    assert set(preds["split"]) == {"train", "val", "test"} and (preds["model"] == "teacher").all()
    assert preds["prob"].between(0, 1).all()
    assert (preds.merge(assignments, on="case_id")["split_x"] == preds.merge(assignments, on="case_id")["split_y"]).all()
    info = json.loads((out / "training.json").read_text())
    best = next(h for h in info["history"] if h["epoch"] == info["metrics"]["best_epoch"])
    assert info["metrics"]["internal"]["auc"] == pytest.approx(best["val_auc"], abs=1e-6)  # the exported epoch
    assert info["metrics"]["internal"]["n"] == int((assignments["split"] == "val").sum())
    assert info["metrics"]["external"]["auc"] > 0.6  # lesions are visible: the teacher must beat chance

    # the same name again without --resume is refused; with it, the finished run is picked up as it is
    assert main(args) == 2
    assert main([*args, "--resume"]) == 0
    again = json.loads((out / "training.json").read_text())
    assert again["history"] == info["history"] and again["metrics"]["best_epoch"] == info["metrics"]["best_epoch"]


def test_the_schedule_and_class_weights_come_from_the_modality_the_teacher_trains_on(tmp_path, two_modality_dataset,
                                                                                     two_modality_splits):
    """A B-mode teacher on a B-mode + Doppler dataset: one epoch is its B-mode rows, not every modality's
    (sized from all rows, the cosine schedule of the demo's teacher ended at ~0.35 of its peak LR)."""

    from diffkd.train.teacher import plan_training

    ds = two_modality_dataset(tmp_path / "data", n_us=24, n_doppler=16, size=16)
    assignments = two_modality_splits(ds)
    train = assignments[assignments["split"] == "train"]
    for modality in ("us", "us_doppler"):
        cfg = config(pipeline=PipelineConfig(image_size=16, modalities=(modality,)))
        plan = plan_training(ds, assignments, cfg)
        own = train[train["modality"] == modality]
        assert plan.train_samples == len(own) < len(train)
        assert set(plan.train_rows["modality"]) == {modality}
        assert plan.class_weights == pytest.approx(balanced_class_weights(own["label"]))
    every = plan_training(ds, assignments, config(pipeline=PipelineConfig(image_size=16)))
    assert every.train_samples == len(train)  # no modality set: the teacher reads them all
    explicit = config(pipeline=PipelineConfig(image_size=16, modalities=("us",)), loop=LoopConfig(train_samples=7))
    assert plan_training(ds, assignments, explicit).train_samples == 7


def test_the_synthetic_share_of_the_schedule_is_what_the_pipeline_streams(tmp_path, two_modality_dataset,
                                                                          two_modality_rows, two_modality_splits):
    """Counted in rows of the modalities read, real and synthetic alike, as `make_dataset` mixes them: cases
    with several views, and synthetic rows of the other modality, do not stretch the schedule."""
    import pyarrow as pa

    from diffkd.data.pipeline import count_real_rows, count_synthetic_rows
    from diffkd.train.teacher import plan_training

    ds = two_modality_dataset(tmp_path / "data", n_us=12, n_doppler=8, size=16)
    generated = two_modality_rows("A", 6, 10, 16, seed=5)  # 6 B-mode and 10 Doppler synthetic rows
    generated = generated.set_column(generated.column_names.index("synthetic"), "synthetic", pa.array([True] * 16))
    ds.write_synthetic("A", generated, run_id="gen")
    assignments = two_modality_splits(ds)
    train = assignments[(assignments["split"] == "train") & (assignments["modality"] == "us")]
    in_a = int((train["center"] == "A").sum())
    assert count_real_rows(ds, ["A"], train["case_id"], ("us",)) == in_a
    assert count_synthetic_rows(ds, ["A"], (), ("us",)) == 6 and count_synthetic_rows(ds, ["A"]) == 16

    cfg = config(pipeline=PipelineConfig(image_size=16, modalities=("us",), synthetic_ratio=5.0))
    plan = plan_training(ds, assignments, cfg)
    assert plan.train_samples == len(train) + 6  # every B-mode synthetic row; the 10 Doppler ones are never read

    # two views of one case are two rows of the epoch
    two_views = pa.concat_tables([ds.read_table(["B"]), ds.read_table(["B"]).slice(0, 1)])
    ds.write_center("B", two_views.set_column(two_views.column_names.index("sha256"), "sha256",
                                              pa.array([f"{i:064x}" for i in range(two_views.num_rows)])))
    repeated = two_views.slice(0, 1).column("case_id")[0].as_py()
    assert count_real_rows(ds, ["B"], [repeated]) == 2
