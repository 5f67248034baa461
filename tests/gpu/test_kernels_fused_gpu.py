"""The fused elementwise kernels (kernels/triton_fused.py) against their torch references
(kernels/fused.py) on a CUDA device, at the model shapes (Llama-3.2-1B / 3.1-8B rows, head_dim
64 and 128, a padded head_dim 96 and padded head counts), in a CUDA graph, and the whole model
with Triton ops against the same model forced onto the reference bodies.

On the GPU, casts round to nearest even as torch does, so where the Triton body rounds at the
reference's points the results are equal bit for bit (residual sums, RoPE, the cache writes)
or differ only by the last bit of a transcendental function or a reduction order.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from kvrelay import kernels  # noqa: E402
from kvrelay.kernels import fused, triton_fused, triton_ops  # noqa: E402
from kvrelay.workers.model.config import ModelConfig  # noqa: E402
from kvrelay.workers.model.llama import AttentionMetadata, LlamaModel, kv_cache_shape  # noqa: E402
from kvrelay_testing.kernels import rel_err  # noqa: E402

DEV = "cuda"
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
ULP = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-6}


def _randn(*shape: int, seed: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(*shape, generator=g)).to(DEV, dtype)


def rope_inputs(tokens: int, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    inv = 1.0 / (500000.0 ** (torch.arange(0, dim, 2).float() / dim))
    freqs = torch.outer(torch.arange(4096).float(), inv)
    emb = torch.cat((freqs, freqs), dim=-1).to(DEV)
    bs, blocks = 16, tokens // 8 + 4
    slots = torch.randperm(blocks * bs, generator=g)[:tokens]
    slots[torch.rand(tokens, generator=g) < 0.2] = -1
    qkv = _randn(tokens, (heads + 2 * kv_heads) * dim, seed=seed + 1, dtype=dtype)
    cache = _randn(blocks, 2, 2, bs, kv_heads, dim, seed=seed + 2, dtype=dtype)
    pos = torch.randint(0, 4096, (tokens,), generator=g).to(DEV)
    return qkv, emb.cos(), emb.sin(), pos, cache, slots.to(DEV)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "hidden"), [(1, 2048), (7, 4096), (300, 2048), (3, 200)])
def test_norms(dtype: torch.dtype, tokens: int, hidden: int) -> None:
    x = _randn(tokens, hidden, seed=hidden, dtype=dtype)
    res = _randn(tokens, hidden, seed=hidden + 1, dtype=dtype, scale=8.0)
    w = 1 + _randn(hidden, seed=hidden + 2, dtype=dtype, scale=0.1)
    got, want = triton_ops.add_rms_norm(x, res, w, 1e-5), fused.add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(got.residual, want.residual)
    assert rel_err(got.out, want.out) < ULP[dtype]
    assert rel_err(triton_ops.rms_norm(x, w, 1e-6), fused.rms_norm(x, w, 1e-6)) < ULP[dtype]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    ("tokens", "heads", "kv_heads", "dim"),
    [(1, 32, 8, 64), (17, 32, 8, 128), (300, 12, 2, 96), (5, 28, 4, 128), (4, 16, 16, 64)],
)
def test_rope_write_kv(dtype, tokens: int, heads: int, kv_heads: int, dim: int) -> None:
    qkv, cos, sin, pos, cache, slots = rope_inputs(tokens, heads, kv_heads, dim, dtype, dim)
    got_qkv, got_cache = qkv.clone(), cache.clone()
    q = triton_ops.rope_write_kv(got_qkv, cos, sin, pos, got_cache, 1, slots, heads)
    want_q = fused.rope_write_kv(qkv, cos, sin, pos, cache, 1, slots, heads)
    assert q.shape == want_q.shape and q.data_ptr() == got_qkv.data_ptr()
    # the reference's rounding points, no FMA contraction: bit for bit
    assert torch.equal(got_qkv, qkv) and torch.equal(got_cache, cache)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("tokens", "inter"), [(1, 8192), (37, 14336), (3, 1000)])
def test_silu_mul(dtype: torch.dtype, tokens: int, inter: int) -> None:
    x = _randn(tokens, 2 * inter, seed=inter, dtype=dtype, scale=3.0)
    got = triton_ops.silu_mul(x)
    assert got.shape == (tokens, inter) and got.dtype == dtype
    assert rel_err(got, fused.silu_mul(x)) < ULP[dtype]


def test_dispatch_picks_triton_for_fused_ops() -> None:
    for name in ("rms_norm", "add_rms_norm", "rope_write_kv", "silu_mul"):
        assert getattr(triton_ops, name) is getattr(triton_fused, name)
        assert getattr(kernels, name).__name__ == name


def test_fused_ops_capture_in_a_cuda_graph() -> None:
    """All four ops replayed from a graph on new inputs match eager references: their launches
    read no tensor values on the host."""
    dt = torch.bfloat16
    qkv, cos, sin, pos, cache, slots = rope_inputs(4, 32, 8, 64, dt, 3)
    x, res = _randn(4, 2048, seed=4, dtype=dt), _randn(4, 2048, seed=5, dtype=dt)
    w = 1 + _randn(2048, seed=6, dtype=dt, scale=0.1)
    gate_up = _randn(4, 2 * 512, seed=7, dtype=dt)
    buf = qkv.clone()
    out: dict[str, torch.Tensor] = {}

    def step() -> None:
        buf.copy_(qkv)
        out["q"] = triton_ops.rope_write_kv(buf, cos, sin, pos, cache, 0, slots, 32)
        out["norm"], out["res"] = triton_ops.add_rms_norm(x, res, w, 1e-5)
        out["silu"] = triton_ops.silu_mul(gate_up)

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (10, 20):
        qkv.copy_(_randn(*qkv.shape, seed=seed, dtype=dt))
        pos.copy_(torch.randint(0, 4096, pos.shape, generator=torch.Generator().manual_seed(seed)))
        x.copy_(_randn(*x.shape, seed=seed + 1, dtype=dt))
        gate_up.copy_(_randn(*gate_up.shape, seed=seed + 2, dtype=dt))
        graph.replay()
        want_qkv, want_cache = qkv.clone(), cache.clone()
        fused.rope_write_kv(want_qkv, cos, sin, pos, want_cache, 0, slots, 32)
        assert torch.equal(buf, want_qkv) and torch.equal(cache, want_cache)
        want = fused.add_rms_norm(x, res, w, 1e-5)
        assert torch.equal(out["res"], want.residual) and rel_err(out["norm"], want.out) < 8e-3
        assert rel_err(out["silu"], fused.silu_mul(gate_up)) < 8e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_model_with_fused_kernels_matches_reference_bodies(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A random 4-layer model (head_dim 64, GQA 4, llama3 RoPE scaling), prefill then a decode
    token, with the Triton ops and again forced onto the reference ops."""
    raw = dict(model_type="llama", vocab_size=512, hidden_size=512, intermediate_size=1024,
               num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
               max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=500000.0,
               rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                 high_freq_factor=4.0, original_max_position_embeddings=256),
               tie_word_embeddings=True)  # fmt: skip
    config = ModelConfig.from_hf(raw)
    model = LlamaModel(config, dtype=dtype, device=DEV)
    g = torch.Generator().manual_seed(0)
    for p in model.parameters():
        init = 1 + 0.1 * torch.randn(p.shape, generator=g) if p.dim() == 1 else None
        p.copy_(init if init is not None else 0.05 * torch.randn(p.shape, generator=g))
    ids = torch.randint(0, 512, (301,), generator=g).to(DEV)
    i32 = torch.int32
    tables = torch.arange(32, dtype=i32, device=DEV)[None]
    prefill = AttentionMetadata(torch.arange(300, device=DEV), tables,
                                torch.tensor([300], dtype=i32, device=DEV),
                                torch.tensor([0, 300], dtype=i32, device=DEV), False)  # fmt: skip
    decode = AttentionMetadata(torch.tensor([300], device=DEV), tables,
                               torch.tensor([301], dtype=i32, device=DEV),
                               torch.tensor([0, 1], dtype=i32, device=DEV), True)  # fmt: skip

    def run() -> tuple[torch.Tensor, torch.Tensor]:
        cache = torch.zeros(kv_cache_shape(config, 32, 16), dtype=dtype, device=DEV)
        a = model.compute_logits(model(ids[:300], torch.arange(300, device=DEV), cache, prefill))
        b = model.compute_logits(model(ids[300:], torch.tensor([300], device=DEV), cache, decode))
        return a, b

    fast = run()
    monkeypatch.setenv("KVRELAY_KERNELS", "reference")
    assert kernels._triton_ops() is None
    slow = run()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    for f, s in zip(fast, slow, strict=True):
        assert rel_err(f, s) < tol
    if dtype == torch.float32:
        assert bool((fast[1].argmax(-1) == slow[1].argmax(-1)).all())
