"""The sparse-attention options of ``kvrelay serve`` and ``kvrelay generate`` (torch-free, so the
frontends can parse them); workers/sparse_attention.py turns them into a SparseConfig."""

from __future__ import annotations

import argparse

SPARSE_MODES = ("off", "decode", "prefill", "both")


def add_sparse_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--sparse-attention",
        default="off",
        choices=SPARSE_MODES,
        help="LServe/SampleAttention sparse attention in decode, prefill or both",
    )
    p.add_argument(
        "--sparse-budget",
        type=int,
        default=4096,
        help="decode tokens a dense head reads beyond its first and last 64-token pages",
    )
    p.add_argument("--sparse-heads", default=None,
                   help="streaming-head mask from `kvrelay calibrate-heads` (default: the one "
                        "beside the model, if any; else every head dense)")  # fmt: skip
