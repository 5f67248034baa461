"""A decode step over hand-managed paged sequences, for the sparse-attention step suites."""

from __future__ import annotations

import torch

from kvrelay.workers.model.llama import AttentionMetadata


def next_decode_step(
    seqs: dict[str, list], free: list[int], block_size: int
) -> tuple[list[int], AttentionMetadata]:
    """Grow every sequence of ``seqs`` (request id -> [context tokens, its blocks], in place) by
    the token this step writes, taking a block from the front of ``free`` when it needs one;
    the step's contexts and decode metadata (each row writes its last slot; tables padded with
    block 0)."""
    for s in seqs.values():
        s[0] += 1
        if -(-s[0] // block_size) > len(s[1]):
            s[1].append(free.pop(0))
    ctx = [n for n, _ in seqs.values()]
    slots = torch.tensor(
        [blocks[(n - 1) // block_size] * block_size + (n - 1) % block_size
         for n, blocks in seqs.values()]
    )  # fmt: skip
    width = max(len(b) for _, b in seqs.values())
    tables = torch.tensor([b + [0] * (width - len(b)) for _, b in seqs.values()], dtype=torch.int32)
    attn = AttentionMetadata(slots, tables, torch.tensor(ctx, dtype=torch.int32),
                             torch.arange(len(ctx) + 1, dtype=torch.int32), True)  # fmt: skip
    return ctx, attn
