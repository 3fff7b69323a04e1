"""Test harnesses shipped with diffkd, for its own tests and for code built on it (as Ray ships `cluster_utils`).

- `localcluster`: a real multi-node Ray cluster on one machine (network namespaces, or distinct ports),
  also runnable as `python -m diffkd.testing.localcluster up|status|down` (cluster/local_multinode.sh).
- `busbra`: a tiny source folder in the BUS-BRA layout (`write_busbra_tree`), for the `busbra` importer.
"""
