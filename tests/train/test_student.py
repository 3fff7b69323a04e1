"""The student stage: the plain step (no Ray), pairing-free views, and training through Ray Train."""
import dataclasses
import json
import math
import os

import pytest
import torch

from diffkd.data.pipeline import PipelineConfig, collate, load_arrays
from diffkd.data.schema import MODALITIES, ClinicalEncoding
from diffkd.models.classifiers import create_classifier, save_classifier
from diffkd.train.loop_config import LoopConfig
from diffkd.distill.objective import DistillationModel, DistillConfig, combine, same_class_pairs
from diffkd.models.classifiers import run_classifier
from diffkd.train.student import (StudentConfig, StudentTask, distill_step, feature_channels, plain_variant,
                                  split_views, student_datasets)

ALL_LOSSES = DistillConfig({"logit": {"weight": 0.7}, "feature": {"weight": 1.0},
                            "gkd_pro": {"weight": 1.0, "num_queries": 4, "num_heads": 2},
                            "gkd_den": {"weight": 1.0, "warmup_epochs": 1}})


@pytest.fixture(scope="module")
def data(tmp_path_factory, two_modality_dataset, two_modality_splits):
    ds = two_modality_dataset(tmp_path_factory.mktemp("student") / "ds")
    return ds, two_modality_splits(ds)


@pytest.fixture(scope="module")
def batch(data):
    ds, table = data
    train = table[table["split"] == "train"]
    return collate(load_arrays(ds, list(train["case_id"][:32]), PipelineConfig(image_size=64)))


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher"
    save_classifier(create_classifier("resnet18", in_chans=1, num_classes=2), str(path))
    return str(path)


def _model(cfg: StudentConfig, teacher_channels: int = 512):
    student = create_classifier(cfg.arch, in_chans=1, num_classes=2)
    return DistillationModel(student, cfg.distill if cfg.distills else None, feature_channels(student, 1),
                             teacher_channels)


@pytest.mark.parametrize("mode", ["paired", "pairing_free"])
def test_step_runs_every_loss_without_ray_and_den_waits_for_its_warmup(batch, teacher_dir, mode):
    from diffkd.models.classifiers import load_classifier

    cfg = StudentConfig(arch="mobilenetv3_small_050", teacher_dir=teacher_dir, mode=mode, distill=ALL_LOSSES)
    model = _model(cfg)
    teacher = load_classifier(teacher_dir).eval()
    during_warmup = distill_step(model, teacher, batch, cfg, epoch=1)
    assert {"ce", "kd_logit", "kd_feature", "kd_gkd_pro"} <= set(during_warmup.metrics)
    assert "kd_gkd_den" not in during_warmup.metrics
    out = distill_step(model, teacher, batch, cfg, epoch=2)
    assert "kd_gkd_den" in out.metrics and torch.isfinite(out.loss)
    expected_rows = len(batch["label"]) if mode == "paired" else \
        int((batch["modality_idx"] == MODALITIES.index("us")).sum())
    assert out.num_samples == expected_rows
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in teacher.parameters())  # the teacher stays frozen


def test_a_few_steps_lower_the_loss_on_a_fixed_batch(batch, teacher_dir):
    from diffkd.models.classifiers import load_classifier

    torch.manual_seed(0)
    cfg = StudentConfig(arch="mobilenetv3_small_050", teacher_dir=teacher_dir, mode="pairing_free", distill=ALL_LOSSES)
    model, teacher = _model(cfg), load_classifier(teacher_dir).eval()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.eval()  # fixed BN statistics: the comparison is about the weights, not the running stats
    losses = []
    for _ in range(8):
        torch.manual_seed(1)  # the same random same-class pairs every step
        out = distill_step(model, teacher, batch, cfg, epoch=2)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(float(out.loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_pairing_free_views_split_by_modality_and_pairs_stay_in_class(batch):
    cfg = StudentConfig(teacher_dir="t", mode="pairing_free")
    student_view, teacher_view = split_views(batch, cfg)
    assert (student_view["modality_idx"] == MODALITIES.index("us")).all()
    assert (teacher_view["modality_idx"] == MODALITIES.index("us_doppler")).all()
    assert len(student_view["label"]) + len(teacher_view["label"]) == len(batch["label"])
    assert not set(student_view["case_id"]) & set(teacher_view["case_id"])
    s, t = same_class_pairs(student_view["label"], teacher_view["label"], torch.Generator().manual_seed(0))
    assert torch.equal(student_view["label"][s], teacher_view["label"][t])
    s, t = same_class_pairs(torch.tensor([0, 1, 1]), torch.tensor([1, 1]))
    assert s.tolist() == [1, 2] and set(t.tolist()) <= {0, 1}


def test_a_batch_without_student_rows_is_a_zero_step_that_still_touches_every_parameter(batch):
    from diffkd.train.student import take_rows

    cfg = StudentConfig(arch="mobilenetv3_small_050", teacher_dir="t", mode="pairing_free", distill=ALL_LOSSES)
    model = _model(cfg)
    doppler_only = take_rows(batch, batch["modality_idx"] == MODALITIES.index("us_doppler"))
    out = distill_step(model, None, doppler_only, cfg, epoch=2)
    assert out.num_samples == 0 and float(out.loss) == 0.0
    out.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_combine_weights_and_the_plain_variant():
    cfg = DistillConfig({"logit": {"weight": 0.25}, "feature": {"weight": 2.0}, "gkd_pro": {"weight": 0.5},
                         "gkd_den": {"weight": 0.0}})
    terms = {"ce": torch.tensor(1.0), "kd_logit": torch.tensor(2.0), "kd_feature": torch.tensor(3.0),
             "kd_gkd_pro": torch.tensor(4.0), "kd_gkd_den": torch.tensor(100.0)}
    assert cfg.active_terms() == ["logit", "feature", "gkd_pro"]  # weight 0 = off
    assert math.isclose(float(combine(terms, cfg)), 0.75 * 1 + 0.25 * 2 + 2 * 3 + 0.5 * 4)
    assert math.isclose(float(combine({"ce": torch.tensor(1.5)}, cfg)), 1.5)  # no teacher rows: CE alone
    no_pairs = {"ce": torch.tensor(1.0), "kd_gkd_pro": torch.tensor(4.0)}  # logit absent: CE takes its share back
    assert math.isclose(float(combine(no_pairs, cfg)), 1.0 + 0.5 * 4)
    student = plain_variant(StudentConfig(teacher_dir="t", mode="pairing_free", arch="resnet18",
                                          pipeline=PipelineConfig(synthetic_ratio=1.0)))
    assert not student.distills and student.mode == "paired" and student.pipeline.synthetic_ratio == 0.0
    assert student.arch == "resnet18"
    assert student.agreement_teacher_dir == "t"  # measured against the teacher it is the control for
    assert student.compared_teacher_dir == "t"
    assert StudentConfig(teacher_dir="t", mode="pairing_free").compared_teacher_dir == ""  # other images


def test_synthetic_rows_labelled_by_the_teacher_leave_cross_entropy_to_the_real_rows(batch, teacher_dir):
    import torch.nn.functional as F

    from diffkd.models.classifiers import load_classifier

    cfg = StudentConfig(arch="mobilenetv3_small_050", teacher_dir=teacher_dir, distill=DistillConfig(
        {"logit_standardized": {"weight": 0.5}, "gkd_pro": {"weight": 0.5, "num_queries": 4, "num_heads": 2}},
        synthetic_labels="teacher"))
    model = _model(cfg).eval()
    teacher = load_classifier(teacher_dir).eval()
    synthetic = torch.zeros(len(batch["label"]), dtype=torch.bool)
    synthetic[::3] = True
    view = {**batch, "synthetic": synthetic}
    with torch.no_grad():
        terms = model(view, view, teacher)
        logits = run_classifier(model.student, view).logits
    assert torch.allclose(terms["ce"], F.cross_entropy(logits[~synthetic], view["label"][~synthetic]), atol=1e-6)
    assert {"kd_logit_standardized", "kd_gkd_pro"} <= set(terms)
    with torch.no_grad():
        all_synthetic = model({**view, "synthetic": torch.ones_like(synthetic)}, view, teacher)
    assert float(all_synthetic["ce"]) == 0.0 and "kd_logit_standardized" in all_synthetic
    # the generator's condition is used as before unless asked otherwise
    conditioned = _model(dataclasses.replace(cfg, distill=DistillConfig({"logit": {"weight": 0.5}}))).eval()
    with torch.no_grad():
        assert torch.allclose(conditioned(view, view, teacher)["ce"],
                              F.cross_entropy(run_classifier(conditioned.student, view).logits, view["label"]))
    with pytest.raises(ValueError, match="synthetic_labels"):
        DistillConfig(synthetic_labels="generator")


def test_validation_records_agreement_with_the_teacher(data, teacher_dir):
    from diffkd.models.classifiers import load_classifier

    ds, table = data
    val = table[(table["split"] == "val") & (table["modality"] == "us")]
    batches = [collate(load_arrays(ds, list(val["case_id"]), PipelineConfig(image_size=64)))]
    task = StudentTask(StudentConfig(arch="resnet18", teacher_dir=teacher_dir, distill=DistillConfig()))
    task.setup(torch.device("cpu"))
    model = task.build_model()
    model.student.load_state_dict(load_classifier(teacher_dir).state_dict())  # a student that is its teacher
    same = task.evaluate(model.eval(), batches)
    assert same["agree_corr"] == pytest.approx(1.0) and same["agree_top1"] == 1.0
    assert same["agree_kl"] == pytest.approx(0.0, abs=1e-6) and 0.0 <= same["val_auc"] <= 1.0
    plain = StudentTask(plain_variant(task.config))
    plain.setup(torch.device("cpu"))
    other = plain.evaluate(plain.build_model().eval(), batches)  # no distillation, still compared
    assert set(other) >= {"agree_corr", "agree_kl", "agree_top1"} and other["agree_kl"] > same["agree_kl"]
    with pytest.raises(FileNotFoundError, match="agreement_teacher_dir"):
        StudentTask(StudentConfig(agreement_teacher_dir="/nonexistent/teacher"))


def test_one_pass_gives_the_same_logits_as_classify(batch):
    from diffkd.models.classifiers import classify

    for arch, clinical_dim in (("mobilenetv3_small_050", 0), ("regnetx_002", ClinicalEncoding().width)):
        model = create_classifier(arch, in_chans=1, clinical_dim=clinical_dim).eval()
        with torch.no_grad():
            out = run_classifier(model, batch)
            assert torch.allclose(out.logits, classify(model, batch), atol=1e-5)
        assert out.features.dim() == 4 and out.features.shape[1] == feature_channels(model, 1)


def test_bad_configs_are_clear():
    with pytest.raises(ValueError, match="pairing_free distils from a teacher"):
        StudentConfig(mode="pairing_free")
    with pytest.raises(ValueError, match="sum to 1.5 > 1"):
        DistillConfig({"logit": {"weight": 1.5}})
    with pytest.raises(ValueError, match="unknown distillation loss 'dkd'"):
        DistillConfig({"dkd": {"weight": 1.0}})
    with pytest.raises(ValueError, match=r"terms.gkd_pro: unknown option\(s\) queries"):
        DistillConfig({"gkd_pro": {"weight": 1.0, "queries": 4}})
    with pytest.raises(ValueError, match="must be a mapping with a `weight`"):
        DistillConfig({"feature": {"kind": "mse"}})
    with pytest.raises(ValueError, match="student.mode"):
        StudentConfig(mode="unpaired")
    with pytest.raises(FileNotFoundError, match="train the teacher first"):
        StudentTask(StudentConfig(teacher_dir="/nonexistent/teacher"))


def test_the_stage_reads_train_and_val_rows_only(data, ray_local):
    ds, table = data
    cfg = StudentConfig(teacher_dir="t", mode="pairing_free")
    cfg.pipeline = PipelineConfig(image_size=32)
    out = student_datasets(ds, table, cfg)
    assert set(out) == {"train", "val"}
    seen = {split: set(d.select_columns(["case_id"]).to_pandas()["case_id"]) for split, d in out.items()}
    by_split = {s: set(table.loc[table["split"] == s, "case_id"]) for s in ("train", "val", "test")}
    assert seen["train"] <= by_split["train"] and seen["val"] <= by_split["val"]
    assert not (seen["train"] | seen["val"]) & by_split["test"]
    val_modalities = set(table.loc[table["case_id"].isin(seen["val"]), "modality"])
    assert val_modalities == {"us"}  # validation is the student's modality only


def test_pairing_free_student_trains_through_ray_train_with_every_loss_and_exports(
        data, teacher_dir, ray_local, tmp_path):
    from diffkd.models.export import onnx_session
    from diffkd.train.student import train_student

    ds, table = data
    cfg = StudentConfig(arch="regnetx_002", teacher_dir=teacher_dir, mode="pairing_free", clinical=True, distill=ALL_LOSSES, pipeline=PipelineConfig(image_size=64, augment=False),
                        loop=LoopConfig(epochs=2, batch_size=16, lr=1e-3, storage_path=str(tmp_path / "runs"),
                                        progress=False, shuffle_buffer=0, warmup_fraction=0.25))
    out_dir = str(tmp_path / "student")
    result = train_student(ds, table, cfg, out_dir=out_dir)

    history = result.fit.history
    assert [h["epoch"] for h in history] == [1, 2]
    assert {"ce", "kd_logit", "kd_feature", "kd_gkd_pro"} <= set(history[0]) and "kd_gkd_den" not in history[0]
    assert "kd_gkd_den" in history[1]  # switched on after the 1-epoch warm-up
    assert all(math.isfinite(h["loss"]) for h in history)
    assert 0.0 <= result.val_auc <= 1.0
    assert {"model.safetensors", "config.json", "model.onnx", "predictions.parquet"} <= set(os.listdir(out_dir))
    info = json.load(open(os.path.join(out_dir, "training.json")))
    assert info["metrics"]["onnx_max_abs_diff"] <= 1e-4 and info["config"]["mode"] == "pairing_free"
    # Predictions cover every B-mode case of every split (external too, after training), and nothing else.
    expected = table[table["modality"] == "us"]
    assert sorted(result.predictions["case_id"]) == sorted(expected["case_id"])
    assert set(result.predictions["split"]) == {"train", "val", "test"}
    assert result.metrics["params"] == result.params and result.metrics["latency_ms"] > 0
    assert {i.name for i in onnx_session(os.path.join(out_dir, "model.onnx")).get_inputs()} == {"image", "clinical"}
