"""Piecewise prefill (workers/engine/prefill_graphs.py) run eagerly on CPU: the step padded to
its token bucket, the pieces over static buffers and attention between them, against the plain
forward on a tiny fp32 Llama: the same hidden states and logits, and the same KV cache (padded
rows write nothing), across bucket edges, multi-sequence batches, chunked prefill over a cached
context, a bias model, decode rows and a step past the cap. The captured form needs a GPU:
tests/gpu/test_prefill_graphs_gpu.py."""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay.workers.engine.prefill_graphs import TOKEN_STEP, PrefillGraphs, token_buckets
from kvrelay.workers.engine.runner import ModelRunner, prepare_inputs
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.model.config import ModelConfig
from kvrelay.workers.model.llama import LlamaModel, kv_cache_shape
from kvrelay.workers.types import SamplingParams

BS, NUM_BLOCKS, VOCAB = 16, 256, 97
TOL = 1e-5  # max |piecewise - plain| / max |plain|, fp32


def _model(bias: bool = False, layers: int = 2) -> LlamaModel:
    config = ModelConfig(
        model_type="qwen2" if bias else "llama", vocab_size=VOCAB, hidden_size=32,
        intermediate_size=64, num_layers=layers, num_heads=4, num_kv_heads=2, head_dim=8,
        rms_norm_eps=1e-5, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=4096,
        tie_word_embeddings=False, qkv_bias=bias, o_bias=bias, bos_token_id=None,
        eos_token_ids=(), torch_dtype="float32",
    )  # fmt: skip
    model = LlamaModel(config)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (0.1 if "norm" not in name else 0.05))
            if "norm" in name:
                p.add_(1.0)
    return model


class _Pair:
    """One model, two KV caches: a runner with the plain forward and one piecewise."""

    def __init__(self, model: LlamaModel, max_prefill_tokens: int = 1024) -> None:
        g = torch.Generator().manual_seed(3)
        shape = kv_cache_shape(model.config, NUM_BLOCKS, BS)
        self.plain_cache = torch.randn(shape, generator=g)  # stale data in every block
        self.piece_cache = self.plain_cache.clone()
        self.plain = ModelRunner(model, self.plain_cache, BS, use_prefill_graphs=False)
        self.piece = ModelRunner(
            model, self.piece_cache, BS, use_prefill_graphs=True,
            max_prefill_tokens=max_prefill_tokens,
        )  # fmt: skip
        self.free = random.Random(0).sample(range(NUM_BLOCKS), NUM_BLOCKS)
        self.rng = random.Random(1)

    def seq(self, prompt: int) -> Sequence:
        ids = [self.rng.randrange(VOCAB) for _ in range(prompt)]
        seq = Sequence(f"s{len(self.free)}", ids, SamplingParams(max_tokens=1))
        seq.block_ids = [self.free.pop() for _ in range(-(-prompt // BS))]
        return seq

    def step(self, items: list[ScheduledSeq]) -> torch.Tensor:
        """Both runners' logits of the step (asserted equal), then the chunks marked computed;
        returns the piecewise runner's logits."""
        ours, _ = self.piece.run(items)
        ref, _ = self.plain.run(items)
        assert ours.shape == ref.shape
        if ref.numel():
            err = float((ours - ref).abs().max() / ref.abs().max())
            assert err <= TOL, err
        assert torch.equal(self.piece_cache, self.plain_cache) or _cache_close(
            self.piece_cache, self.plain_cache
        )
        for it in items:
            it.seq.num_computed += it.num_tokens
        return ours


def _cache_close(ours: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal where the plain forward left the stale data (no extra writes), within rounding
    where it wrote (K and V come from the padded matmuls)."""
    return bool(((ours - ref).abs() <= TOL * ref.abs().max()).all())


def test_token_buckets() -> None:
    assert token_buckets(1) == (64, 128, TOKEN_STEP)
    assert token_buckets(512) == (64, 128, 256, 512)
    assert token_buckets(513) == (64, 128, 256, 512, 768)
    with pytest.raises(ValueError):
        token_buckets(0)


@pytest.mark.parametrize("tokens", [1, 7, 64, 65, 128, 129, 255, 256, 257, 512, 700])
def test_one_prompt_equals_the_plain_forward(tokens: int) -> None:
    pair = _Pair(_model())
    seq = pair.seq(tokens)
    pair.step([ScheduledSeq(seq, tokens)])
    assert pair.piece.prefill_graph_steps == 1 and pair.piece.eager_steps == 1


def test_hidden_states_of_every_row() -> None:
    """The piecewise hidden states of all T rows (not only the sampled ones)."""
    model = _model()
    pair = _Pair(model)
    seqs = [pair.seq(n) for n in (100, 57, 201)]
    items = [ScheduledSeq(s, s.num_tokens) for s in seqs]
    inputs = prepare_inputs(items, BS, torch.device("cpu"))
    ref = model(inputs.input_ids, inputs.positions, pair.plain_cache, inputs.attn)
    graphs = PrefillGraphs(model, pair.piece_cache, capture=False)
    ours = graphs.run(inputs.input_ids, inputs.positions, inputs.attn)
    assert ours is not None and ours.shape == ref.shape == (358, 32)
    assert float((ours - ref).abs().max() / ref.abs().max()) <= TOL
    assert _cache_close(pair.piece_cache, pair.plain_cache)
    assert graphs.steps == 1 and graphs.replays == 0  # eager pieces: nothing replayed


def test_multi_sequence_chunked_prefill_over_a_cached_context() -> None:
    """Chunks over contexts already in the cache, batched with fresh prompts and decode rows;
    a longer step then a shorter one in the same bucket (the shorter one's padded rows hold the
    longer one's slots until staging resets them: a stray write would show in the cache)."""
    pair = _Pair(_model())
    a, b, c = pair.seq(900), pair.seq(300), pair.seq(40)
    pair.step([ScheduledSeq(a, 300), ScheduledSeq(b, 200)])  # 500 rows: bucket 512
    pair.step([ScheduledSeq(a, 250), ScheduledSeq(b, 10), ScheduledSeq(c, 3)])  # 263: 512
    pair.step([ScheduledSeq(a, 350), ScheduledSeq(b, 90), ScheduledSeq(c, 37)])  # 477, samples
    d = pair.seq(5)
    d.output_ids = [1]  # a decode row next to a chunk
    d.num_computed = 0
    pair.step([ScheduledSeq(d, 5)])
    pair.step([ScheduledSeq(d, 1), ScheduledSeq(pair.seq(30), 30)])
    assert pair.piece.prefill_graph_steps == 5


def test_pure_decode_step_and_bias_model() -> None:
    """A pure decode step on CPU (no decode graphs) goes through the pieces with decode
    attention; q/k/v and o biases are inside the pieces."""
    pair = _Pair(_model(bias=True, layers=3))
    seqs = [pair.seq(n) for n in (20, 33)]
    pair.step([ScheduledSeq(s, s.num_tokens - 1) for s in seqs])
    pair.step([ScheduledSeq(s, 1) for s in seqs])
    assert pair.piece.prefill_graph_steps == 2


def test_past_the_cap_runs_eagerly() -> None:
    pair = _Pair(_model(), max_prefill_tokens=256)
    pair.step([ScheduledSeq(pair.seq(300), 300)])
    assert pair.piece.prefill_graph_steps == 0 and pair.piece.eager_steps == 1
    pair.step([ScheduledSeq(pair.seq(200), 200)])
    assert pair.piece.prefill_graph_steps == 1


def test_capture_needs_a_cuda_cache() -> None:
    model = _model()
    cache = torch.zeros(kv_cache_shape(model.config, 4, BS))
    with pytest.raises(ValueError):
        PrefillGraphs(model, cache, capture=True)
    with pytest.raises(ValueError):
        PrefillGraphs(model, cache, capture=False).capture(256)
