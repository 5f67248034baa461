"""The overlapped engine (``overlap_schedule``: step N+1 scheduled before step N's tokens are read)
against the plain one on the default model: the same tokens and finish reasons, request by
request, with greedy and seeded sampling, repetition penalty, stop tokens, max_tokens, aborts,
preemption by recompute and by swap, prefix caching, a PD handoff, a migration (park, move the
KV, continue) and stop strings; both pools clean after every step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.engine.sequence import PLACEHOLDER
from kvrelay.workers.llm import LLM
from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent
from kvrelay_testing.prompts import chat_prompts

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in three sentences, using simple words and an example.",
    "List five prime numbers.",
    "Who wrote Hamlet?",
    "Describe how a bicycle works, covering the frame, the chain, the gears and the brakes.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
]
Outputs = dict[str, tuple[list[int], FinishReason | None]]


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    torch.manual_seed(0)
    return load_model(None)


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel) -> list[list[int]]:
    return chat_prompts(loaded.tokenizer, QUESTIONS)


def _engine(loaded: LoadedModel, overlap: bool, **kw: object) -> Engine:
    base: dict[str, object] = dict(
        num_blocks=256,
        max_num_batched_tokens=48,
        max_num_seqs=6,
        cpu_num_blocks=0,
        overlap_schedule=overlap,
    )
    base.update(kw)
    engine = Engine(loaded, EngineConfig(**base))  # type: ignore[arg-type]
    assert engine.overlap is overlap
    return engine


def _params(stop_id: int | None = None) -> list[SamplingParams]:
    stop = (stop_id,) if stop_id is not None else ()
    return [
        SamplingParams(max_tokens=14, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.9, top_p=0.9, seed=11),
        SamplingParams(max_tokens=16, temperature=0.0, stop_token_ids=stop, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0.8, top_k=40, seed=5, repetition_penalty=1.3),
        SamplingParams(max_tokens=1, temperature=0.0),
        SamplingParams(max_tokens=14, temperature=0.0),  # may end on EOS
        SamplingParams(max_tokens=10, temperature=1.1, min_p=0.05, seed=3, ignore_eos=True),
        SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.2, ignore_eos=True),
    ]


def _drain(
    engine: Engine, out: Outputs, on_event: Callable[[TokenEvent], None] | None = None
) -> None:
    while engine.has_unfinished():
        for ev in engine.step():
            tokens, reason = out[ev.request_id]
            assert reason is None, f"{ev.request_id} emitted after it finished"
            out[ev.request_id] = (tokens + list(ev.token_ids), ev.finish_reason)
            if on_event is not None:
                on_event(ev)
        engine.check_integrity()


def _generate(
    engine: Engine, prompts: list[list[int]], params: list[SamplingParams], abort_after: int = 0
) -> Outputs:
    """Every prompt at once; ``abort_after`` > 0: request q0 is aborted once it has that many
    tokens (its token in flight, if any, must never show up)."""
    out: Outputs = {}
    for i, (p, sp) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"q{i}", p, sp)
        out[f"q{i}"] = ([], None)

    def abort(ev: TokenEvent) -> None:
        if ev.request_id == "q0" and len(out["q0"][0]) == abort_after and ev.finish_reason is None:
            assert engine.abort("q0")
            out["q0"] = (out["q0"][0], FinishReason.ABORT)

    _drain(engine, out, abort if abort_after else None)
    s = engine.stats()
    assert s.pool.used == 0 and (s.cpu_pool is None or s.cpu_pool.used == 0)
    assert not engine.seqs and not engine.handoffs
    return out


@pytest.fixture(scope="module")
def stop_id(loaded: LoadedModel, prompts: list[list[int]]) -> int:
    """A token request q2 produces mid-way, found by a plain run: a stop token it will hit."""
    ref = _generate(_engine(loaded, False), prompts, _params())
    return ref["q2"][0][4]


@pytest.mark.parametrize(
    "pool",
    [
        {},
        {"num_blocks": 12, "preemption_mode": "recompute"},
        {"num_blocks": 12, "cpu_num_blocks": 256, "preemption_mode": "swap"},
    ],
    ids=["roomy", "recompute", "swap"],
)
def test_overlapped_outputs_equal_the_plain_engine(
    loaded: LoadedModel, prompts: list[list[int]], stop_id: int, pool: dict[str, object]
) -> None:
    params = _params(stop_id)
    plain = _engine(loaded, False, **pool)
    ref = _generate(plain, prompts, params, abort_after=3)
    over = _engine(loaded, True, **pool)
    got = _generate(over, prompts, params, abort_after=3)
    assert got == ref
    assert ref["q2"][1] is FinishReason.STOP and len(ref["q2"][0]) == 5
    assert ref["q0"] == (ref["q0"][0][:3], FinishReason.ABORT) and len(ref["q0"][0]) == 3
    assert len(ref["q4"][0]) == 1 and ref["q4"][1] is FinishReason.LENGTH
    s, p = over.stats(), plain.stats()
    # the stop token and the abort cost thrown-away rows; max_tokens finishes cost none
    assert 0 < s.extra["overlap_discarded_tokens"] <= 2
    assert p.extra["overlap_discarded_tokens"] == 0
    if pool:
        assert s.preemptions > 0 and p.preemptions > 0
        if pool["preemption_mode"] == "swap":
            assert s.swaps_out > 0 and s.recompute_preemptions == 0
        else:
            assert s.recompute_preemptions > 0
    # the engine's token counters count computed rows that were kept: the same work
    assert s.decode_tokens_computed >= sum(len(t) for t, _ in got.values()) - len(got)


def test_prefix_cache_hits_are_the_same(loaded: LoadedModel, prompts: list[list[int]]) -> None:
    params = _params()[:4]
    runs = []
    for overlap in (False, True):
        engine = _engine(loaded, overlap)
        first = _generate(engine, prompts[:4], params)
        hits_before = engine.stats().prefix_hit_tokens
        # the same conversations, one turn on: each prompt is the last one plus its answer
        follow = [p + first[f"q{i}"][0] for i, p in enumerate(prompts[:4])]
        second = _generate(engine, follow, params)
        runs.append((first, second, engine.stats().prefix_hit_tokens - hits_before))
    assert runs[0] == runs[1]
    assert runs[1][2] > 0


def test_handoff_and_migration_through_the_overlapped_engine(
    loaded: LoadedModel, prompts: list[list[int]]
) -> None:
    """PD: an overlapped prefill engine parks prefill-only requests after their first token,
    the KV moves to an overlapped decode engine that continues them. Migration: an overlapped
    engine is settled mid-decode, a request is parked and moved to another. Both equal a plain
    colocated run."""
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.7, seed=21, ignore_eos=True),
    ]
    ref = _generate(_engine(loaded, False), prompts[:2], params)

    def move(src: Engine, dst: Engine, rid: str, output: list[int], computed: int) -> None:
        blocks = src.seqs[rid].block_ids if rid in src.seqs else src.handoffs[rid].block_ids
        n = -(-computed // src.config.block_size)
        got = dst.reserve(n)
        assert got is not None
        dst.kv_cache[got] = src.kv_cache[blocks[:n]]
        seq = src.handoffs[rid]
        dst.add_prefilled(rid, seq.prompt_ids, output, seq.params, got)
        extra = computed - dst.seqs[rid].num_computed
        if extra > 0:
            dst.scheduler.commit_computed(ScheduledSeq(dst.seqs[rid], extra))
        src.finish_handoff(rid)

    # PD handoff
    pre, dec = _engine(loaded, True), _engine(loaded, True)
    out: Outputs = {}
    for i, (p, sp) in enumerate(zip(prompts[:2], params, strict=True)):
        pre.add_request(f"q{i}", p, sp, prefill_only=True)
        out[f"q{i}"] = ([], None)
    _drain(pre, out)
    assert set(pre.handoffs) == {"q0", "q1"}
    assert pre.stats().extra["overlap_discarded_tokens"] == 0  # prefill-only: not run again
    for rid, (tokens, _) in out.items():
        assert len(tokens) == 1
        move(pre, dec, rid, tokens, len(pre.handoffs[rid].prompt_ids))
    _drain(dec, out)
    assert out == ref
    pre.check_integrity()
    assert pre.stats().pool.used == 0 and dec.stats().pool.used == 0

    # migration mid-decode
    src, dst = _engine(loaded, True), _engine(loaded, True)
    out = {}
    for i, (p, sp) in enumerate(zip(prompts[:2], params, strict=True)):
        src.add_request(f"q{i}", p, sp)
        out[f"q{i}"] = ([], None)
    while len(out["q1"][0]) < 5:
        for ev in src.step():
            out[ev.request_id] = (out[ev.request_id][0] + list(ev.token_ids), ev.finish_reason)
    for ev in src.settle():  # what the worker's loop does before a park
        out[ev.request_id] = (out[ev.request_id][0] + list(ev.token_ids), ev.finish_reason)
    seq = src.seqs["q1"]
    assert seq.output_ids == out["q1"][0]  # nothing in flight after settle
    src.scheduler.park(seq)
    del src.seqs["q1"]
    src.handoffs["q1"] = seq
    move(src, dst, "q1", list(seq.output_ids), seq.num_computed)
    _drain(src, out)
    _drain(dst, out)
    assert out == ref
    for e in (src, dst):
        e.check_integrity()
        assert e.stats().pool.used == 0


def test_stop_strings_end_the_same(prompts: list[list[int]]) -> None:
    """A stop string ends a request through an abort from the caller (``RequestText``): the
    token in flight when it aborts must not reach the text."""
    outs = []
    for overlap in (False, True):
        llm = LLM(None, engine_config=EngineConfig(num_blocks=128, overlap_schedule=overlap))
        plain = llm.generate(prompts[:3], SamplingParams(max_tokens=24, temperature=0.0))
        # stop on a word from the middle of each answer
        stops = [c.text.split()[len(c.text.split()) // 2] for c in plain]
        outs.append(
            llm.generate(
                prompts[:3],
                [SamplingParams(max_tokens=24, temperature=0.0, stop=(s,)) for s in stops],
            )
        )
        assert all(c.finish_reason is FinishReason.STOP for c in outs[-1])
        llm.engine.check_integrity()
        assert llm.engine.stats().pool.used == 0
    assert outs[0] == outs[1]


def test_an_aborted_id_reused_while_its_token_is_in_flight(tiny_model_dir: Path) -> None:
    """abort("x") while x's token is on the device, then a new request "x": the new one must
    not take the old one's token as its input (rows are keyed by sequence, not by id)."""
    tiny = load_model(str(tiny_model_dir))
    greedy = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    first, second = list(range(100, 140)), list(range(300, 317))
    plain = _engine(tiny, False)
    plain.add_request("x", second, greedy)
    want: Outputs = {"x": ([], None)}
    _drain(plain, want)
    over = _engine(tiny, True)
    over.add_request("x", first, greedy)
    while not over.step():  # its first token is read one step after it was sampled
        pass
    assert over.has_unfinished() and over.seqs["x"].output_ids[-1] == PLACEHOLDER
    assert over.abort("x")
    over.add_request("x", second, greedy)
    got: Outputs = {"x": ([], None)}
    _drain(over, got)
    assert got == want
    assert over.stats().pool.used == 0
