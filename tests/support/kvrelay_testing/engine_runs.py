"""A short greedy run of the engine on a model folder, for GPU tests that compare one switch's
settings (tests/gpu/test_gemv_gpu.py, test_prefetch_gpu.py): four prompts of mixed lengths,
fp32, small pools, and the decode graphs must have replayed."""

from __future__ import annotations

from pathlib import Path

import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams


def greedy_graph_tokens(folder: Path, device: str = "cuda") -> list[list[int]]:
    """The four requests' greedy token ids (a new engine each call: graphs captured anew)."""
    llm = LLM(
        str(folder),
        engine_config=EngineConfig(max_num_seqs=8, max_num_batched_tokens=64, num_blocks=256),
        dtype=torch.float32,
        device=device,
    )
    prompts = [[(7 * i + 3 * j) % 500 + 3 for j in range(n)] for i, n in enumerate([3, 40, 9, 90])]
    params = [
        SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (24, 16, 30, 8)
    ]
    outs = llm.generate(prompts, params)
    assert llm.engine.runner.graph_steps > 0
    return [list(o.token_ids) for o in outs]
