"""Device ops, each with one signature and two bodies: Triton on CUDA, the torch reference
elsewhere (``kernels/reference.py`` documents the KV cache layout they all share).

Callers import the op from here; dispatch is by the device of the cache tensor (of the first
argument for the model's fused elementwise ops, whose references live in ``kernels/fused.py``).
Setting ``KVRELAY_KERNELS=reference`` forces the reference bodies everywhere (for comparisons);
``KVRELAY_REFERENCE_OPS=name,name`` forces them for the named ops only (benchmarks time one op
both ways inside the real path). Both are read at each call.

``linear`` (the model's projections) is ``F.linear`` unless ``KVRELAY_GEMV=1``: then, on CUDA
and for at most ``GEMV_MAX_M`` rows (decode at small batch), the split-K GEMV of
``kernels/triton_gemv.py``. That switch is read once, at import, into ``GEMV``.

``l2_prefetch`` (the opt-in weight prefetch of workers/model/prefetch.py) has no result: on CUDA
it reads a tensor into L2 (kernels/triton_prefetch.py), elsewhere it does nothing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F

from kvrelay.kernels import fused, reference, sparse_reference

__all__ = [
    "add_rms_norm",
    "block_scores",
    "copy_blocks",
    "l2_prefetch",
    "linear",
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


def _triton_ops() -> Any | None:
    if os.environ.get("KVRELAY_KERNELS") == "reference" or not torch.cuda.is_available():
        return None
    try:
        from kvrelay.kernels import triton_ops
    except ImportError:
        return None
    return triton_ops


# Off by default until benchmarks/gemv_bench.py measures it faster than cuBLAS on the GPU (issue
# 17); then it becomes the default. Read once: ``linear`` runs at every projection of every step,
# and a CUDA graph keeps whichever path was taken at capture. Benchmarks and tests set ``GEMV``.
GEMV = os.environ.get("KVRELAY_GEMV", "0") == "1"
GEMV_MAX_M = 16  # rows up to which the GEMV path is taken (its tl.dot path pads to 16)


def linear(
    x: torch.Tensor,  # [M, K]
    weight: torch.Tensor,  # [N, K]
    bias: torch.Tensor | None = None,  # [N]
) -> torch.Tensor:  # [M, N]
    """``F.linear(x, weight, bias)``; the Triton GEMV at ``M <= GEMV_MAX_M`` on CUDA when
    ``GEMV`` is on."""
    if GEMV and x.is_cuda and x.dim() == 2 and x.shape[0] <= GEMV_MAX_M:
        fast = _triton_ops()
        if fast is not None:
            out: torch.Tensor = fast.gemv(x, weight, bias)
            return out
    return F.linear(x, weight, bias)


def l2_prefetch(tensor: torch.Tensor, programs: int = 64) -> None:
    """Read ``tensor`` into the GPU's L2 with ``programs`` thread blocks, for a kernel that
    reads it next; a no-op off CUDA (and with ``KVRELAY_KERNELS=reference``)."""
    if tensor.is_cuda:
        fast = _triton_ops()
        if fast is not None:
            fast.l2_prefetch(tensor, programs)


def _dispatch(name: str, ref_module: ModuleType = reference) -> Callable[..., Any]:
    ref = getattr(ref_module, name)

    def op(*args: Any, **kwargs: Any) -> Any:
        cache = args[1] if name.startswith("paged_") else args[0]
        if cache.is_cuda and name not in os.environ.get("KVRELAY_REFERENCE_OPS", "").split(","):
            fast = _triton_ops()
            if fast is not None and hasattr(fast, name):
                return getattr(fast, name)(*args, **kwargs)
        return ref(*args, **kwargs)

    op.__name__ = name
    op.__doc__ = ref.__doc__
    return op


write_kv = _dispatch("write_kv")
paged_decode_attention = _dispatch("paged_decode_attention")
paged_prefill_attention = _dispatch("paged_prefill_attention")
pack_blocks = _dispatch("pack_blocks")
unpack_blocks = _dispatch("unpack_blocks")
copy_blocks = _dispatch("copy_blocks")
rms_norm = _dispatch("rms_norm", fused)
add_rms_norm = _dispatch("add_rms_norm", fused)
rope_write_kv = _dispatch("rope_write_kv", fused)
silu_mul = _dispatch("silu_mul", fused)
# opt-in sparse attention (workers/model/sparse_attention.py); dispatched by the device of the
# first argument (the query; the context lengths for sparse_tables, the bounds for update_bounds)
block_scores = _dispatch("block_scores", sparse_reference)
sparse_decode_attention = _dispatch("sparse_decode_attention", sparse_reference)
sparse_prefill_attention = _dispatch("sparse_prefill_attention", sparse_reference)
sparse_tables = _dispatch("sparse_tables", sparse_reference)
update_bounds = _dispatch("update_bounds", sparse_reference)
sampled_column_mass = _dispatch("sampled_column_mass", sparse_reference)
topk_blocks = _dispatch("topk_blocks", sparse_reference)
