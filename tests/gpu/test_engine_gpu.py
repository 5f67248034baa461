"""The engine end to end on a GPU against transformers, on a random-weight Llama: greedy
continuations of a ragged batch under continuous batching, chunked prefill and CUDA-graph decode
steps (fp32: token for token; bf16: every token within rounding of transformers' argmax), and
the sampler's device paths (no host sync, the same draws as on CPU)."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.sampler import Sampler, SampleRow
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams

pytestmark = pytest.mark.gpu

PROMPT_LENS = [3, 17, 40, 64, 100, 150, 9]
NEW_TOKENS = [20, 24, 28, 32, 16, 12, 30]  # ragged: the decode batch shrinks step by step


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 512) for _ in range(n)] for n in PROMPT_LENS]


def run_engine(
    folder: Path, dtype: torch.dtype, ps: list[list[int]]
) -> tuple[LLM, list[list[int]]]:
    llm = LLM(
        str(folder),
        engine_config=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, num_blocks=256),
        dtype=dtype,
        device="cuda",
    )
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in NEW_TOKENS]
    outs = llm.generate(ps, params)
    return llm, [list(o.token_ids) for o in outs]


@pytest.fixture(scope="module")
def folder(make_gpu_llama: Callable[..., Path]) -> Path:
    return make_gpu_llama(seed=5)


def hf_model(folder: Path, dtype: torch.dtype) -> Any:
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    return model.cuda().eval()


def test_greedy_fp32_matches_transformers_generate(folder: Path) -> None:
    ps = prompts(0)
    llm, ours = run_engine(folder, torch.float32, ps)
    runner = llm.engine.runner
    assert runner.graph_steps > 0 and runner.eager_steps > 0  # both paths ran
    # prefill steps replayed a prefill graph (on by default on CUDA), one replay a step
    prefill = runner.prefill
    assert prefill is not None and runner.prefill_graph_steps > 0
    assert prefill.replays == prefill.steps == runner.prefill_graph_steps
    hf = hf_model(folder, torch.float32)
    with torch.no_grad():
        for prompt, got, n in zip(ps, ours, NEW_TOKENS, strict=True):
            out = hf.generate(
                torch.tensor([prompt], device="cuda"),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device="cuda"),
                do_sample=False,
                max_new_tokens=n,
                min_new_tokens=n,
                pad_token_id=0,
            )
            assert out[0, len(prompt) :].tolist() == got


def test_greedy_bf16_within_rounding_of_transformers(folder: Path) -> None:
    """bf16 logits tie and near-tie often on a random model, so instead of token equality:
    teacher-force our continuation through transformers and require each of our tokens to be
    within 5% of the row's largest |logit| of transformers' best (a wrong KV or position lands
    several standard deviations below it)."""
    ps = prompts(1)
    llm, ours = run_engine(folder, torch.bfloat16, ps)
    assert llm.engine.runner.graph_steps > 0
    hf = hf_model(folder, torch.bfloat16)
    exact = total = 0
    with torch.no_grad():
        for prompt, got in zip(ps, ours, strict=True):
            ids = torch.tensor([prompt + got], device="cuda")
            logits = hf(ids).logits[0, len(prompt) - 1 : -1].float()  # [n, V]
            chosen = logits.gather(1, torch.tensor(got, device="cuda")[:, None]).squeeze(1)
            best = logits.max(dim=1).values
            margin = 0.05 * logits.abs().max(dim=1).values
            assert bool((chosen >= best - margin).all()), (chosen - best).min().item()
            exact += int((chosen == best).sum())
            total += len(got)
    assert exact >= 0.8 * total


def test_device_sampler_matches_cpu_without_host_sync() -> None:
    gen = torch.Generator().manual_seed(0)
    vocab = 4096
    logits = torch.randn((12, vocab), generator=gen) * 3
    rng = random.Random(0)
    rows = []
    for i in range(12):
        params = SamplingParams(
            temperature=[0.0, 0.7, 1.0, 1.3][i % 4],
            top_k=[0, 50, 0, 400][i % 4],
            top_p=[1.0, 0.9, 0.5, 1.0][i % 4] if i % 3 else 0.95,
            min_p=0.05 if i % 5 == 0 else 0.0,
            repetition_penalty=1.3 if i % 2 else 1.0,
            seed=100 + i,
        )
        rows.append(SampleRow(params, 40 + i, [rng.randrange(vocab) for _ in range(30)]))
    expected = Sampler().sample(logits, rows)
    on_gpu = logits.cuda()
    sampler = Sampler()
    sampler.sample(on_gpu, rows)  # warm-up: first-call allocations
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        tokens = sampler.sample(on_gpu, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert tokens.is_cuda
    assert tokens.cpu().tolist() == expected.tolist()


@pytest.mark.parametrize("decode_batch", [0, 200], ids=["own", "decode_role"])
def test_graphs_captured_up_front(folder: Path, decode_batch: int) -> None:
    """``capture_graphs``: every bucket a step can use (batches up to max_num_seqs, every width)
    is captured when the engine starts, none while it serves, and the tokens stay the same.
    With ``decode_graph_batch`` (a prefill worker that may switch to decode) the decode role's
    batches too: all sizes up to 200."""
    ps = prompts(11)
    _, want = run_engine(folder, torch.float32, ps)
    llm = LLM(
        str(folder),
        engine_config=EngineConfig(
            max_num_seqs=8, max_num_batched_tokens=64, num_blocks=256, capture_graphs=True,
            decode_graph_batch=decode_batch,
        ),
        dtype=torch.float32,
        device="cuda",
    )
    graphs = llm.engine.runner.graphs
    assert graphs is not None
    up_front = graphs.num_graphs
    top = max(8, decode_batch)
    assert up_front == len([s for s in graphs.sizes if s <= top]) * len(graphs.widths) > 0
    assert graphs.max_batch == max(128, top)
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in NEW_TOKENS]
    assert [list(o.token_ids) for o in llm.generate(ps, params)] == want
    assert graphs.num_graphs == up_front and graphs.replays > 0
