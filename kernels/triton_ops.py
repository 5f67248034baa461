"""Triton bodies of kvrelay's device ops, one per reference op and with its signature
(``kernels/__init__.py`` dispatches here when the cache is on CUDA and Triton imports).

    write_kv, pack_blocks, unpack_blocks, copy_blocks   kernels/triton_copy.py
    paged_decode_attention (GQA, split-K)               kernels/triton_decode.py
    paged_prefill_attention (packed varlen, causal)     kernels/triton_prefill.py
    rms_norm, add_rms_norm, rope_write_kv, silu_mul     kernels/triton_fused.py (the model's
                                                        elementwise work; refs kernels/fused.py)
    block_scores, sparse_decode_attention,              kernels/triton_sparse.py
    sparse_tables, update_bounds
    sparse_prefill_attention                            kernels/triton_sparse_prefill.py
    topk_blocks (sparse decode's block selection)       kernels/triton_topk.py
    sampled_column_mass (SampleAttention's sampling)    kernels/triton_sample.py
    gemv (``linear`` at small batch; ref F.linear)      kernels/triton_gemv.py
    l2_prefetch (no reference: a no-op off CUDA)        kernels/triton_prefetch.py

Every launch derives its grid from tensor shapes, never from tensor values, so no op syncs the
host and decode steps can be captured in CUDA graphs. Under ``TRITON_INTERPRET=1`` the same
kernels run on CPU tensors (tests/unit/test_kernels_interpret.py).
"""

from __future__ import annotations

from kvrelay.kernels.triton_copy import copy_blocks, pack_blocks, unpack_blocks, write_kv
from kvrelay.kernels.triton_decode import paged_decode_attention
from kvrelay.kernels.triton_fused import add_rms_norm, rms_norm, rope_write_kv, silu_mul
from kvrelay.kernels.triton_gemv import gemv
from kvrelay.kernels.triton_prefetch import l2_prefetch
from kvrelay.kernels.triton_prefill import paged_prefill_attention
from kvrelay.kernels.triton_sample import sampled_column_mass
from kvrelay.kernels.triton_sparse import (
    block_scores,
    sparse_decode_attention,
    sparse_tables,
    update_bounds,
)
from kvrelay.kernels.triton_sparse_prefill import sparse_prefill_attention
from kvrelay.kernels.triton_topk import topk_blocks

__all__ = [
    "add_rms_norm",
    "block_scores",
    "copy_blocks",
    "gemv",
    "l2_prefetch",
    "pack_blocks",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rope_write_kv",
    "sampled_column_mass",
    "silu_mul",
    "sparse_decode_attention",
    "sparse_prefill_attention",
    "sparse_tables",
    "topk_blocks",
    "unpack_blocks",
    "update_bounds",
    "write_kv",
]
