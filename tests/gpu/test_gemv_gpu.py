"""The small-batch GEMV (kernels/triton_gemv.py) compiled on a CUDA device: against the exact
product at the projection shapes of Llama-3.2-1B and Llama-3.1-8B (M = 1, 2, 8, bf16), bit for
bit repeatable, replayed from a CUDA graph, and in the engine: greedy tokens with KVRELAY_GEMV
on equal those with it off (tests/unit/test_gemv_interpret.py runs the kernels interpreted)."""

from __future__ import annotations

import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from kvrelay import kernels  # noqa: E402
from kvrelay.kernels import triton_gemv, triton_ops  # noqa: E402
from kvrelay.kernels.reference import rel_err  # noqa: E402
from kvrelay_testing.engine_runs import greedy_graph_tokens  # noqa: E402

DEV = "cuda"
SHAPES = {  # (N, K): fused q|k|v, o, fused gate|up, down
    "1b_qkv": (3072, 2048), "1b_o": (2048, 2048), "1b_gate_up": (16384, 2048),
    "1b_down": (2048, 8192), "8b_qkv": (6144, 4096), "8b_o": (4096, 4096),
    "8b_gate_up": (28672, 4096), "8b_down": (4096, 14336),
}  # fmt: skip


def _case(m: int, n: int, k: int, seed: int, bias: bool = False, dtype=torch.bfloat16):
    g = torch.Generator(DEV).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEV).to(dtype)
    w = (torch.randn(n, k, generator=g, device=DEV) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g, device=DEV).to(dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("m", [1, 2, 8])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_model_shapes_match_the_exact_product(shape: str, m: int) -> None:
    """One round-to-nearest of an fp32 sum: within half a bf16 ulp (2^-8 relative at worst) of
    the fp64 product, plus 1e-4 of the largest output for the fp32 sums (tensor cores truncate
    as they accumulate; an indexing error is off by O(1)); and close to cuBLAS's bf16 F.linear."""
    n, k = SHAPES[shape]
    x, w, b = _case(m, n, k, seed=zlib.crc32(shape.encode()) + m, bias=shape.endswith("qkv"))
    got = triton_ops.gemv(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (m, n)
    exact = F.linear(x.double(), w.double(), None if b is None else b.double())
    slack = 2**-8 * exact.abs() + 1e-4 * exact.abs().max()
    assert bool(((got.double() - exact).abs() <= slack).all())
    assert rel_err(got, F.linear(x, w, b)) < 1e-2
    assert torch.equal(triton_ops.gemv(x, w, b), got)  # deterministic: no atomics


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_other_dtypes(dtype: torch.dtype) -> None:
    for m in (1, 5):
        x, w, b = _case(m, 3072, 2048, seed=m, bias=True, dtype=dtype)
        want = F.linear(x.double(), w.double(), b.double())  # type: ignore[union-attr]
        assert rel_err(triton_ops.gemv(x, w, b), want) < (1e-5 if dtype == torch.float32 else 1e-3)


@pytest.mark.parametrize("m", [1, 8])
def test_replays_from_a_cuda_graph(m: int) -> None:
    """Captured (split-K pass and reduce pass), replayed on new inputs: equal to eager calls bit
    for bit, so the launch reads no tensor value on the host."""
    x, w, b = _case(m, 2048, 8192, seed=m, bias=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        triton_ops.gemv(x, w, b)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_ops.gemv(x, w, b)
    g = torch.Generator(DEV).manual_seed(100 + m)
    for _ in range(3):
        x.copy_(torch.randn(x.shape, generator=g, device=DEV))
        graph.replay()
        assert torch.equal(out, triton_ops.gemv(x, w, b))


def test_dispatch_takes_the_gemv_only_at_small_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def counting(x: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(x.shape[0])
        return triton_gemv.gemv(x, *args)

    monkeypatch.setattr(triton_ops, "gemv", counting)
    x, w, _ = _case(kernels.GEMV_MAX_M + 1, 512, 256, seed=1)
    monkeypatch.setattr(kernels, "GEMV", False)
    kernels.linear(x[:1], w)
    assert calls == []
    monkeypatch.setattr(kernels, "GEMV", True)
    kernels.linear(x[:1], w)
    kernels.linear(x[: kernels.GEMV_MAX_M], w)
    assert torch.equal(kernels.linear(x, w), F.linear(x, w))  # past GEMV_MAX_M: cuBLAS
    assert calls == [1, kernels.GEMV_MAX_M]


def test_engine_greedy_tokens_equal_with_gemv_on_and_off(
    make_gpu_llama: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """fp32 random Llama: the GEMV sums in another order than cuBLAS (differences ~1e-6
    relative), which must not change one greedy token; and the GEMV path did run."""
    calls = [0]

    def counting(*args: Any) -> torch.Tensor:
        calls[0] += 1
        return triton_gemv.gemv(*args)

    monkeypatch.setattr(triton_ops, "gemv", counting)
    folder = make_gpu_llama(seed=9)
    monkeypatch.setattr(kernels, "GEMV", False)
    off = greedy_graph_tokens(folder)
    assert calls[0] == 0
    monkeypatch.setattr(kernels, "GEMV", True)
    on = greedy_graph_tokens(folder)
    assert calls[0] > 0
    assert on == off
