"""Prefill graphs' forward (workers/engine/prefill_graphs.py) run eagerly on CPU: the step padded
to its token bucket and to ``max_seqs`` sequences, the model over static buffers with attention
over the padded metadata, against the plain forward on a tiny fp32 Llama: the same hidden states
and logits, and the same KV cache (padded rows write nothing), across bucket edges,
multi-sequence batches below and at ``max_seqs``, chunked prefill over a cached context, a bias
model, decode rows and a step past the cap; what attention receives is checked against the
padding rules step by step. Graph sets (``use_set``) keep their own graphs and failed captures,
with stand-in graphs that replay the padded forward. The Triton kernel over the same padding runs
interpreted in tests/unit/test_kernels_interpret.py; the captured form needs a GPU:
tests/gpu/test_prefill_graphs_gpu.py (a set captured on an SM share's stream:
tests/gpu/test_semi_pd_gpu.py)."""

from __future__ import annotations

import random

import pytest
import torch

from kvrelay import kernels
from kvrelay.kernels import reference
from kvrelay.workers.engine.cuda_graphs import MAX_CAPTURE_FAILURES
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.engine.prefill_graphs import TOKEN_STEP, PrefillGraphs, token_buckets
from kvrelay.workers.engine.runner import EAGER_DECODE, LATE_CAPTURE, ModelRunner, prepare_inputs
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.model.llama import AttentionMetadata, LlamaModel, kv_cache_shape
from kvrelay.workers.types import SamplingParams
from kvrelay_testing.tiny_llama import VOCAB, tiny_llama

BS, NUM_BLOCKS = 16, 256
TOL = 1e-5  # max |graph path - plain| / max |plain|, fp32


class _Pair:
    """One model, two KV caches: a runner with the plain forward and one with prefill graphs."""

    def __init__(
        self, model: LlamaModel, max_prefill_tokens: int = 1024, max_prefill_seqs: int = 8
    ) -> None:
        g = torch.Generator().manual_seed(3)
        shape = kv_cache_shape(model.config, NUM_BLOCKS, BS)
        self.plain_cache = torch.randn(shape, generator=g)  # stale data in every block
        self.graph_cache = self.plain_cache.clone()
        self.plain = ModelRunner(model, self.plain_cache, BS, use_prefill_graphs=False)
        self.graph = ModelRunner(
            model, self.graph_cache, BS, use_prefill_graphs=True,
            max_prefill_tokens=max_prefill_tokens, max_prefill_seqs=max_prefill_seqs,
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
        returns the graph-path runner's logits."""
        ours, _ = self.graph.run(items)
        ref, _ = self.plain.run(items)
        assert ours.shape == ref.shape
        if ref.numel():
            err = float((ours - ref).abs().max() / ref.abs().max())
            assert err <= TOL, err
        assert torch.equal(self.graph_cache, self.plain_cache) or _cache_close(
            self.graph_cache, self.plain_cache
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
    pair = _Pair(tiny_llama())
    seq = pair.seq(tokens)
    pair.step([ScheduledSeq(seq, tokens)])
    # a one-token prompt is a pure decode step (T == B): eager, as a step no decode graph took
    assert pair.graph.prefill_graph_steps == (tokens > 1) and pair.graph.eager_steps == 1


def test_hidden_states_of_every_row() -> None:
    """The hidden states of all T rows (not only the sampled ones)."""
    model = tiny_llama()
    pair = _Pair(model)
    seqs = [pair.seq(n) for n in (100, 57, 201)]
    items = [ScheduledSeq(s, s.num_tokens) for s in seqs]
    inputs = prepare_inputs(items, BS, torch.device("cpu"))
    ref = model(inputs.input_ids, inputs.positions, pair.plain_cache, inputs.attn)
    graphs = PrefillGraphs(model, pair.graph_cache, capture=False)
    ours = graphs.run(inputs.input_ids, inputs.positions, inputs.attn)
    assert ours is not None and ours.shape == ref.shape == (358, 32)
    assert float((ours - ref).abs().max() / ref.abs().max()) <= TOL
    assert _cache_close(pair.graph_cache, pair.plain_cache)
    assert graphs.steps == 1 and graphs.replays == 0  # eager: nothing replayed


@pytest.mark.parametrize("max_seqs", [3, 8])
def test_multi_sequence_chunked_prefill_over_a_cached_context(max_seqs: int) -> None:
    """Chunks over contexts already in the cache, batched with fresh prompts and decode rows;
    a longer step then a shorter one in the same bucket (the shorter one's padded rows hold the
    longer one's slots until staging resets them: a stray write would show in the cache). At
    ``max_seqs`` 3 the three-sequence steps pad no sequence, the others one or two."""
    pair = _Pair(tiny_llama(), max_prefill_seqs=max_seqs)
    a, b, c = pair.seq(900), pair.seq(300), pair.seq(40)
    pair.step([ScheduledSeq(a, 300), ScheduledSeq(b, 200)])  # 500 rows: bucket 512
    pair.step([ScheduledSeq(a, 250), ScheduledSeq(b, 10), ScheduledSeq(c, 3)])  # 263: 512
    pair.step([ScheduledSeq(a, 350), ScheduledSeq(b, 90), ScheduledSeq(c, 37)])  # 477, samples
    d = pair.seq(5)
    d.output_ids = [1]  # a decode row next to a chunk
    d.num_computed = 0
    pair.step([ScheduledSeq(d, 5)])
    pair.step([ScheduledSeq(d, 1), ScheduledSeq(pair.seq(30), 30)])
    assert pair.graph.prefill_graph_steps == 5


def test_pure_decode_step_and_bias_model() -> None:
    """A pure decode step that no decode graph took (CPU has none) runs eagerly, with the
    decode kernel's split of a long context, and equals the plain forward after a padded
    prefill step; q/k/v and o biases are in the forward."""
    pair = _Pair(tiny_llama(bias=True, layers=3))
    seqs = [pair.seq(n) for n in (20, 33)]
    pair.step([ScheduledSeq(s, s.num_tokens - 1) for s in seqs])
    pair.step([ScheduledSeq(s, 1) for s in seqs])
    assert pair.graph.prefill_graph_steps == 1 and pair.graph.eager_steps == 2


class _PaddedAttention:
    """Stands in for ``kernels.paged_prefill_attention``: a call with ``out`` (the graph path)
    has its padded metadata and live sequence count checked against the step's real metadata
    (``expect``) before the reference runs it; the plain forward's calls (no ``out``) go
    straight to the reference."""

    def __init__(self, graphs: PrefillGraphs) -> None:
        self.graphs = graphs
        self.expect: AttentionMetadata | None = None
        self.calls = 0

    def __call__(self, q: torch.Tensor, cache: torch.Tensor, layer: int, tables: torch.Tensor,
                 starts: torch.Tensor, ctx: torch.Tensor, scale: float,
                 out: torch.Tensor | None = None,
                 live_seqs: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        assert (out is None) == (live_seqs is None)  # the graph path passes both
        if out is not None:
            attn, g = self.expect, self.graphs
            assert attn is not None
            tokens, seqs = int(attn.query_start_loc[-1]), attn.context_lens.shape[0]
            width = attn.block_tables.shape[1]
            # fixed shapes: the bucket's rows, max_seqs sequences, the widest table
            assert q.shape[0] == out.shape[0] == g.bucket(tokens)
            assert tables.shape == (g.max_seqs, g.max_blocks)
            assert starts.shape == (g.max_seqs + 1,) and ctx.shape == (g.max_seqs,)
            assert torch.equal(starts[: seqs + 1], attn.query_start_loc)
            assert bool((starts[seqs + 1 :] == tokens).all())  # padded sequences own no rows
            assert torch.equal(ctx[:seqs], attn.context_lens) and not ctx[seqs:].any()
            assert torch.equal(tables[:seqs, :width], attn.block_tables)
            assert live_seqs is not None and live_seqs.tolist() == [seqs]  # the kernel's bound
            self.calls += 1
        return reference.paged_prefill_attention(
            q, cache, layer, tables, starts, ctx, scale, out=out, live_seqs=live_seqs
        )


def test_attention_gets_the_step_padded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steps with more, then fewer sequences, wider then narrower tables, in one bucket and
    then in a larger one: attention sees each step's own metadata padded (nothing stale of the
    step before), and the results stay those of the plain forward."""
    model = tiny_llama()
    pair = _Pair(model, max_prefill_seqs=6)
    graphs = pair.graph.prefill
    assert graphs is not None and graphs.max_blocks == min(NUM_BLOCKS, 4096 // BS)
    spy = _PaddedAttention(graphs)
    monkeypatch.setattr(kernels, "paged_prefill_attention", spy)
    original = graphs.run

    def run(ids: torch.Tensor, pos: torch.Tensor, attn: AttentionMetadata) -> torch.Tensor | None:
        spy.expect = attn
        return original(ids, pos, attn)

    monkeypatch.setattr(graphs, "run", run)
    a, b, c, d, e = (pair.seq(n) for n in (400, 150, 90, 33, 7))
    steps = [
        [ScheduledSeq(a, 200), ScheduledSeq(b, 100), ScheduledSeq(c, 90), ScheduledSeq(d, 20),
         ScheduledSeq(e, 7)],  # 417 rows, 5 sequences: bucket 512, one padded sequence
        [ScheduledSeq(b, 50), ScheduledSeq(d, 13)],  # 63 over cached prefixes: bucket 64
        [ScheduledSeq(a, 200)],  # 200 over a 200-token prefix, the widest table: bucket 256
    ]  # fmt: skip
    for items in steps:
        pair.step(items)
    layers = model.config.num_layers
    assert spy.calls == len(steps) * layers and graphs.steps == len(steps)


class _Sparse:
    def __init__(self, prefill: bool) -> None:
        self.prefill_handled = prefill

    def handles(self, is_decode: bool) -> bool:
        return self.prefill_handled and not is_decode


def test_steps_the_buffers_cannot_hold_run_eagerly() -> None:
    """More sequences than ``max_seqs``, a table wider than the widest, or sparse attention
    that handles the step: None (the runner then runs the plain forward)."""
    model = tiny_llama()
    pair = _Pair(model, max_prefill_seqs=2)
    seqs = [pair.seq(n) for n in (30, 20, 10)]
    graphs = PrefillGraphs(model, pair.graph_cache.clone(), capture=False, max_seqs=2)
    three = prepare_inputs([ScheduledSeq(s, s.num_tokens) for s in seqs], BS, torch.device("cpu"))
    assert graphs.run(three.input_ids, three.positions, three.attn) is None
    two = prepare_inputs([ScheduledSeq(s, s.num_tokens) for s in seqs[:2]], BS, torch.device("cpu"))
    attn = two.attn
    wide = torch.zeros((2, graphs.max_blocks + 1), dtype=torch.int32)
    wide[:, : attn.block_tables.shape[1]] = attn.block_tables
    too_wide = AttentionMetadata(attn.slot_mapping, wide, attn.context_lens,
                                 attn.query_start_loc, attn.is_decode)  # fmt: skip
    assert graphs.run(two.input_ids, two.positions, too_wide) is None
    attn.sparse = _Sparse(prefill=True)
    assert graphs.run(two.input_ids, two.positions, attn) is None
    attn.sparse = _Sparse(prefill=False)  # sparse decode only: a prefill step stays dense
    assert graphs.run(two.input_ids, two.positions, attn) is not None
    assert graphs.steps == 1
    pair.step([ScheduledSeq(s, s.num_tokens) for s in seqs])  # through the runner: eager
    assert pair.graph.prefill_graph_steps == 0 and pair.graph.eager_steps == 1


def test_past_the_cap_runs_eagerly() -> None:
    pair = _Pair(tiny_llama(), max_prefill_tokens=256)
    pair.step([ScheduledSeq(pair.seq(300), 300)])
    assert pair.graph.prefill_graph_steps == 0 and pair.graph.eager_steps == 1
    pair.step([ScheduledSeq(pair.seq(200), 200)])
    assert pair.graph.prefill_graph_steps == 1


def test_capture_needs_a_cuda_cache() -> None:
    model = tiny_llama()
    cache = torch.zeros(kv_cache_shape(model.config, 4, BS))
    with pytest.raises(ValueError):
        PrefillGraphs(model, cache, capture=True)
    with pytest.raises(ValueError):
        PrefillGraphs(model, cache, capture=False).capture(256)


class _StandIn:
    """A captured graph on CPU: its replay runs the bucket's padded forward and is logged with
    the set that captured it."""

    def __init__(self, graphs: PrefillGraphs, size: int, log: list[tuple[object, int]]) -> None:
        self.graphs, self.size, self.key, self.log = graphs, size, graphs.set_key, log

    def replay(self) -> None:
        self.log.append((self.key, self.size))
        self.graphs._forward(self.size)


def test_graph_sets_keep_their_own_graphs_and_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each set captures its own bucket graphs on first use and replays only those; a switch
    back finds its graphs and its failed-capture counts as they were; ``num_graphs`` counts
    every set. Captures are stood in for (``capture`` puts a graph into the current set)."""
    model = tiny_llama()
    pair = _Pair(model)
    graphs = PrefillGraphs(model, pair.graph_cache, capture=False)
    assert graphs.set_key is None and graphs.num_graphs == 0
    replayed: list[tuple[object, int]] = []
    captures: list[tuple[object, int]] = []
    failing = {"c"}  # sets whose captures fail

    def capture(size: int) -> None:
        captures.append((graphs.set_key, size))
        if graphs.set_key in failing:
            raise RuntimeError("capture failed")
        graphs._graphs[size] = _StandIn(graphs, size, replayed)  # type: ignore[assignment]

    monkeypatch.setattr(graphs, "capture", capture)
    graphs.capture_graphs = True
    seq = pair.seq(100)  # bucket 128
    inputs = prepare_inputs([ScheduledSeq(seq, 100)], BS, torch.device("cpu"))
    ref = model(inputs.input_ids, inputs.positions, pair.plain_cache, inputs.attn)

    def step() -> torch.Tensor | None:
        return graphs.run(inputs.input_ids, inputs.positions, inputs.attn)

    for key in ("a", "b", "a", "b"):
        graphs.use_set(key, None)
        out = step()
        assert out is not None and float((out - ref).abs().max() / ref.abs().max()) <= TOL
    assert captures == [("a", 128), ("b", 128)]  # one capture per set, none on a switch back
    assert replayed == [("a", 128), ("b", 128), ("a", 128), ("b", 128)]
    assert graphs.num_graphs == 2 and graphs.replays == 4 and graphs.set_key == "b"

    graphs.use_set("c", None)
    for _ in range(MAX_CAPTURE_FAILURES + 2):
        assert step() is None  # the runner runs it eagerly
    assert captures[2:] == [("c", 128)] * MAX_CAPTURE_FAILURES  # then no more tries
    assert graphs.capture_failures == {128: MAX_CAPTURE_FAILURES}
    graphs.use_set("a", None)  # another set's failures are not this one's
    assert graphs.capture_failures == {} and step() is not None
    assert replayed[-1] == ("a", 128) and len(captures) == 2 + MAX_CAPTURE_FAILURES
    graphs.use_set("c", None)
    assert graphs.capture_failures == {128: MAX_CAPTURE_FAILURES} and step() is None
    assert graphs.num_graphs == 2 and graphs.steps == 5


def test_eager_sets_only_keep_their_key() -> None:
    """Without capture a set switch changes the key and nothing of the eager path."""
    pair = _Pair(tiny_llama())
    graphs = pair.graph.prefill
    assert graphs is not None and not graphs.capture_graphs
    seq = pair.seq(300)
    pair.step([ScheduledSeq(seq, 150)])
    graphs.use_set(30, None)
    pair.step([ScheduledSeq(seq, 150)])
    assert graphs.set_key == 30 and graphs.num_graphs == 0 and graphs.capture_failures == {}
    assert pair.graph.prefill_graph_steps == 2 and graphs.replays == 0


def test_stalls_count_eager_decode_steps_and_late_captures(monkeypatch: pytest.MonkeyPatch) -> None:
    """A serving worker's ``stalls`` (runner.py): every pure decode step that no graph ran is
    an ``eager_decode`` (no decode graphs on CPU: each one), a prefill step is not; a prefill
    bucket captured on first use is a ``graph_capture``, its replay afterwards is not. Without
    ``stalls`` the counters still count."""
    pair = _Pair(tiny_llama())
    runner = pair.graph
    graphs = runner.prefill
    assert graphs is not None and runner.graphs is None  # CPU: no decode graphs
    replayed: list[tuple[object, int]] = []

    def capture(size: int) -> None:
        graphs._graphs[size] = _StandIn(graphs, size, replayed)  # type: ignore[assignment]

    monkeypatch.setattr(graphs, "capture", capture)
    graphs.capture_graphs = True
    stalls = PhaseTimes()
    runner.stalls = stalls
    a, b, c = pair.seq(100), pair.seq(90), pair.seq(110)
    pair.step([ScheduledSeq(a, 100)])  # bucket 128 captured now: a late capture
    pair.step([ScheduledSeq(b, 90)])  # replayed: nothing
    summary = stalls.summary()
    assert set(summary) == {LATE_CAPTURE} and summary[LATE_CAPTURE]["count"] == 1
    assert replayed == [(None, 128), (None, 128)]

    def decode(*seqs: Sequence) -> None:
        for seq in seqs:
            seq.output_ids.append(5)  # the token the step before sampled
        pair.step([ScheduledSeq(seq, 1) for seq in seqs])

    decode(a, b)  # pure decode, no graph: eager
    pair.step([ScheduledSeq(c, 110)])  # bucket 128 again
    decode(a)
    summary = stalls.summary()
    assert summary[EAGER_DECODE]["count"] == 2 and summary[LATE_CAPTURE]["count"] == 1
    assert runner.eager_decode_steps == 2 and runner.max_decode_rows == 2
    runner.stalls = None
    decode(b)
    assert stalls.summary()[EAGER_DECODE]["count"] == 2 and runner.eager_decode_steps == 3
