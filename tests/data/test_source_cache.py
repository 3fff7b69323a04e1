"""Decoded images shared by the runs of one job, and the PNG decode count."""
from __future__ import annotations

import numpy as np

from diffkd.data.pipeline import PipelineConfig, iter_shard_batches, load_arrays, make_dataset
from diffkd.data.source_cache import (ACTOR_NAME, DECODE_LOG_ENV, read_decode_log, shared_cache_open,
                                      shared_source_cache)


def cfg(**kw) -> PipelineConfig:
    return PipelineConfig(image_size=32, batch_size=8, **kw)


def epoch_images(ds) -> dict[str, np.ndarray]:
    return {cid: image.numpy() for batch in iter_shard_batches(ds, 8)
            for cid, image in zip(batch["case_id"], batch["image"])}


def test_every_png_decode_is_counted_in_the_decode_log(tmp_path, monkeypatch, ramp_dataset):
    dataset = ramp_dataset(tmp_path / "ds")
    log = tmp_path / "decodes.log"
    monkeypatch.setenv(DECODE_LOG_ENV, str(log))
    load_arrays(dataset, [f"real-A-{i}" for i in range(10)], cfg())
    load_arrays(dataset, [f"real-B-{i}" for i in range(3)], cfg())
    lines = read_decode_log(str(log))
    assert sum(n for _, n, kind in lines if kind == "real") == 13
    assert not any(kind == "synthetic" for _, _, kind in lines)
    monkeypatch.delenv(DECODE_LOG_ENV)
    load_arrays(dataset, ["real-A-0"], cfg())  # unset: nothing is written
    assert len(read_decode_log(str(log))) == len(lines)


def test_runs_of_one_job_share_each_files_decoded_rows(ray_local, tmp_path, ramp_dataset):
    dataset = ramp_dataset(tmp_path / "ds")
    train_ids = [f"real-A-{i}" for i in range(16)]
    val_ids = [f"real-A-{i}" for i in range(16, 24)] + [f"real-B-{i}" for i in range(4)]
    streamed = epoch_images(make_dataset(dataset, val_ids, cfg(cache="never"), train=False))
    assert not shared_cache_open()
    with shared_source_cache():
        actor = ray_local.get_actor(ACTOR_NAME)
        train = make_dataset(dataset, train_ids, cfg(cache="always"), train=True, centers=["A"])
        assert ray_local.get(actor.stats.remote())["misses"] == 1  # center A's file, decoded now
        val = make_dataset(dataset, val_ids, cfg(cache="always"), train=False)
        stats = ray_local.get(actor.stats.remote())
        assert stats["hits"] == 1 and stats["misses"] == len(dataset.files())  # A again: shared; B: new
        assert sorted(epoch_images(train)) == sorted(train_ids)
        shared_val = epoch_images(val)
        assert sorted(shared_val) == sorted(val_ids)  # each run picks its own rows out of the shared ones
        # in the resize task itself: a filter step of its own would cost a task per cached block every epoch
        assert "Filter" not in train.stats() and "Filter" not in val.stats()
        for cid in val_ids:  # and decodes them exactly as a streamed epoch does
            np.testing.assert_array_equal(shared_val[cid], streamed[cid])
        with shared_source_cache():  # reentrant: the inner block neither adds nor closes a cache
            assert ray_local.get(actor.stats.remote())["entries"] == len(dataset.files())
        assert shared_cache_open()
    assert not shared_cache_open()  # the job's decoded rows are freed with the block


def test_a_shared_cache_too_small_for_the_files_leaves_each_run_to_itself(ray_local, tmp_path, ramp_dataset):
    dataset = ramp_dataset(tmp_path / "ds")
    ids = [f"real-A-{i}" for i in range(8)]
    with shared_source_cache():
        ds = make_dataset(dataset, ids, cfg(cache="always", cache_budget_mb=1e-4), train=False, centers=["A"])
        assert sorted(epoch_images(ds)) == sorted(ids)  # cached by this run alone
        assert ray_local.get(ray_local.get_actor(ACTOR_NAME).stats.remote())["entries"] == 0
