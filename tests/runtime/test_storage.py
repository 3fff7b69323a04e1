"""Storage locations: local paths, file:// / s3:// / gs:// URIs and pyarrow filesystem objects, for
Ray Train's storage_path and for datasets read by Ray Data."""
from __future__ import annotations

import os
import pickle
import uuid

import pyarrow as pa
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

from diffkd.runtime import storage
from diffkd.runtime.storage import StorageError


def test_local_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    loc = storage.resolve("runs/a")
    assert isinstance(loc.fs, pa.fs.LocalFileSystem) and loc.path == str(tmp_path / "runs" / "a")
    assert loc.is_local and loc.uri == f"file://{tmp_path}/runs/a"
    monkeypatch.setenv("HOME", str(tmp_path))
    assert storage.resolve("~/x").path == str(tmp_path / "x")


def test_uris_resolve_to_their_filesystems(tmp_path):
    loc = storage.resolve(f"file://{tmp_path}/ds/")
    assert isinstance(loc.fs, pa.fs.LocalFileSystem) and loc.path == f"{tmp_path}/ds"
    s3 = storage.resolve("s3://bucket/runs/exp1?region=us-east-1")
    assert s3.fs.type_name == "s3" and s3.path == "bucket/runs/exp1" and not s3.is_local
    assert s3.uri == "s3://bucket/runs/exp1"
    gs = storage.resolve("gs://bucket/data")
    assert gs.fs.type_name == "gcs" and gs.uri == "gs://bucket/data"
    assert s3.ray_storage() == {"storage_path": "bucket/runs/exp1", "storage_filesystem": s3.fs}


@pytest.mark.parametrize("bad, message", [
    ("foo://x/y", "cannot open 'foo://x/y'"),
    ("", "empty"),
    (42, "must be a path"),
])
def test_bad_locations_say_what_is_wrong(bad, message):
    with pytest.raises(StorageError, match=message):
        storage.resolve(bad)


def test_filesystem_object_with_a_path(tmp_path):
    base = tmp_path / "bucket"
    base.mkdir()
    subtree = pa.fs.SubTreeFileSystem(str(base), pa.fs.LocalFileSystem())
    loc = storage.resolve("runs/exp", filesystem=subtree)
    assert loc.is_local and storage.resolve((subtree, "runs/exp")) == loc
    loc.join("a", "b.txt").write_bytes(b"hello")
    assert (base / "runs" / "exp" / "a" / "b.txt").read_bytes() == b"hello"
    assert loc.join("a", "b.txt").read_bytes() == b"hello"
    assert pickle.loads(pickle.dumps(loc)).join("a", "b.txt").read_bytes() == b"hello"  # travels to workers
    with pytest.raises(StorageError, match="not a URI"):
        storage.resolve("s3://b/x", filesystem=subtree)


def test_write_is_whole_or_nothing(tmp_path):
    loc = storage.resolve(f"file://{tmp_path}/out/manifest.json")
    loc.write_bytes(b"v1")
    loc.write_bytes(b"v2")
    assert loc.read_bytes() == b"v2"
    assert os.listdir(tmp_path / "out") == ["manifest.json"]  # no temporary siblings left
    with pytest.raises(FileNotFoundError, match="missing.json does not exist"):
        storage.resolve(tmp_path / "missing.json").read_bytes()


def test_ray_data_reads_a_dataset_through_any_location(ray_local, tmp_path):
    import ray

    (tmp_path / "ds" / "center=A").mkdir(parents=True)
    pq.write_table(pa.table({"x": list(range(10))}), tmp_path / "ds" / "center=A" / "part-0.parquet")
    subtree = pa.fs.SubTreeFileSystem(str(tmp_path), pa.fs.LocalFileSystem())
    for loc in (storage.resolve(f"file://{tmp_path}/ds"), storage.resolve("ds", filesystem=subtree)):
        ds = ray.data.read_parquet(loc.path, filesystem=loc.fs)
        rows = ds.take_all()
        assert sorted(r["x"] for r in rows) == list(range(10)) and {r["center"] for r in rows} == {"A"}


def test_ray_train_checkpoints_to_a_uri_and_resumes_through_a_filesystem_object(ray_local, tmp_path):
    """The same storage reached as file:// URI and as SubTreeFileSystem: the second run resumes the first."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    name = f"storage-{uuid.uuid4().hex[:8]}"

    # Defined here so it is pickled by value: Ray workers cannot import test modules.
    def count_epochs(config):
        import tempfile

        import ray.train

        start = 0
        checkpoint = ray.train.get_checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                start = int(open(os.path.join(d, "epoch")).read()) + 1
        for epoch in range(start, start + config["epochs"]):
            with tempfile.TemporaryDirectory() as d:
                with open(os.path.join(d, "epoch"), "w") as f:
                    f.write(str(epoch))
                ray.train.report({"epoch": epoch, "resumed_from": start},
                                 checkpoint=ray.train.Checkpoint.from_directory(d))

    def fit(location, epochs):
        trainer = TorchTrainer(count_epochs, train_loop_config={"epochs": epochs},
                               scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                               run_config=RunConfig(name=name, **storage.ray_storage(location)))
        return trainer.fit()

    first = fit(f"file://{tmp_path}/bucket/results", epochs=2)
    assert first.metrics == {"epoch": 1, "resumed_from": 0}
    run_dir = tmp_path / "bucket" / "results" / name
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 2

    subtree = pa.fs.SubTreeFileSystem(str(tmp_path / "bucket"), pa.fs.LocalFileSystem())
    second = fit((subtree, "results"), epochs=1)
    assert second.metrics == {"epoch": 2, "resumed_from": 2}
    assert len([p for p in run_dir.glob("checkpoint_*") if p.is_dir()]) == 3


def test_visible_from_all_nodes_on_a_single_node(ray_local, tmp_path):
    assert storage.check_visible_from_all_nodes(tmp_path) == 1
    assert os.listdir(tmp_path) == []  # the marker is cleaned up
