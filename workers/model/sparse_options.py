"""The sparse-attention modes (torch-free, so ``kvrelay serve``'s settings can check them without
importing torch); the flags are in cluster/runtime/config.py, and workers/model/sparse_attention.py
turns them into a SparseConfig."""

from __future__ import annotations

SPARSE_MODES = ("off", "decode", "prefill", "both")
