"""Device ops, each with one signature and two bodies: Triton on CUDA, the torch reference
elsewhere (``kernels/reference.py`` documents the KV cache layout they all share).

Callers import the op from here; dispatch is by the device of the cache tensor. Setting
``KVRELAY_KERNELS=reference`` forces the reference bodies everywhere (for comparisons).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from kvrelay.kernels import reference

__all__ = [
    "copy_blocks",
    "pack_blocks",
    "paged_decode_attention",
    "paged_prefill_attention",
    "unpack_blocks",
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


def _dispatch(name: str) -> Callable[..., Any]:
    ref = getattr(reference, name)

    def op(*args: Any, **kwargs: Any) -> Any:
        cache = args[1] if name.startswith("paged_") else args[0]
        if cache.is_cuda:
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
