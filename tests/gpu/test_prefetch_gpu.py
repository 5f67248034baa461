"""The opt-in weight prefetch (workers/model/prefetch.py, kernels/triton_prefetch.py) compiled
on a CUDA device: the kernel reads every word of a weight-sized tensor once, also replayed from a
CUDA graph; and in the engine, with ``KVRELAY_L2_PREFETCH`` set, the decode graphs capture the
side stream's prefetches and the greedy tokens equal those without a plan (a prefetch only
reads). tests/unit/test_prefetch.py runs the kernel interpreted."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from kvrelay.kernels import triton_ops, triton_prefetch  # noqa: E402
from kvrelay_testing.engine_runs import greedy_graph_tokens  # noqa: E402


def _expected(tensor: torch.Tensor, programs: int) -> list[int]:
    """torch's int64 sums of the int32 words each program's chunk holds."""
    words = triton_prefetch.words(tensor)
    chunk = triton_prefetch.chunk_words(words.numel(), programs)
    return [int(c.to(torch.int64).sum()) for c in words.split(chunk)]


def _sums(tensor: torch.Tensor, programs: int) -> tuple[list[int], list[int]]:
    """(the kernel's per-program word sums, torch's over the same chunks)."""
    expected = _expected(tensor, programs)
    sums = torch.full((programs,), -1, dtype=torch.int64, device=tensor.device)
    triton_prefetch.l2_prefetch(tensor, programs, sums)
    return sums[: len(expected)].tolist(), expected


@pytest.mark.parametrize("programs", [16, 64, 132])
def test_the_kernel_reads_every_word_of_a_1b_o_projection(programs: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(programs)
    w = torch.randn(2048, 2048, device="cuda", generator=g).to(torch.bfloat16)
    got, expected = _sums(w, programs)
    assert got == expected


def test_the_kernel_replays_from_a_cuda_graph() -> None:
    w = torch.randn(3072, 2048, device="cuda").to(torch.bfloat16)
    sums = torch.zeros(64, dtype=torch.int64, device="cuda")
    triton_prefetch.l2_prefetch(w, 64, sums)  # compiled outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        triton_prefetch.l2_prefetch(w, 64, sums)
    before = _expected(w, 64)
    sums.zero_()
    w.add_(1)  # the replay reads the tensor's bytes as they are now
    graph.replay()
    torch.cuda.synchronize()
    now = _expected(w, 64)
    assert now != before and sums[: len(now)].tolist() == now


def test_engine_greedy_tokens_equal_with_a_plan_and_without(
    make_gpu_llama: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = [0]

    def counting(*args: Any) -> None:
        calls[0] += 1
        triton_prefetch.l2_prefetch(*args)

    monkeypatch.setattr(triton_ops, "l2_prefetch", counting)
    folder = make_gpu_llama(seed=11)
    monkeypatch.delenv("KVRELAY_L2_PREFETCH", raising=False)
    off = greedy_graph_tokens(folder)
    assert calls[0] == 0
    monkeypatch.setenv("KVRELAY_L2_PREFETCH", "o,down,qkv@32")
    on = greedy_graph_tokens(folder)
    assert calls[0] > 0  # captured into the decode graphs (and run by eager small steps)
    assert on == off
