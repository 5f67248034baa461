"""The small-batch GEMV (kernels/triton_gemv.py) through Triton's interpreter on CPU, against
``F.linear``: both code paths (M == 1 FMA, M > 1 tl.dot), the split-K reduce, ragged N and K
tiles, the bias; tests/gpu/test_gemv_gpu.py runs the same comparisons compiled, at the model's
shapes.

Interpreter mode: the module is loaded in a fixture that runs after collection, as a private copy
with TRITON_INTERPRET=1 set only meanwhile (kvrelay_testing/interpret.py says why), so an earlier
import of ``kvrelay.kernels.triton_gemv`` cannot hand over compiled kernels.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
import torch.nn.functional as F

from kvrelay import kernels
from kvrelay.kernels.reference import rel_err
from kvrelay_testing.interpret import interpreted

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed", allow_module_level=True)
if torch.cuda.is_available():
    pytest.skip("CUDA present: tests/gpu checks the compiled kernels", allow_module_level=True)


@pytest.fixture(scope="module")
def gemv() -> Iterator[ModuleType]:
    with interpreted("kvrelay.kernels.triton_gemv", "_gemv_kernel") as module:
        yield module


N, K = 96, 200  # neither a multiple of any tile


def _case(m: int, dtype: torch.dtype, bias: bool, seed: int, n: int = N, k: int = K):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    return x, w, b


def _exact(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.double(), w.double(), None if b is None else b.double())


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_fp32_matches_linear(gemv: ModuleType, m: int, bias: bool) -> None:
    x, w, b = _case(m, torch.float32, bias, seed=m)
    got = gemv.gemv(x, w, b)
    assert got.dtype == torch.float32 and got.shape == (m, N)
    assert rel_err(got, F.linear(x, w, b)) < 1e-5


@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("m", [1, 3, 8])
def test_bf16_matches_linear(gemv: ModuleType, m: int, bias: bool) -> None:
    """One rounding of an fp32 sum. The interpreter casts fp32 to bf16 by truncation (triton 3.9;
    compiled kernels round to nearest, tests/gpu holds them to half an ulp), so here each element
    is within one bf16 ulp (2^-7 relative) of the exact product."""
    x, w, b = _case(m, torch.bfloat16, bias, seed=10 + m)
    got = gemv.gemv(x, w, b)
    assert got.dtype == torch.bfloat16 and got.shape == (m, N)
    exact = _exact(x, w, b)
    assert bool(((got.double() - exact).abs() <= 2**-7 * exact.abs() + 1e-6).all())
    assert rel_err(got, F.linear(x, w, b)) < 1e-2


def test_fp16_matches_linear(gemv: ModuleType) -> None:
    x, w, b = _case(5, torch.float16, True, seed=20)
    assert rel_err(gemv.gemv(x, w, b), _exact(x, w, b)) < 1e-3


# (block_m, M): the FMA path (1) and the tl.dot path (16), each also at the other's M and over
# several M tiles (FMA at M = 3, tl.dot at M = 19)
@pytest.mark.parametrize(("block_m", "m"), [(1, 1), (1, 3), (16, 1), (16, 8), (16, 19)])
@pytest.mark.parametrize("splits", [1, 3, 100])  # 100: more than K tiles, clamped to 7
def test_split_k_reduces_to_the_same_result(
    gemv: ModuleType, m: int, splits: int, block_m: int
) -> None:
    x, w, b = _case(m, torch.float32, True, seed=30 + splits)
    tuning = gemv.GemvTuning(block_m, 16, 32, splits, num_warps=4, num_stages=1)
    assert rel_err(gemv.gemv(x, w, b, tuning), F.linear(x, w, b)) < 1e-5


def test_strided_rows_and_empty_batch(gemv: ModuleType) -> None:
    x, w, b = _case(4, torch.float32, True, seed=40)
    wide = torch.zeros(4, 2 * K)
    wide[:, :K] = x
    assert rel_err(gemv.gemv(wide[:, :K], w, b), F.linear(x, w, b)) < 1e-5
    assert gemv.gemv(x[:0], w, b).shape == (0, N)


def test_rejects_bad_shapes_and_dtypes(gemv: ModuleType) -> None:
    x, w, b = _case(2, torch.float32, True, seed=50)
    with pytest.raises(ValueError, match="need"):
        gemv.gemv(x, w[:, :-1])
    with pytest.raises(ValueError, match="bias"):
        gemv.gemv(x, w, b[:-1])  # type: ignore[index]
    with pytest.raises(ValueError, match="dtype"):
        gemv.gemv(x, w.double())
    with pytest.raises(ValueError, match="contiguous"):
        gemv.gemv(x, w.t().contiguous().t())
    with pytest.raises(ValueError, match="block_m"):
        gemv.gemv(x, w, None, gemv.GemvTuning(8, 16, 32, 1, 4, 1))


SMS = 132  # H100 / H200
SHAPES = {  # (N, K) of the Llama-3.2-1B and Llama-3.1-8B projections
    "1b_qkv": (3072, 2048), "1b_o": (2048, 2048), "1b_gate_up": (16384, 2048),
    "1b_down": (2048, 8192), "8b_qkv": (6144, 4096), "8b_o": (4096, 4096),
    "8b_gate_up": (28672, 4096), "8b_down": (4096, 14336),
}  # fmt: skip


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("m", [1, 2, 8, 16])
def test_choose_fills_the_gpu_without_empty_splits(gemv: ModuleType, shape: str, m: int) -> None:
    n, k = SHAPES[shape]
    t = gemv.choose(m, n, k, 2, SMS)
    tiles = -(-n // t.block_n)
    k_tiles = -(-k // t.block_k)
    assert t.block_k * 2 == 512  # 16 bytes a thread, a warp per tile row
    # enough programs to keep HBM busy, or one K tile per split
    assert tiles * t.splits >= min(2 * SMS, tiles * k_tiles)
    assert t.splits == 1 or tiles < 2 * SMS  # no reduce pass where the tiles fill the GPU
    per_split = -(-k_tiles // t.splits)
    assert (t.splits - 1) * per_split < k_tiles  # the last split is not empty


def test_linear_dispatch_is_f_linear_off_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the switch on, CPU tensors still take F.linear, bit for bit."""
    monkeypatch.setattr(kernels, "GEMV", True)
    x, w, b = _case(2, torch.bfloat16, True, seed=60)
    assert torch.equal(kernels.linear(x, w, b), F.linear(x, w, b))
