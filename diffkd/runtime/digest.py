"""One short digest of any JSON-able description: what a stage, trial or cache entry was made from."""
from __future__ import annotations

import hashlib
import json
from typing import Any


def fingerprint(obj: Any) -> str:
    """16 hex digits of the SHA-256 of `obj` as sorted JSON (objects JSON cannot hold by their str)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
