#!/usr/bin/env bash
# A head and worker nodes on this machine as separate `ray start` processes, each worker in its own
# network namespace (veth pairs on a bridge, 198.18.N.0/24); falls back to distinct ports on
# 127.0.0.1 where namespaces are not allowed (then Ray Train sees one node). The harness is
# diffkd/testing/localcluster.py, shipped with the package.
#
#   cluster/local_multinode.sh up [--workers 2] [--mode auto|netns|ports] [--token T | --no-token]
#     (token auth is on by default: a fresh token per cluster, printed with the addresses)
#   cluster/local_multinode.sh status
#   cluster/local_multinode.sh down [--id ID]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
python="${PYTHON:-$here/.venv/bin/python}"
[ -x "$python" ] || python="$(command -v python3)"
exec "$python" -m diffkd.testing.localcluster "$@"
