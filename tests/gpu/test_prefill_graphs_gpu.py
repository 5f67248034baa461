"""Prefill graphs (workers/engine/prefill_graphs.py: one graph per token bucket, attention
included) on a GPU: a replayed step equals the same forward run eagerly over the same padded
bucket and metadata bit for bit, and the plain forward within rounding, with the KV cache
written alike and nothing written for padded rows; a step is one replay, one graph launch and
only its staging's few kernel launches; and the engine's greedy tokens are the same with the
graphs on and off (fp32; tests/gpu/test_engine_gpu.py compares them with transformers, graphs
on). The padding logic is also tested on CPU: tests/unit/test_prefill_graphs.py, and the
attention kernel over padded inputs in tests/unit/test_kernels_interpret.py."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.prefill_graphs import PrefillGraphs
from kvrelay.workers.engine.runner import prepare_inputs
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.engine.sequence import Sequence
from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.llm import LLM
from kvrelay.workers.model.llama import kv_cache_shape
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.types import SamplingParams

pytestmark = pytest.mark.gpu

BS, NUM_BLOCKS = 16, 512
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # max |graph - plain| / max |plain|
CUDA = torch.device("cuda")


@pytest.fixture(scope="module", params=[torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def loaded(request: pytest.FixtureRequest, make_gpu_llama: Callable[..., Path]) -> LoadedModel:
    return load_model(make_gpu_llama(seed=4), dtype=request.param, device="cuda")


def random_cache(loaded: LoadedModel) -> torch.Tensor:
    """Stale random data in every block, so a stray write shows."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = kv_cache_shape(loaded.config, NUM_BLOCKS, BS)
    return (torch.randn(shape, generator=gen, device="cuda") * 0.5).to(loaded.model.embed.dtype)


def make_step(rng: random.Random, chunks: list[tuple[int, int]]) -> list[ScheduledSeq]:
    """One item per (context, new): ``context`` tokens already in the cache (its stale data),
    ``new`` computed now; every sequence gets distinct random blocks."""
    free = rng.sample(range(NUM_BLOCKS), NUM_BLOCKS)
    items = []
    for i, (ctx, new) in enumerate(chunks):
        seq = Sequence(f"r{i}", [rng.randrange(3, 512) for _ in range(ctx + new)],
                       SamplingParams(max_tokens=1))  # fmt: skip
        seq.block_ids = [free.pop() for _ in range(-(-(ctx + new) // BS))]
        seq.num_computed = ctx
        items.append(ScheduledSeq(seq, new))
    return items


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max())


STEPS = [
    [(0, 65)],  # just above the smallest bucket
    [(0, 255)],
    [(0, 256)],  # T == bucket
    [(0, 257)],  # just above a bucket
    [(0, 300), (100, 50), (0, 7), (40, 1)],  # fresh prompts, chunks over contexts, a decode row
    [(500, 400)],  # a chunk over a long cached context
    [(0, 1000), (0, 24)],  # 1024: a bucket exactly
    [(0, 130), (0, 129)],  # 259 rows in bucket 512, each sequence over two 128-row tiles
]
MAX_SEQS = [4, 128]  # the 4-sequence step pads no sequence at 4, 124 at 128


@pytest.mark.parametrize("max_seqs", MAX_SEQS)
@pytest.mark.parametrize("chunks", STEPS, ids=[str(sum(n for _, n in s)) for s in STEPS])
def test_replay_matches_eager(
    loaded: LoadedModel, chunks: list[tuple[int, int]], max_seqs: int
) -> None:
    model = loaded.model
    start = random_cache(loaded)
    graph_cache, eager_cache, plain_cache = start.clone(), start.clone(), start.clone()
    graphs = PrefillGraphs(model, graph_cache, max_seqs=max_seqs)
    eager = PrefillGraphs(model, eager_cache, capture=False, max_seqs=max_seqs)
    items = make_step(random.Random(len(chunks)), chunks)
    inputs = prepare_inputs(items, BS, CUDA)
    args = (inputs.input_ids, inputs.positions, inputs.attn)
    captures = GPU_GATE.captures
    got = graphs.run(*args)
    assert got is not None
    got = got.clone()
    # one graph for the bucket, one replay for the step
    assert graphs.replays == 1 and graphs.num_graphs == 1 and GPU_GATE.captures == captures + 1
    same = eager.run(*args)
    assert same is not None and eager.replays == 0
    ref = model(*args[:2], plain_cache, inputs.attn)
    assert torch.equal(got, same), f"replay != eager: {rel_err(got, same)}"
    assert rel_err(got, ref) <= TOL[model.embed.dtype]
    assert torch.equal(graph_cache, eager_cache)
    assert rel_err(graph_cache, plain_cache) <= TOL[model.embed.dtype]
    owned = sorted({b for it in items for b in it.seq.block_ids})
    untouched = torch.ones(NUM_BLOCKS, dtype=torch.bool, device="cuda")
    untouched[owned] = False
    assert torch.equal(graph_cache[untouched], start[untouched])


def test_a_step_of_one_token_per_sequence_runs_eagerly(loaded: LoadedModel) -> None:
    """A step whose every sequence computes one token (a one-token prompt, or decode rows no
    decode graph took) runs eagerly: the prefill kernel has no split-K for a long context."""
    graphs = PrefillGraphs(loaded.model, random_cache(loaded), max_seqs=4)
    for chunks in ([(0, 1)], [(300, 1), (40, 1)]):
        items = make_step(random.Random(1), chunks)
        inputs = prepare_inputs(items, BS, CUDA)
        assert inputs.attn.is_decode
        assert graphs.run(inputs.input_ids, inputs.positions, inputs.attn) is None
    assert graphs.replays == 0 and graphs.num_graphs == 0


def test_stale_rows_of_a_longer_step_write_nothing(loaded: LoadedModel) -> None:
    """Steps of one bucket (512) replaying one graph: 500 tokens of 2 sequences, 263 of 3
    (the padded rows held the first's slots until staging reset them), then 400 of 1 over a
    cached context (the padded sequences held the second's starts, lengths and tables)."""
    model = loaded.model
    start = random_cache(loaded)
    graph_cache, plain_cache = start.clone(), start.clone()
    graphs = PrefillGraphs(model, graph_cache, max_seqs=8)
    rng = random.Random(5)
    steps = ([(0, 300), (0, 200)], [(0, 250), (0, 10), (0, 3)], [(100, 400)])
    for chunks in steps:
        inputs = prepare_inputs(make_step(rng, chunks), BS, CUDA)
        args = (inputs.input_ids, inputs.positions, inputs.attn)
        got = graphs.run(*args)
        assert got is not None and graphs.bucket(inputs.input_ids.shape[0]) == 512
        ref = model(*args[:2], plain_cache, inputs.attn)
        assert rel_err(got, ref) <= TOL[model.embed.dtype]
    assert rel_err(graph_cache, plain_cache) <= TOL[model.embed.dtype]
    assert graphs.num_graphs == 1 and graphs.replays == graphs.steps == len(steps)


def _launches(run: Callable[[], object]) -> tuple[int, int]:
    """(graph launches, kernel launches) the host issued during ``run`` (torch.profiler's
    runtime and driver API events)."""
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    graphs = sum("GraphLaunch" in n for n in names)
    kernels = sum("LaunchKernel" in n for n in names)
    return graphs, kernels


def test_host_launches_drop(loaded: LoadedModel) -> None:
    model, layers = loaded.model, loaded.config.num_layers
    cache = random_cache(loaded)
    graphs = PrefillGraphs(model, cache)
    inputs = prepare_inputs(make_step(random.Random(9), [(0, 700)]), BS, CUDA)
    args = (inputs.input_ids, inputs.positions, inputs.attn)
    replayed = _launches(lambda: graphs.run(*args))
    eager = _launches(lambda: model(*args[:2], cache, inputs.attn))
    assert replayed[0] == 1, (replayed, eager)  # the whole step: one graph
    # replayed: only the staging's fills and strided copies (a few); eager: ~9 a layer
    assert eager[0] == 0 and replayed[1] <= 8 < layers * 4 <= eager[1], (replayed, eager)


def test_engine_tokens_equal_with_graphs_on_and_off(make_gpu_llama: Callable[..., Path]) -> None:
    folder = make_gpu_llama(seed=6)
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 512) for _ in range(n)] for n in (3, 17, 300, 600, 900)]
    params = [SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True) for _ in prompts]

    def run(capture: bool) -> tuple[LLM, list[list[int]]]:
        config = EngineConfig(max_num_seqs=8, max_num_batched_tokens=512, num_blocks=512,
                              capture_graphs=capture, prefill_graphs=capture)  # fmt: skip
        llm = LLM(str(folder), engine_config=config, dtype=torch.float32, device="cuda")
        return llm, [list(o.token_ids) for o in llm.generate(prompts, params)]

    on, ours = run(capture=True)  # every bucket up to 512 captured up front
    prefill = on.engine.runner.prefill
    assert prefill is not None and prefill.num_graphs == 4  # 64, 128, 256, 512
    assert prefill.max_seqs == 8  # the engine's max_num_seqs
    steps = on.engine.runner.prefill_graph_steps
    assert steps > 0 and prefill.replays == prefill.steps == steps  # one replay a step
    off, theirs = run(capture=False)
    assert off.engine.runner.prefill is None and off.engine.runner.graph_steps > 0
    assert ours == theirs
