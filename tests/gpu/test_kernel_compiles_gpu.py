"""Triton compiles counted for real (workers/engine/kernel_compiles.py), and whether an engine
whose graphs were captured at start still compiles kernels while it serves: each such compile
stalls a serving step (the semi-PD decode lane's 951 ms ``forward`` on the 2026-12-07 H100)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from kvrelay.workers.engine.kernel_compiles import COMPILES, PHASE
from kvrelay.workers.engine.phase_times import PhaseTimes

pytestmark = pytest.mark.gpu


@triton.jit
def _add_one(x_ptr, n, BLOCK: tl.constexpr):  # a kernel no other test launches
    offs = tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1, mask=mask)


def test_a_new_specialization_is_one_compile() -> None:
    """``n`` is specialized on being a multiple of 16 or not: one compile per class seen."""
    sink = PhaseTimes()
    assert COMPILES.install(sink)
    x = torch.zeros(64, device="cuda")
    before = COMPILES.count
    counts = []
    for n in (17, 19, 32, 48, 23):
        _add_one[(1,)](x, n, BLOCK=64)
        counts.append(COMPILES.count - before)
    torch.cuda.synchronize()
    assert counts == [1, 1, 2, 2, 2]
    assert {c.kernel for c in COMPILES.recent()[-2:]} == {"_add_one"}
    assert sink.summary()[PHASE]["count"] == 2
    assert x[0].item() == 5


_SERVE = """
import json, random, sys, torch
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.kernel_compiles import COMPILES
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams
COMPILES.install()
llm = LLM(sys.argv[1], engine_config=EngineConfig(max_num_seqs=144, max_num_batched_tokens=256,
          num_blocks=1024, capture_graphs=True), dtype=torch.bfloat16, device="cuda")
start = COMPILES.count
COMPILES.serving()
runner = llm.engine.runner
runner.stalls = stalls = PhaseTimes()  # as a serving worker's (workers/worker.py)
top = runner.graphs.sizes[-1]  # the engine's graphs hold every batch it admits: 144
import kvrelay.kernels as K
eager_rows = []  # the row counts of eager decode launches (a graph replay calls no Python)
plain = K.paged_decode_attention
def spy(q, *args):
    eager_rows.append(q.shape[0])
    return plain(q, *args)
K.paged_decode_attention = spy
rng = random.Random(0)
for wave in range(6):  # batches of 1..16 rows, prompts of 1..700 tokens, ragged outputs
    n = rng.choice([1, 2, 3, 5, 8, 13, 16])
    ps = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 700))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, 40), temperature=0.0, ignore_eos=True)
              for _ in ps]
    llm.generate(ps, params)
def wide():  # 140 rows of decode
    ps = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 6))] for _ in range(140)]
    llm.generate(ps, [SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True) for _ in ps])
wide()  # replayed by the 144-row graphs
graphed_rows = max(eager_rows, default=0)
# past the largest graph decode steps run eagerly (a semi-PD decode lane adopting more than its
# graphs hold): the eager step's kernels must be the ones the graphs' capture compiled (the
# 2026-12-07 H200's semi-PD decode lane compiled the decode kernel for 500 ms at its first batch
# of more than 128, at 144 req/s). The 144 bucket is dropped to get there.
runner.graphs.sizes = runner.graphs.sizes[:-1]
wide()
late = [c for c in COMPILES.recent() if c.serving]
print(json.dumps({"start": start, "serving": COMPILES.serving_count, "eager_rows": max(eager_rows, default=0),
                  "top": top, "graphed_rows": graphed_rows, "stalls": stalls.summary(),
                  "late": [[c.kernel, round(c.seconds * 1e3, 1), c.signature] for c in late]}))
"""


def test_an_engine_with_graphs_captured_compiles_nothing_while_serving(
    make_gpu_llama: Callable[..., Path],
) -> None:
    """In its own process (this one has compiled kernels for other tests already): start-up
    compiles, then a served mix of batch sizes and prompt lengths compiles nothing."""
    folder = make_gpu_llama(seed=9, dtype=torch.bfloat16)
    env = {**os.environ, "PYTHONSAFEPATH": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _SERVE, str(folder)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["start"] > 0  # the hooks saw the start-up compiles
    assert out["eager_rows"] > 128  # decode steps past the largest graph ran eagerly
    assert out["serving"] == 0, "compiled while serving:\n" + "\n".join(map(str, out["late"]))
    assert out["top"] == 144  # decode graphs for every batch the engine admits
    assert out["graphed_rows"] == 0  # every decode step replayed a graph, 140 rows too
    stalls = out["stalls"]
    assert "graph_capture" not in stalls  # every bucket captured at start
    assert stalls["eager_decode"]["count"] > 0
