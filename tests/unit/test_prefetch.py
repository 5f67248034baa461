"""The opt-in weight prefetch (workers/model/prefetch.py, kernels/triton_prefetch.py) on CPU:
which weights a plan queues at which layer, the plan's parsing, and the prefetch kernel through
Triton's interpreter — its programs together read every word of the tensor exactly once (their
word sums, written only on request, add up chunk by chunk). tests/gpu/test_prefetch_gpu.py runs
the compiled kernel and the model with a plan in CUDA graphs.

The kernel module is loaded interpreted by kvrelay_testing/interpret.py (a private copy, loaded
while TRITON_INTERPRET=1 is set)."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType, SimpleNamespace

import pytest
import torch

from kvrelay.workers.model.prefetch import PrefetchPlan, WeightPrefetch
from kvrelay_testing.interpret import interpreted


# ---- the plan -----------------------------------------------------------------------------------
def _layers(n: int) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(qkv_weight=torch.zeros(1) + i, o_weight=torch.zeros(1) + 10 + i,
                        down_weight=torch.zeros(1) + 20 + i)
        for i in range(n)
    ]  # fmt: skip


def _names(tensors: list[torch.Tensor]) -> list[int]:
    return [int(t.item()) for t in tensors]


def test_a_plan_queues_this_layers_o_and_down_then_the_next_layers_qkv() -> None:
    layers = _layers(3)
    plan = PrefetchPlan.parse("qkv,down,o")
    assert plan is not None and plan.targets == ("o", "down", "qkv") and plan.programs == 64
    assert _names(plan.at_layer(layers, 0)) == [10, 20, 1]  # o(0), down(0), qkv(1)
    assert _names(plan.at_layer(layers, 2)) == [12, 22]  # the last layer has no next qkv
    only_qkv = PrefetchPlan.parse("qkv@32")
    assert only_qkv == PrefetchPlan(("qkv",), 32)
    assert _names(only_qkv.at_layer(layers, 1)) == [2]


@pytest.mark.parametrize("spec", ["", "off", "0", "  "])
def test_no_plan(spec: str) -> None:
    assert PrefetchPlan.parse(spec) is None


@pytest.mark.parametrize("spec", ["gate_up", "o,up", "@32", "o@0", "o@x", "o@2000"])
def test_a_bad_plan_is_refused_by_name(spec: str) -> None:
    with pytest.raises(ValueError, match="prefetch plan"):
        PrefetchPlan.parse(spec)


def test_the_environment_sets_the_models_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    from kvrelay_testing.tiny_llama import tiny_llama

    monkeypatch.setenv("KVRELAY_L2_PREFETCH", "o,qkv@16")
    model = tiny_llama()
    assert model.prefetch is not None and model.prefetch.plan == PrefetchPlan(("o", "qkv"), 16)
    monkeypatch.delenv("KVRELAY_L2_PREFETCH")
    assert tiny_llama().prefetch is None
    monkeypatch.setenv("KVRELAY_L2_PREFETCH", "gate_up")
    with pytest.raises(ValueError, match="prefetch plan"):
        tiny_llama()


def test_it_applies_to_small_dense_decode_steps_on_cuda_only() -> None:
    pf = WeightPrefetch(PrefetchPlan(("o",)))
    assert not pf.applies(torch.zeros(1, 8), is_decode=True, sparse=False)


# ---- the kernel, interpreted ------------------------------------------------------------------
@pytest.fixture(scope="module")
def prefetch() -> Iterator[ModuleType]:
    with interpreted("kvrelay.kernels.triton_prefetch", "_prefetch_kernel") as module:
        yield module


def _expected_sums(words: torch.Tensor, chunk: int) -> list[int]:
    return [int(c.to(torch.int64).sum()) for c in words.split(chunk)]


@pytest.mark.parametrize(
    ("numel", "dtype", "programs"),
    [
        (3 * 8192 * 2 + 10, torch.bfloat16, 2),  # ragged last tile
        (5 * 8192, torch.float32, 3),  # more tiles than programs: a chunk of several tiles
        (1000, torch.bfloat16, 8),  # fewer tiles than programs: one program
        (8193, torch.uint8, 4),  # a byte count not a multiple of 4: the tail is left
    ],
)
def test_the_programs_read_every_word_once(
    prefetch: ModuleType, numel: int, dtype: torch.dtype, programs: int
) -> None:
    g = torch.Generator().manual_seed(numel)
    tensor = torch.randint(-(2**15), 2**15, (numel,), generator=g).to(dtype)
    before = tensor.clone()
    words = prefetch.words(tensor)
    chunk = prefetch.chunk_words(words.numel(), programs)
    expected = _expected_sums(words, chunk)
    sums = torch.full((programs,), -1, dtype=torch.int64)
    prefetch.l2_prefetch(tensor, programs, sums)
    assert sums[: len(expected)].tolist() == expected
    assert (sums[len(expected) :] == -1).all()  # programs past the grid: none launched
    assert torch.equal(tensor, before)  # a prefetch only reads


def test_without_sums_nothing_is_written(prefetch: ModuleType) -> None:
    tensor = torch.arange(40000, dtype=torch.int32)
    sink = prefetch._sink(tensor.device)
    sink.zero_()
    prefetch.l2_prefetch(tensor, 4)
    assert sink.tolist() == [0] and torch.equal(tensor, torch.arange(40000, dtype=torch.int32))


def test_bad_arguments(prefetch: ModuleType) -> None:
    t = torch.zeros(64, 4)
    with pytest.raises(ValueError, match="contiguous"):
        prefetch.l2_prefetch(t.t(), 4)
    with pytest.raises(ValueError, match="int64"):
        prefetch.l2_prefetch(t, 4, torch.zeros(4, dtype=torch.int32))
    prefetch.l2_prefetch(torch.zeros(0), 4)  # nothing to read: no launch
