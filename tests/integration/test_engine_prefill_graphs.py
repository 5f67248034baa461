"""The engine with prefill graphs (workers/engine/prefill_graphs.py; on CPU their forward runs
eagerly over the padded buckets and metadata, at most ``max_num_seqs`` = 4 sequences) against
the plain forward, on the default model (fp32): the same greedy continuations under continuous
batching, chunked prefill over cached contexts, mixed decode + prefill steps and two prompts
sharing a prefix, every step taken on the graph path."""

from __future__ import annotations

import pytest
import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams

PROMPT_LENS = [5, 63, 65, 130, 300]


def _run(prefill_graphs: bool) -> tuple[LLM, list[list[int]]]:
    torch.manual_seed(0)
    config = EngineConfig(max_num_batched_tokens=300, num_blocks=256, max_num_seqs=4,
                          prefill_graphs=prefill_graphs)  # fmt: skip
    llm = LLM(None, engine_config=config)
    g = torch.Generator().manual_seed(1)
    shared = torch.randint(10, 20000, (48,), generator=g).tolist()  # a prefix two prompts share
    prompts = [
        (shared if n > 100 and n < 400 else [])
        + torch.randint(10, 20000, (n,), generator=g).tolist()
        for n in PROMPT_LENS
    ]
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True) for _ in prompts]
    return llm, [list(o.token_ids) for o in llm.generate(prompts, params)]


@pytest.fixture(scope="module")
def plain() -> list[list[int]]:
    llm, tokens = _run(prefill_graphs=False)
    assert llm.engine.runner.prefill is None
    return tokens


def test_greedy_tokens_equal_the_plain_forward(plain: list[list[int]]) -> None:
    llm, tokens = _run(prefill_graphs=True)
    runner = llm.engine.runner
    assert runner.prefill is not None and not runner.prefill.capture_graphs  # CPU: eager
    assert runner.prefill.max_seqs == 4  # the engine's max_num_seqs
    # every step with a prompt chunk runs on the graph path (none exceeds the 300-token budget,
    # under the cap); pure decode steps run eagerly on CPU (no decode graphs)
    assert 0 < runner.prefill_graph_steps < runner.eager_steps
    assert tokens == plain
