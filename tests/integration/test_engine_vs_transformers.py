"""The engine against Hugging Face transformers on the same weights (the default model, fp32):
greedy continuations under continuous batching, chunked prefill, prefix caching and preemption;
seeded sampling independent of the batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams
from kvrelay_testing.prompts import chat_prompts

NEW_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis to a child in three sentences, using simple words and an example.",
    "List five prime numbers.",
    "Who wrote Hamlet?",
    "Describe how a bicycle works, covering the frame, the chain, the gears, the brakes, and "
    "why riding it keeps you balanced. Then give two tips for a first long ride in the hills.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 12?",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    torch.manual_seed(0)
    return LLM(None, engine_config=EngineConfig(max_num_batched_tokens=48, num_blocks=256))


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    # a distinct system line per prompt: no two prompts share their first block, so the only
    # prefix hits are the ones a test arranges
    return chat_prompts(llm.tokenizer, QUESTIONS)


@pytest.fixture(scope="module")
def hf_greedy(default_gguf_export: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(default_gguf_export, dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            x = torch.tensor([ids])
            y = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
            outs.append(y[0, len(ids) :].tolist())
    return outs


def _greedy(n: int = NEW_TOKENS) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def test_prompts_exceed_the_chunk(prompts: list[list[int]], llm: LLM) -> None:
    assert max(len(p) for p in prompts) > llm.engine.config.max_num_batched_tokens
    assert len({len(p) for p in prompts}) >= 6


def test_greedy_batch_matches_transformers(
    llm: LLM, prompts: list[list[int]], hf_greedy: list[list[int]]
) -> None:
    llm.engine.pool.clear_cache()
    outs = llm.generate(prompts, _greedy())
    for out, ref in zip(outs, hf_greedy, strict=True):
        assert list(out.token_ids) == ref
    llm.engine.check_integrity()
    assert llm.engine.pool.stats().used == 0


def test_prefix_cache_hits_skip_compute(
    llm: LLM, prompts: list[list[int]], hf_greedy: list[list[int]]
) -> None:
    engine = llm.engine
    engine.pool.clear_cache()
    warm = prompts[::2]  # half the prompts: their KV stays cached after they finish
    llm.generate(warm, _greedy(1))
    before = engine.prompt_tokens_computed
    outs = llm.generate(prompts, _greedy())
    computed = engine.prompt_tokens_computed - before
    bs = engine.config.block_size
    expected_hits = sum(((len(p) - 1) // bs) * bs for p in warm)
    assert computed == sum(len(p) for p in prompts) - expected_hits
    assert sum(o.cached_prompt_tokens for o in outs) == expected_hits
    for out, ref in zip(outs, hf_greedy, strict=True):
        assert list(out.token_ids) == ref


def test_preemption_by_recompute_keeps_outputs(
    prompts: list[list[int]], hf_greedy: list[list[int]], llm: LLM
) -> None:
    # a pool too small for all eight at once forces preemptions
    small = LLM.__new__(LLM)
    small.loaded, small.tokenizer, small._next_id = llm.loaded, llm.tokenizer, 0
    from kvrelay.workers.engine.engine import Engine

    small.engine = Engine(llm.loaded, EngineConfig(
        max_num_batched_tokens=64, num_blocks=24, preemption_mode="recompute"))
    outs = small.generate(prompts, _greedy())
    assert small.engine.scheduler.num_preemptions > 0
    for out, ref in zip(outs, hf_greedy, strict=True):
        assert list(out.token_ids) == ref
    small.engine.check_integrity()


def test_a_sequence_that_outgrows_the_pool_ends_with_length(
    prompts: list[list[int]], hf_greedy: list[list[int]], llm: LLM
) -> None:
    """Prompt + max_tokens larger than the whole pool: the request ends ("length") when it
    holds every block, with the reference's tokens so far, instead of preempting itself and
    waiting forever for blocks that cannot exist."""
    from kvrelay.workers.engine.engine import Engine

    long_i = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    short_i = min(range(len(prompts)), key=lambda i: len(prompts[i]))
    num_blocks = -(-(len(prompts[long_i]) + NEW_TOKENS // 2) // 16)  # room for half the output
    tight = LLM.__new__(LLM)
    tight.loaded, tight.tokenizer, tight._next_id = llm.loaded, llm.tokenizer, 0
    tight.engine = Engine(llm.loaded, EngineConfig(num_blocks=num_blocks, cpu_kv_gb=0.0))
    long_out, short_out = tight.generate([prompts[long_i], prompts[short_i]], _greedy())
    capacity = num_blocks * 16
    assert long_out.finish_reason.value == "length"
    assert len(prompts[long_i]) + len(long_out.token_ids) == capacity < len(prompts[long_i]) + NEW_TOKENS
    assert list(long_out.token_ids) == hf_greedy[long_i][: len(long_out.token_ids)]
    assert list(short_out.token_ids) == hf_greedy[short_i]  # preempted for it, then finished
    assert tight.engine.pool.num_available == num_blocks
    tight.engine.check_integrity()


def test_seeded_sampling_is_independent_of_the_batch(llm: LLM, prompts: list[list[int]]) -> None:
    def seeded(seed: int) -> SamplingParams:
        return SamplingParams(max_tokens=16, temperature=1.3, top_k=200, seed=seed, ignore_eos=True)

    poem = prompts[1]  # an open prompt: sampling really varies
    alone = llm.generate([poem], seeded(1234))[0].token_ids
    other = SamplingParams(max_tokens=16, temperature=1.0, seed=None, ignore_eos=True)
    mixed = llm.generate([prompts[3], poem, prompts[5]], [other, seeded(1234), other])
    assert mixed[1].token_ids == alone
    reordered = llm.generate([poem, prompts[0]], [seeded(1234), other])
    assert reordered[0].token_ids == alone
    assert llm.generate([poem], seeded(99))[0].token_ids != alone


def test_stop_strings_and_max_tokens(llm: LLM, prompts: list[list[int]]) -> None:
    out = llm.generate([prompts[0]], SamplingParams(max_tokens=32, temperature=0, stop=("Paris",)))[
        0
    ]
    assert "Paris" not in out.text and out.finish_reason.value == "stop"
    out = llm.generate([prompts[1]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[
        0
    ]
    assert len(out.token_ids) == 5 and out.finish_reason.value == "length"
