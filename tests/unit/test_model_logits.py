"""``LlamaModel.compute_logits`` into a given buffer (the decode graphs' one buffer per batch
size, workers/engine/cuda_graphs.py): the same fp32 logits as a new tensor, in fp32 and from a
bf16 model's bf16 head."""

from __future__ import annotations

import pytest
import torch

from kvrelay_testing.tiny_llama import VOCAB, tiny_llama


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logits_into_a_buffer_equal_a_new_tensor(dtype: torch.dtype) -> None:
    model = tiny_llama().to(dtype)
    hidden = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    hidden = hidden.to(dtype)
    want = model.compute_logits(hidden)
    buffer = torch.full((8, VOCAB), float("nan"))  # a larger batch size's rows
    got = model.compute_logits(hidden, out=buffer[:5])
    assert got.data_ptr() == buffer.data_ptr() and got.dtype == want.dtype == torch.float32
    assert torch.equal(got, want)
    assert buffer[5:].isnan().all()  # nothing past the rows asked for
