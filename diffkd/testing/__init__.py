"""Test harnesses shipped with diffkd, for its own tests and for code built on it (as Ray ships `cluster_utils`).

- `localcluster`: a real multi-node Ray cluster on one machine (network namespaces, or distinct ports),
  also runnable as `python -m diffkd.testing.localcluster up|status|down` (cluster/local_multinode.sh).
"""
