"""The model's fused elementwise ops: the torch references (kernels/fused.py) against float64
formulas written here from first principles (RMSNorm, RoPE as a rotation of (x_i, x_{i+D/2})
pairs by position * inv_freq, SiLU gating, a token-by-token cache write), then the Triton
bodies (kernels/triton_fused.py) against the references, run on CPU through Triton's
interpreter like tests/unit/test_kernels_interpret.py.

Interpreter mode: Triton fixes interpreted-vs-compiled when ``@triton.jit`` decorates (its own
standard library at ``import triton``). This file loads a private copy of the Triton bodies
(kvrelay_testing/interpret.py) in a fixture that runs after collection, with TRITON_INTERPRET=1
set only meanwhile: alone, it is the first import of triton; after test_kernels_interpret.py's
collection, triton is already interpreted. If triton was imported compiled by something else,
those tests skip, saying why.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

from kvrelay.kernels import fused
from kvrelay.workers.model.config import RopeScaling
from kvrelay.workers.model.llama import rope_inv_freq
from kvrelay_testing.interpret import interpreted
from kvrelay_testing.kernels import rel_err

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rope_case(
    tokens: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int
) -> dict[str, torch.Tensor]:
    """A fused qkv buffer, llama3-scaled fp32 cos/sin tables, positions, a cache, slots (some
    -1), all random; tables built the way LlamaModel builds its buffers."""
    g = _gen(seed)
    cfg = type("Cfg", (), {})()
    cfg.head_dim, cfg.rope_theta = dim, 500000.0
    cfg.rope_scaling = RopeScaling("llama3", 8.0, 1.0, 4.0, 64)
    inv = rope_inv_freq(cfg)  # type: ignore[arg-type]
    max_pos, bs, blocks = 300, 4, 2 * tokens + 2
    freqs = torch.outer(torch.arange(max_pos).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1)
    slots = torch.randperm(blocks * bs, generator=g)[:tokens]
    slots[torch.rand(tokens, generator=g) < 0.3] = -1
    return {
        "qkv": torch.randn(tokens, (heads + 2 * kv_heads) * dim, generator=g).to(dtype),
        "cos": emb.cos(),
        "sin": emb.sin(),
        "inv": inv,
        "pos": torch.randint(0, max_pos, (tokens,), generator=g),
        "cache": torch.randn(blocks, 2, 2, bs, kv_heads, dim, generator=g).to(dtype),
        "slots": slots,
    }


def written(cache: torch.Tensor, slots: torch.Tensor, layer: int = 1) -> torch.Tensor:
    """The [n, 2, Hkv, D] K/V rows at the valid slots (page size 4, as rope_case makes)."""
    valid = slots[slots >= 0]
    return cache[valid // 4, layer, :, valid % 4]


def run_rope(ops: ModuleType, c: dict[str, torch.Tensor], heads: int, layer: int = 1):
    qkv, cache = c["qkv"].clone(), c["cache"].clone()
    q = ops.rope_write_kv(qkv, c["cos"], c["sin"], c["pos"], cache, layer, c["slots"], heads)
    return q, qkv, cache


# ---- references against first principles --------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rms_norm_and_residual_add_reference(dtype: torch.dtype) -> None:
    g = _gen(1)
    x, res = torch.randn(5, 96, generator=g).to(dtype), torch.randn(5, 96, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(96, generator=g)).to(dtype)
    s = x.double() + res.double()
    want = s / (s.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w.double()
    out, summed = fused.add_rms_norm(x, res, w, 1e-5)
    assert out.dtype == dtype and summed.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 2e-2
    assert rel_err(summed, s) < tol / 4 and rel_err(out, want) < tol
    assert torch.equal(fused.rms_norm(summed, w, 1e-5), out)


@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 16), (6, 3, 24)])
def test_rope_write_kv_reference(heads: int, kv_heads: int, dim: int) -> None:
    c = rope_case(7, heads, kv_heads, dim, torch.float32, seed=2)
    q, qkv, cache = run_rope(fused, c, heads)
    half = dim // 2
    angle = c["pos"].double()[:, None] * c["inv"].double()[None, :]  # [T, D/2]
    x = c["qkv"].double().view(7, heads + 2 * kv_heads, dim)
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = angle.cos()[:, None], angle.sin()[:, None]
    rot = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    want = torch.cat((rot[:, : heads + kv_heads], x[:, heads + kv_heads :]), dim=1)
    assert rel_err(qkv.view_as(want), want) < 1e-6  # q, k rotated in place; v untouched
    assert q.data_ptr() == qkv.data_ptr() and rel_err(q, want[:, :heads]) < 1e-6
    expect = c["cache"].clone()
    for t, slot in enumerate(c["slots"].tolist()):
        if slot >= 0:  # token by token; -1 leaves the cache alone
            kv = want[t, heads:].view(2, kv_heads, dim).float()
            expect[slot // 4, 1, :, slot % 4] = kv
    assert rel_err(cache, expect) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_silu_mul_reference(dtype: torch.dtype) -> None:
    x = torch.randn(3, 2 * 40, generator=_gen(3)).to(dtype)
    g, u = x.double()[:, :40], x.double()[:, 40:]
    want = g / (1 + torch.exp(-g)) * u
    assert rel_err(fused.silu_mul(x), want) < (1e-6 if dtype == torch.float32 else 1e-2)


def test_reference_rejects_wrong_qkv_width() -> None:
    c = rope_case(2, 4, 2, 8, torch.float32, seed=4)
    with pytest.raises(ValueError):
        fused.rope_write_kv(c["qkv"][:, :-8], c["cos"], c["sin"], c["pos"], c["cache"], 0,
                            c["slots"], 4)  # fmt: skip


# ---- Triton bodies, interpreted, against the references ------------------------------------


@pytest.fixture(scope="module")
def interp() -> Iterator[ModuleType]:
    with interpreted("kvrelay.kernels.triton_fused", "_rms_norm_kernel") as module:
        yield module


TOL = {torch.bfloat16: 1e-2, torch.float16: 2e-3, torch.float32: 1e-5}
# Triton's interpreter rounds fp32 -> bf16 toward zero (the GPU rounds to nearest even), so
# bf16 results here are checked to a tolerance; fp16/fp32 casts round as on the GPU, and
# tests/gpu checks bf16 bit for bit where the rounding points are the reference's.
SAME_ROUNDING = {torch.bfloat16: 1e-2, torch.float16: 1e-3, torch.float32: 1e-6}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 200])  # a power of two and a padded row
def test_interp_norms(interp: ModuleType, dtype: torch.dtype, hidden: int) -> None:
    g = _gen(hidden)
    x, res = torch.randn(3, hidden, generator=g).to(dtype), torch.randn(3, hidden, generator=g)
    res = (4 * res).to(dtype)
    w = (1 + 0.1 * torch.randn(hidden, generator=g)).to(dtype)
    got, want = interp.add_rms_norm(x, res, w, 1e-5), fused.add_rms_norm(x, res, w, 1e-5)
    if dtype == torch.bfloat16:
        assert rel_err(got.residual, want.residual.double()) < SAME_ROUNDING[dtype]
    else:
        assert torch.equal(got.residual, want.residual)  # one rounding of an exact fp32 sum
    assert rel_err(got.out, want.out.double()) < TOL[dtype]
    # half the rows strided (a view of a wider buffer): strides are honoured
    wide = torch.randn(3, 2 * hidden, generator=g).to(dtype)
    got1 = interp.rms_norm(wide[:, :hidden], w, 1e-6)
    assert rel_err(got1, fused.rms_norm(wide[:, :hidden], w, 1e-6)) < TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(8, 2, 16), (6, 3, 24)])
def test_interp_rope_write_kv(interp: ModuleType, dtype, heads, kv_heads, dim) -> None:
    c = rope_case(9, heads, kv_heads, dim, dtype, seed=heads * dim)
    q, qkv, cache = run_rope(interp, c, heads)
    rq, rqkv, rcache = run_rope(fused, c, heads)
    assert q.shape == rq.shape and q.data_ptr() == qkv.data_ptr()
    # the same rounding points as the reference: equal but for fp32 FMA contraction
    assert rel_err(qkv, rqkv.double()) < SAME_ROUNDING[dtype]
    slots = c["slots"]
    assert rel_err(written(cache, slots), written(rcache, slots).double()) < SAME_ROUNDING[dtype]
    keep = torch.ones(cache.shape[0], cache.shape[3], dtype=torch.bool)  # [block, offset]
    keep[slots[slots >= 0] // 4, slots[slots >= 0] % 4] = False
    assert torch.equal(cache[:, 1].transpose(1, 2)[keep], c["cache"][:, 1].transpose(1, 2)[keep])
    untouched = c["cache"][:, 0]  # another layer
    assert torch.equal(cache[:, 0], untouched)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_interp_silu_mul(interp: ModuleType, dtype: torch.dtype) -> None:
    x = (3 * torch.randn(4, 2 * 1100, generator=_gen(5))).to(dtype)  # 2 column chunks, ragged
    got = interp.silu_mul(x)
    assert got.shape == (4, 1100) and got.dtype == dtype
    assert rel_err(got, fused.silu_mul(x).double()) < TOL[dtype]


def test_interp_bad_input_raises(interp: ModuleType) -> None:
    c = rope_case(2, 4, 2, 8, torch.float32, seed=6)
    args = (c["cos"], c["sin"], c["pos"], c["cache"])
    with pytest.raises(ValueError):
        interp.rope_write_kv(c["qkv"][:, :-8], *args, 0, c["slots"], 4)
    with pytest.raises(ValueError):
        interp.rope_write_kv(c["qkv"], *args, 2, c["slots"], 4)  # no layer 2
    with pytest.raises(ValueError):
        interp.rope_write_kv(c["qkv"], *args, 0, c["slots"].float(), 4)
    with pytest.raises(ValueError):
        interp.rms_norm(torch.ones(2, 8), torch.ones(7), 1e-5)
    with pytest.raises(ValueError):
        interp.add_rms_norm(torch.ones(2, 8), torch.ones(3, 8), torch.ones(8), 1e-5)
    with pytest.raises(ValueError):
        interp.silu_mul(torch.ones(2, 7))
    assert math.isfinite(float(interp.rms_norm(torch.zeros(1, 8), torch.ones(8), 1e-5).sum()))
