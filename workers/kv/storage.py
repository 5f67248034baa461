"""One worker's KV memory: the device cache tensor, the block pool over it, and the CPU tier
behind it (with the copier between the two).

An engine builds its own (``build_kv_storage``) or is handed one: the semi-PD worker
(``workers/semi_pd/``) builds one and gives it to both its lanes, so a prefill lane's blocks
become a decode lane's by handing over block ids, never bytes. Whoever shares a storage between
threads serialises every pool call (``workers/semi_pd/worker.py``: one lock per storage).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvrelay.workers.kv.block_pool import BlockPool
from kvrelay.workers.kv.tiers import BlockCopier, CpuTier, block_nbytes, build_cpu_tier


@dataclass(frozen=True, slots=True)
class KVStorage:
    cache: torch.Tensor  # [num_blocks, L, 2, bs, Hkv, D]
    pool: BlockPool  # over ``cache``
    copier: BlockCopier  # device <-> CPU tier copies
    cpu_tier: CpuTier | None  # None: no CPU tier

    @property
    def block_bytes(self) -> int:
        return block_nbytes(self.cache)


def build_kv_storage(
    block_shape: tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    *,
    num_blocks: int | None,
    kv_gb: float,
    cpu_num_blocks: int | None,
    cpu_kv_gb: float,
    async_copies: bool | None,
    side_bytes_per_block: int = 0,
) -> KVStorage:
    """``block_shape``: one block's ``[L, 2, bs, Hkv, D]``; ``num_blocks=None``: as many as
    ``kv_gb`` holds (at least 16), counting ``side_bytes_per_block`` the caller keeps beside each
    block (sparse attention's key bounds). The CPU tier's arguments are ``build_cpu_tier``'s."""
    block_bytes = torch.Size(block_shape).numel() * dtype.itemsize
    n = num_blocks or max(16, int(kv_gb * 2**30 // (block_bytes + side_bytes_per_block)))
    cache = torch.zeros((n, *block_shape), dtype=dtype, device=device)
    pool = BlockPool(n, block_shape[2])
    copier, cpu_tier = build_cpu_tier(
        cache, pool, num_blocks=cpu_num_blocks, kv_gb=cpu_kv_gb, async_copies=async_copies
    )
    return KVStorage(cache, pool, copier, cpu_tier)
