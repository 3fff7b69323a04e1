"""The pipeline on a local Ray instance: filters, synthetic mixing, streaming plans, and the Ray Train hand-off."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pandas as pd
import pytest
import torch

from diffkd.data.pipeline import (PipelineConfig, check_can_feed, iter_shard_batches, load_arrays, make_dataset,
                                  required_cpus, split_datasets)
from diffkd.data.schema import ClinicalEncoding

SIZE = 32


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ramp_dataset):
    return ramp_dataset(tmp_path_factory.mktemp("piperay") / "ds")


def cfg(**kw) -> PipelineConfig:
    return PipelineConfig(image_size=SIZE, batch_size=8, **kw)


def epoch_rows(ds, batch_size: int = 8, **kw) -> dict[str, list]:
    rows: dict[str, list] = {"case_id": [], "synthetic": [], "center_idx": []}
    for batch in iter_shard_batches(ds, batch_size, **kw):
        for key in rows:
            value = batch[key]
            rows[key] += value if isinstance(value, list) else value.tolist()
    return rows


def test_filters_by_case_ids_centers_and_modality(ray_local, dataset):
    ids = ["real-A-1", "real-A-2", "real-B-3", "real-C-100", "real-C-2"]
    rows = epoch_rows(make_dataset(dataset, ids, cfg(modalities=("us",)), train=False))
    assert sorted(rows["case_id"]) == ["real-A-1", "real-A-2", "real-B-3", "real-C-2"]  # C-100 is mammo
    assert not any(rows["synthetic"])
    by_center = epoch_rows(make_dataset(dataset, None, cfg(), train=False, centers=["C"]))
    assert len(by_center["case_id"]) == 12 and set(by_center["center_idx"]) == {2}


def test_training_mixes_synthetic_rows_at_the_ratio_and_only_for_training(ray_local, dataset):
    ids = [f"real-A-{i}" for i in range(20)]
    train = make_dataset(dataset, ids, cfg(synthetic_ratio=0.5), train=True, centers=["A"])
    rows = epoch_rows(train, shuffle_buffer=16, shuffle_seed=0)
    real = [c for c, s in zip(rows["case_id"], rows["synthetic"]) if not s]
    synthetic = [c for c, s in zip(rows["case_id"], rows["synthetic"]) if s]
    assert sorted(real) == sorted(ids)  # every real row exactly once
    assert all(c.startswith("syn-A-") for c in synthetic)
    # 10 expected (each of the 40 synthetic rows kept with p = 0.25); 1..22 leaves > 4 sigma each side
    assert 1 <= len(synthetic) <= 22
    val = make_dataset(dataset, ids, cfg(synthetic_ratio=0.5), train=False)
    assert not any(epoch_rows(val)["synthetic"])


def test_training_mixes_only_the_chosen_generator_runs(ray_local, dataset):
    # rows of another generator run in the same dataset stay out (each fixture row has its own source)
    ids = [f"real-A-{i}" for i in range(20)]
    chosen = cfg(synthetic_ratio=5.0, synthetic_sources=("test:3", "test:5"))  # 2 available: both kept
    rows = epoch_rows(make_dataset(dataset, ids, chosen, train=True, centers=["A"]))
    assert sorted(c for c, s in zip(rows["case_id"], rows["synthetic"]) if s) == ["syn-A-3", "syn-A-5"]
    absent = cfg(synthetic_ratio=1.0, synthetic_sources=("no-such-run",))
    assert not any(epoch_rows(make_dataset(dataset, ids, absent, train=True, centers=["A"]))["synthetic"])


def plan_text(ds) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ds.explain()
    return out.getvalue()


def test_the_plan_streams_and_never_materialises(ray_local, dataset):
    ds = make_dataset(dataset, ["real-A-1", "real-B-2"], cfg(synthetic_ratio=1.0, cache="never"), train=True)
    text = plan_text(ds)
    physical = text.split("Physical Plan (Optimized)")[1]
    assert "AllToAll" not in physical and "Materialize" not in physical
    # read, filter and decode run as one task per file on each branch (no PNG bytes through the object store)
    assert "ReadParquet->MapBatches(_decode_in_ray)" in physical
    assert "ReadParquet->Filter(random()" in physical
    assert "Filter[Filter(col('case_id')" not in text.split("Logical Plan (Optimized)")[1]  # pushed into the read
    # the check can fail: an all-to-all shuffle shows up in the same text
    assert "AllToAll" in plan_text(ds.randomize_block_order()).split("Physical Plan (Optimized)")[1]


def test_many_small_centers_are_read_by_a_few_fused_tasks_each_row_once(ray_local, tmp_path, ramp_rows):
    from diffkd.data.dataset import ImageDataset
    from diffkd.data.pipeline import read_tasks

    many = ImageDataset(tmp_path / "many")
    for c in range(10):
        many.write_center(f"K{c}", ramp_rows(f"K{c}", 3))
    settings = cfg(cache="never")
    assert read_tasks(10, settings) == 2 and read_tasks(1, settings) == 1 and read_tasks(0, settings) == 1
    ds = make_dataset(many, None, settings, train=True)
    assert "ReadParquet->MapBatches(_decode_in_ray)" in plan_text(ds).split("Physical Plan (Optimized)")[1]
    for epoch in range(2):  # every row exactly once per epoch, whatever file lands in which task
        rows = epoch_rows(ds, shuffle_buffer=8, shuffle_seed=epoch)
        assert sorted(rows["case_id"]) == sorted(f"real-K{c}-{i}" for c in range(10) for i in range(3))
    assert "2 tasks executed" in ds.stats()


def test_a_cached_set_decodes_once_and_yields_the_streamed_epochs(ray_local, dataset):
    ids = [f"real-A-{i}" for i in range(24)]  # 16-bit images and masks among them
    cached = make_dataset(dataset, ids, cfg(cache="always"), train=True)
    streamed = make_dataset(dataset, ids, cfg(cache="never"), train=True)
    assert "Materialize" not in plan_text(cached).split("Physical Plan (Optimized)")[1]  # already done
    for epoch in range(2):  # augmentation is per epoch, the same in both modes
        rows = {}
        for name, ds in (("cached", cached), ("streamed", streamed)):
            got = {}
            for batch in iter_shard_batches(ds, 8):
                assert batch["mask"].dtype == torch.float32
                got.update({cid: (img.numpy(), m.numpy()) for cid, img, m in
                            zip(batch["case_id"], batch["image"], batch["mask"])})
            rows[name] = got
        assert sorted(rows["cached"]) == sorted(ids)
        for cid in ids:
            np.testing.assert_array_equal(rows["cached"][cid][0], rows["streamed"][cid][0])
            np.testing.assert_array_equal(rows["cached"][cid][1], rows["streamed"][cid][1])
        assert sum(rows["cached"][cid][1].any() for cid in ids) == 12  # odd rows carry a lesion mask
    # the per-epoch work on a cached set runs in a few tasks of several stored blocks each
    from diffkd.data.pipeline import cached_task_rows

    assert cached_task_rows(24, cfg()) == 12 and cached_task_rows(10, cfg()) == 8  # at least one batch (8)
    assert cached_task_rows(100, cfg()) == 50 and cached_task_rows(10_000, cfg()) == 64  # at most 8 batches


def test_a_cached_evaluation_set_is_resized_once_and_a_training_set_every_epoch(ray_local, dataset):
    from ray.data.dataset import MaterializedDataset

    ids = [f"real-A-{i}" for i in range(24)]
    evaluation = make_dataset(dataset, ids, cfg(cache="always"), train=False)
    assert isinstance(evaluation, MaterializedDataset)  # not augmented: every pass reads the same rows
    first, second = ({cid: img.numpy() for batch in iter_shard_batches(evaluation, 8)
                      for cid, img in zip(batch["case_id"], batch["image"])} for _ in range(2))
    assert sorted(first) == sorted(ids)
    for cid in ids:
        np.testing.assert_array_equal(first[cid], second[cid])
    assert not isinstance(make_dataset(dataset, ids, cfg(cache="always"), train=True), MaterializedDataset)
    assert not isinstance(make_dataset(dataset, ids, cfg(cache="never"), train=False), MaterializedDataset)
    small_budget = make_dataset(dataset, ids, cfg(cache="always", cache_budget_mb=0.001), train=False)
    assert not isinstance(small_budget, MaterializedDataset)  # resized rows that would not fit stay lazy


def test_the_cache_budget_decides_between_caching_and_streaming(ray_local, dataset):
    from diffkd.data.pipeline import cache_decision

    ids = [f"real-A-{i}" for i in range(24)]
    fits = cache_decision(dataset, ids, None, cfg(cache_budget_mb=64))
    assert fits.cached and 0 < fits.decoded_bytes <= fits.budget_bytes == 64 * 2**20
    assert not cache_decision(dataset, ids, None, cfg(cache_budget_mb=fits.decoded_bytes / 2**21)).cached
    assert cache_decision(dataset, ids, None, cfg(cache_budget_mb=1e-3, cache="always")).cached
    assert not cache_decision(dataset, ids, None, cfg(cache="never")).cached
    default = cache_decision(dataset, ids, None, cfg())  # a quarter of the object store
    assert default.budget_bytes == int(0.25 * ray_local.cluster_resources()["object_store_memory"])
    assert cache_decision(dataset, ids[:12], None, cfg()).decoded_bytes < fits.decoded_bytes
    with pytest.raises(ValueError, match="cache must be one of"):
        cfg(cache="sometimes")


def test_split_datasets_follow_the_assignments(ray_local, dataset):
    assignments = pd.DataFrame({
        "case_id": ["real-A-0", "real-A-1", "syn-A-3", "real-B-0", "real-C-0", "real-C-1"],
        "center": ["A", "A", "A", "B", "C", "C"],
        "split": ["train", "train", "train", "val", "test", "test"],
        "synthetic": [False, False, True, False, False, False],
    })
    splits = split_datasets(dataset, assignments, cfg())
    assert set(splits) == {"train", "val", "test"}
    # synthetic rows in the table come in through synthetic_ratio (0 here), not as cases
    assert sorted(epoch_rows(splits["train"])["case_id"]) == ["real-A-0", "real-A-1"]
    test_rows = {}
    for batch in iter_shard_batches(splits["test"], 8):
        test_rows.update(zip(batch["case_id"], batch["image"].numpy()))
    assert sorted(test_rows) == ["real-C-0", "real-C-1"]
    reference = load_arrays(dataset, ["real-C-0", "real-C-1"], cfg())  # evaluation: not augmented
    np.testing.assert_array_equal(test_rows["real-C-0"], reference["image"][0])
    assert set(split_datasets(dataset, assignments[assignments.split != "test"], cfg())) == {"train", "val"}


def test_check_can_feed_refuses_sizings_that_would_hang(ray_local):
    total = ray_local.cluster_resources()["CPU"]
    check_can_feed(cfg(), train_cpus=total - required_cpus(cfg()))
    with pytest.raises(RuntimeError, match="would hang"):
        check_can_feed(cfg(), train_cpus=total - required_cpus(cfg()) / 2)


@pytest.mark.parametrize("cache", ["never", "always"])
def test_ray_data_feeds_a_ray_train_worker_at_the_tightest_cpu_sizing(ray_local, dataset, tmp_path, cache):
    """One worker takes every CPU but what the pipeline needs; two epochs arrive, differently augmented,
    streamed from Parquet or from the decoded-once cache alike."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def train_loop(config: dict) -> None:  # defined here: workers cannot import test modules
        """A Ray Train worker: two epochs over its shard, recording shapes and each row's image sum per epoch."""
        import ray.train

        shard = ray.train.get_dataset_shard("train")
        epochs, kinds = [], {}
        for epoch in range(2):
            sums = {}
            for batch in iter_shard_batches(shard, 4, shuffle_buffer=8, shuffle_seed=epoch):
                sums.update({cid: float(img.sum()) for cid, img in zip(batch["case_id"], batch["image"])})
                kinds = {k: [list(v.shape), str(v.dtype)] if hasattr(v, "shape") else type(v).__name__
                         for k, v in batch.items()}
            epochs.append(sums)
        with open(config["out"], "w") as f:
            json.dump({"epochs": epochs, "kinds": kinds}, f)
        ray.train.report({"rows": len(epochs[0])})

    c = cfg(cache=cache)
    ids = [f"real-A-{i}" for i in range(12)] + ["real-B-5"]
    worker_cpus = ray_local.cluster_resources()["CPU"] - required_cpus(c)
    check_can_feed(c, worker_cpus)
    out = tmp_path / "worker.json"
    TorchTrainer(
        train_loop, train_loop_config={"out": str(out)},
        scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": worker_cpus}),
        datasets={"train": make_dataset(dataset, ids, c, train=True)},
        run_config=RunConfig(storage_path=str(tmp_path / "runs"), name=f"handoff-{cache}"),
    ).fit()
    record = json.loads(out.read_text())
    first, second = record["epochs"]
    assert sorted(first) == sorted(ids) and sorted(second) == sorted(ids)
    kinds = record["kinds"]
    assert kinds["image"][0][1:] == [1, SIZE, SIZE] and kinds["image"][1] == "torch.float32"
    assert kinds["clinical"] == [[kinds["image"][0][0], ClinicalEncoding().width], "torch.float32"]
    assert kinds["mask"] == [[kinds["image"][0][0], 1, SIZE, SIZE], "torch.float32"]  # shipped as uint8
    assert kinds["label"][1] == kinds["center_idx"][1] == "torch.int64" and kinds["synthetic"][1] == "torch.bool"
    assert kinds["case_id"] == "list"
    # epoch e on the worker is exactly load_arrays(train=True, epoch=e): augmentation keyed by (seed, epoch, case)
    for epoch, seen in enumerate((first, second)):
        reference = load_arrays(dataset, sorted(seen), c, train=True, epoch=epoch)
        expected = dict(zip(reference["case_id"], reference["image"].reshape(len(seen), -1).sum(axis=1)))
        assert all(abs(seen[k] - expected[k]) < 1e-2 for k in seen)
    assert sum(abs(first[k] - second[k]) > 1e-3 for k in ids) == len(ids)  # every row augmented anew


def test_a_center_ingested_while_an_epoch_streams_joins_the_next_dataset(ray_local, tmp_path, ramp_dataset, ramp_rows):

    live = ramp_dataset(tmp_path / "live")
    stream = iter_shard_batches(make_dataset(live, None, cfg(), train=False), 4)
    seen = list(next(stream)["case_id"])
    live.write_center("D", ramp_rows("D", 6))  # a new hospital arrives mid-epoch
    for batch in stream:
        seen += batch["case_id"]
    assert len(seen) == 24 + 16 + 12 and not any(c.startswith("real-D-") for c in seen)  # the epoch it began with
    after = epoch_rows(make_dataset(live, None, cfg(), train=False))
    assert sum(c.startswith("real-D-") for c in after["case_id"]) == 6
    assert set(after["center_idx"]) == {0, 1, 2, 3}  # D has its own slot in the center vocabulary
