"""Where data, checkpoints and results live: local paths, shared mounts, or object stores, one way.

Every place diffkd reads or writes persistent files (a dataset, Ray Train's `storage_path`, models,
reports) accepts the same things and resolves them into a pyarrow filesystem and a path in it:

- a local path (``runs/x``, ``~/data``): absolute on the local filesystem. On a multi-node cluster it
  must be a shared mount (NFS, EFS, Lustre, a PVC) that every node sees at the same path;
  `check_visible_from_all_nodes` verifies that before a long job relies on it;
- a URI pyarrow understands: ``file:///abs/path``, ``s3://bucket/prefix``, ``gs://bucket/prefix``
  (credentials come from the usual environment / instance metadata);
- a pyarrow filesystem object plus a path inside it, e.g. ``SubTreeFileSystem`` over a base
  directory, or an ``S3FileSystem`` with explicit options.
"""
from __future__ import annotations

import os
import posixpath
import secrets
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs  # noqa: F401  (pa.fs)

from diffkd.runtime.files import atomic_write_bytes


class StorageError(ValueError):
    """A storage location is malformed, unsupported or unreachable."""


@dataclass(frozen=True)
class Location:
    """A filesystem and a path in it; picklable, so it can travel to Ray workers."""
    fs: pa.fs.FileSystem
    path: str

    def __str__(self) -> str:
        return self.uri

    @property
    def uri(self) -> str:
        """For messages and manifests: file:///..., s3://..., gs://..., or the filesystem's type name."""
        scheme = {"local": "file://", "s3": "s3://", "gcs": "gs://"}.get(self.fs.type_name)
        if scheme == "file://":
            return scheme + self.path
        if scheme:
            return scheme + self.path.lstrip("/")
        return f"{self.fs.type_name}:{self.path}"

    @property
    def is_local(self) -> bool:
        """True when the bytes are on a (possibly shared) local filesystem, not an object store."""
        fs = self.fs
        while isinstance(fs, pa.fs.SubTreeFileSystem):
            fs = fs.base_fs
        return isinstance(fs, pa.fs.LocalFileSystem)

    def join(self, *parts: str) -> "Location":
        return Location(self.fs, posixpath.join(self.path, *parts) if self.path else posixpath.join(*parts))

    def exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pa.fs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.fs.get_file_info(self.path).type == pa.fs.FileType.Directory

    def makedirs(self) -> "Location":
        self.fs.create_dir(self.path, recursive=True)
        return self

    def read_bytes(self) -> bytes:
        try:
            with self.fs.open_input_stream(self.path) as f:
                return f.read()
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri} does not exist") from None

    def write_bytes(self, data: bytes) -> None:
        """Write whole or not at all: locally `diffkd.runtime.files.atomic_write_bytes` (temporary file, fsync,
        rename); an object store stores an uploaded object whole, so it is written in one upload."""
        if self.is_local and isinstance(self.fs, pa.fs.LocalFileSystem):
            atomic_write_bytes(self.path, data)
            return
        parent = posixpath.dirname(self.path)
        if parent:
            self.fs.create_dir(parent, recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def ray_storage(self) -> dict:
        """Keyword arguments for `ray.train.RunConfig`: storage_path and storage_filesystem."""
        return {"storage_path": self.path, "storage_filesystem": self.fs}


def resolve(location, filesystem: pa.fs.FileSystem | None = None) -> Location:
    """A `Location` from a local path, a filesystem URI, a (filesystem, path) pair, or a path plus `filesystem`."""
    if isinstance(location, Location):
        if filesystem is not None:
            raise StorageError("pass either a Location or a path with a filesystem, not both")
        return location
    if isinstance(location, tuple) and len(location) == 2 and isinstance(location[0], pa.fs.FileSystem):
        filesystem, location = location
    if not isinstance(location, (str, os.PathLike)):
        raise StorageError(f"storage location must be a path, a URI or (filesystem, path); got {type(location).__name__}")
    text = os.fspath(location)
    if not text:
        raise StorageError("storage location is empty")
    if filesystem is not None:
        if "://" in text:
            raise StorageError(f"{text!r}: give a path inside the filesystem object, not a URI")
        return Location(filesystem, text.rstrip("/") if text != "/" else text)
    if "://" in text:
        try:
            fs, path = pa.fs.FileSystem.from_uri(text)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, ValueError, OSError) as err:
            reason = str(err).splitlines()[0][:200]  # HDFS without a JVM lists every path it tried
            raise StorageError(f"cannot open {text!r}: {reason}. Use a local path, file://, s3:// or gs://, "
                               "or pass a pyarrow filesystem object") from None
        return Location(fs, path.rstrip("/") or path)
    return Location(pa.fs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text)))


def ray_storage(location, filesystem: pa.fs.FileSystem | None = None) -> dict:
    """`RunConfig(**ray_storage(...), name=...)` for any location diffkd accepts."""
    return resolve(location, filesystem).ray_storage()


def check_visible_from_all_nodes(location, filesystem: pa.fs.FileSystem | None = None, timeout_s: float = 120) -> int:
    """Verify every alive Ray node sees `location` (a shared mount really is shared); returns the node count.

    Writes a marker file here and has a task pinned to each node look for it. A local path that is
    not shared would otherwise lose checkpoints written on one node and read on another.
    """
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    loc = resolve(location, filesystem)
    marker = loc.join(f".diffkd-visible-{secrets.token_hex(4)}")
    token = secrets.token_hex(8).encode()
    marker.write_bytes(token)

    @ray.remote(num_cpus=0)
    def sees(target: Location, expected: bytes) -> bool:
        try:
            return target.read_bytes() == expected
        except (FileNotFoundError, OSError):
            return False

    try:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        refs = {n["NodeManagerAddress"]: sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(marker, token)
            for n in nodes}
        results = dict(zip(refs, ray.get(list(refs.values()), timeout=timeout_s)))
    finally:
        marker.fs.delete_file(marker.path)
    blind = sorted(node for node, ok in results.items() if not ok)
    if blind:
        raise StorageError(f"{loc.uri} is not visible from node(s) {', '.join(blind)}: on a multi-node cluster "
                           "use a shared mount every node has at the same path, or s3:// / gs://")
    return len(results)
