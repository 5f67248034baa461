"""Block hashes: a full block's hash chains its parent's hash and its token ids.

The frontend, the router and every worker compute the same hash for the same prefix (no
per-process salt, unlike Python's ``hash``), so the router matches prefixes without asking
workers. ``namespace`` separates models: the same tokens under two models never share a hash.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

ROOT = 0


def namespace_hash(model_id: str) -> int:
    """The root parent hash for a model (its blocks chain from here)."""
    return int.from_bytes(hashlib.blake2b(model_id.encode(), digest_size=8).digest(), "little")


def hash_block(parent: int, token_ids: Sequence[int]) -> int:
    data = parent.to_bytes(8, "little") + np.asarray(token_ids, dtype=np.int64).tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little")


def block_hashes(
    token_ids: Sequence[int], block_size: int, parent: int = ROOT, start_block: int = 0
) -> list[int]:
    """Hashes of the full blocks of ``token_ids`` (a trailing partial block has none).

    ``parent`` is the hash of the block before ``start_block`` (ROOT, or a namespace, at 0).
    """
    out: list[int] = []
    arr = np.asarray(token_ids, dtype=np.int64)
    for b in range(start_block, len(arr) // block_size):
        chunk = arr[b * block_size : (b + 1) * block_size]
        digest = hashlib.blake2b(parent.to_bytes(8, "little") + chunk.tobytes(), digest_size=8)
        parent = int.from_bytes(digest.digest(), "little")
        out.append(parent)
    return out
