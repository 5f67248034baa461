"""Turns a scheduler plan into model inputs, runs the model and returns the logits to sample.

The batch is packed: sequence i contributes its next ``n_i`` tokens. When every n_i is 1 the
step is a pure decode step and attention takes the decode path (one query per sequence);
otherwise every row goes through the varlen prefill path (a decode row is a chunk of one).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from kvrelay.workers.model import AttentionMetadata, LlamaModel
from kvrelay.workers.scheduler import ScheduledSeq


@dataclass(frozen=True, slots=True)
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the packed batch whose logits are sampled
    sampled: tuple[ScheduledSeq, ...]  # the S sequences those rows belong to


def prepare_inputs(items: Seq[ScheduledSeq], block_size: int, device: torch.device) -> StepInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    starts = [0]
    context_lens: list[int] = []
    logits_indices: list[int] = []
    sampled: list[ScheduledSeq] = []
    max_blocks = max(len(it.seq.block_ids) for it in items)
    tables = torch.zeros((len(items), max_blocks), dtype=torch.int32)
    for i, it in enumerate(items):
        seq, n = it.seq, it.num_tokens
        lo = seq.num_computed
        for pos in range(lo, lo + n):
            input_ids.append(seq.token_at(pos))
            positions.append(pos)
            slots.append(seq.block_ids[pos // block_size] * block_size + pos % block_size)
        starts.append(starts[-1] + n)
        context_lens.append(lo + n)
        tables[i, : len(seq.block_ids)] = torch.tensor(seq.block_ids, dtype=torch.int32)
        if it.samples:
            logits_indices.append(starts[-1] - 1)
            sampled.append(it)

    def t(x: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(x, dtype=dtype, device=device)

    attn = AttentionMetadata(
        slot_mapping=t(slots),
        block_tables=tables.to(device),
        context_lens=t(context_lens, torch.int32),
        query_start_loc=t(starts, torch.int32),
        is_decode=all(it.num_tokens == 1 for it in items),
    )
    return StepInputs(t(input_ids), t(positions), attn, t(logits_indices), tuple(sampled))


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: torch.Tensor, block_size: int) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = block_size
        self.device = kv_cache.device

    @torch.inference_mode()
    def run(self, items: Seq[ScheduledSeq]) -> tuple[torch.Tensor, StepInputs]:
        """Returns fp32 logits ``[S, vocab]`` for the sequences that sample this step."""
        inputs = prepare_inputs(items, self.block_size, self.device)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.attn)
        if not inputs.sampled:
            return torch.empty(0), inputs
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        return logits, inputs
