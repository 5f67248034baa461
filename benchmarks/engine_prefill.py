"""Issue 17's prefill at 1k as the engine runs it: back-to-back 1024-token prompts through
``Engine.step``, one prompt a step, against the matmul limit.

    python benchmarks/engine_prefill.py [--out DIR]                      # GPU: 1B shape, bf16
    python benchmarks/engine_prefill.py --device cpu --shape tiny        # CPU: plumbing only

``gpu_bench.py --prefill-only`` times one ``ModelRunner.run`` between two host syncs: the host's
staging of the step (~0.7 ms on the H100 at 1k) runs while the GPU waits, so it counts against
the step. An engine serving a queue of prompts does not sync between prefill steps (the
overlapped scheduler prepares step N+1 while step N runs; a step's sampled token stays on the
device and the host reads it one step later), so the host's work hides behind the device's when
it is the shorter. This times that: ``--steps`` steps a window, the windows of the overlapped
engine and the plain one alternating (drift hits both alike), median window and spread.

Counters checked: the engine's ``prompt_tokens_computed`` must grow by ``steps x prompt`` in
each window (one whole prompt a step, nothing else computed), and the runner's prefill-graph
step count says whether the steps replayed graphs. Limit = prefill_flops (gpu_models: 2 x matmul
params x T + causal attention + one LM-head row) / the bf16 matmul rate measured here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kvrelay.benchmarks.gpu_models import SHAPES, VOCAB, ceilings, hf_config, prefill_flops
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.config import ModelConfig
from kvrelay.workers.model.llama import LlamaModel
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.types import SamplingParams

TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
ONE = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)


def build(shape: dict[str, Any], dtype: torch.dtype, device: str) -> tuple[LlamaModel, ModelConfig]:
    """Random weights (N(0, 0.02)) of the shape; ours only, no transformers copy."""
    config = ModelConfig.from_hf(hf_config(shape).to_dict())
    torch.manual_seed(0)
    model = LlamaModel(config, dtype=dtype, device=device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return model.eval(), config


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--shape", default="1b", choices=["1b", "8b", "tiny"])
    ap.add_argument("--prompt", type=int, default=1024, help="tokens a prompt = tokens a step")
    ap.add_argument("--steps", type=int, default=20, help="steps a timed window")
    ap.add_argument("--windows", type=int, default=5)
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    shape = TINY if args.shape == "tiny" else SHAPES[args.shape]
    model, config = build(shape, dtype, args.device)
    rate = ceilings()[1] if cuda else float("nan")  # TFLOP/s
    limit_ms = prefill_flops(model, config, args.prompt) / rate / 1e9
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"# engine_prefill: {name} | {args.shape} {dtype} | prompt {args.prompt} tokens a step "
          f"| matmul {rate:.0f} TFLOP/s, limit {limit_ms:.3f} ms a step")  # fmt: skip
    tok = SimpleNamespace(eos_token_ids=())
    loaded = LoadedModel(config, model, tok, "bench", "random")  # type: ignore[arg-type]
    per_window = args.steps + 2  # two spare prompts: the window never runs dry
    total = args.windows * per_window + 4
    blocks = total * -(-(args.prompt + 1) // 16) + 16
    engines: dict[bool, Engine] = {}
    g = torch.Generator().manual_seed(1)
    for overlap in (False, True):
        engines[overlap] = Engine(loaded, EngineConfig(
            num_blocks=blocks, max_num_seqs=8, max_num_batched_tokens=args.prompt,
            enable_prefix_caching=False, overlap_schedule=overlap,
            cpu_num_blocks=0), device=args.device)  # fmt: skip
    n = 0

    def feed(eng: Engine, count: int) -> None:
        nonlocal n
        for _ in range(count):
            ids = torch.randint(3, VOCAB, (args.prompt,), generator=g).tolist()
            eng.add_request(f"p{n}", ids, ONE)
            n += 1

    for eng in engines.values():  # warm-up: graph capture, compiles, allocator growth
        feed(eng, 4)
        for _ in range(4):
            eng.step()
    times: dict[bool, list[float]] = {o: [] for o in engines}
    graph_steps = dict.fromkeys(engines, 0)
    bad = 0
    for _ in range(args.windows):
        for overlap, eng in engines.items():
            feed(eng, per_window - eng.stats().waiting)
            if cuda:
                torch.cuda.synchronize()
            before, g0 = eng.stats().prompt_tokens_computed, eng.runner.prefill_graph_steps
            t0 = time.perf_counter()
            for _ in range(args.steps):
                eng.step()
            if cuda:
                torch.cuda.synchronize()
            times[overlap].append((time.perf_counter() - t0) * 1e3 / args.steps)
            done = eng.stats().prompt_tokens_computed - before
            bad += done != args.steps * args.prompt
            graph_steps[overlap] += eng.runner.prefill_graph_steps - g0
    rows = {}
    for overlap, ts in times.items():
        ms = statistics.median(ts)
        mode = "on" if overlap else "off"
        rows[mode] = dict(
            ms=ms, windows=ts, fraction=limit_ms / ms, graph_steps=graph_steps[overlap]
        )
        print(f"  overlap {mode:3s}: {ms:7.3f} ms a step = {args.prompt / ms * 1e3:8.0f} tok/s, "
              f"{limit_ms / ms:.2f} of the limit (median of {args.windows} windows of "
              f"{args.steps} steps, {min(ts):.3f}-{max(ts):.3f}; prefill-graph steps "
              f"{graph_steps[overlap]} of {args.windows * args.steps})")  # fmt: skip
    print(f"  counter check: prompt tokens computed = steps x prompt in every window: "
          f"{'ok' if bad == 0 else f'MISMATCH in {bad} windows'}")  # fmt: skip
    out = Path(args.out) / "engine_prefill.json"
    out.write_text(json.dumps(dict(device=name, shape=args.shape, prompt=args.prompt,
                                   limit_ms=limit_ms, rate_tflops=rate, rows=rows,
                                   counter_ok=bad == 0), indent=1))  # fmt: skip
    for eng in engines.values():
        for rid in list(eng.seqs):
            eng.abort(rid)


if __name__ == "__main__":
    main()
