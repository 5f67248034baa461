"""Offline generation: the kvrelay engine vs ``transformers.generate``, and the bandwidth bound.

    .venv/bin/python benchmarks/engine_bench.py [--batches 1 8 32] [--new-tokens 64] [--threads 1]
        [--json benchmarks/results/engine_bench.json]

Same weights on both sides: the default model (SmolLM2-135M-Instruct) is exported once from its
GGUF to a Hugging Face folder (``export_gguf``, cached); kvrelay loads it through ``LLM`` and
transformers through ``AutoModelForCausalLM.from_pretrained(folder)``, both fp32 on the same
number of threads. Prompts: ``batch`` random token ids sequences of 16..48 tokens (seeded), the
same ids for both (left-padded for transformers); greedy, EOS ignored, ``--new-tokens`` each.

Figures per batch (median over ``--reps`` runs, fewer at the largest batch):
* throughput = generated tokens / wall time of the whole call (prefill included);
* decode step = wall time of one decode step for the whole batch: kvrelay's ``Engine.step()``
  calls that compute no prompt token, transformers' gaps between successive calls of a
  LogitsProcessor (one call per generated token, after that step's forward).

Limit: a decode step reads every weight once (the tied embedding once, as the LM head) plus the
batch's KV cache; at the memory bandwidth measured by one large ``copy_`` (bytes read + bytes
written per second), that gives the most decode steps per second the machine allows.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.llm import LLM
from kvrelay.workers.model.loader_gguf import export_gguf
from kvrelay.workers.model.source import default_model_path
from kvrelay.workers.types import SamplingParams


@dataclass(frozen=True, slots=True)
class Side:
    tokens_per_s: float
    step_ms_p50: float
    step_ms_p90: float
    steps_measured: int


@dataclass(frozen=True, slots=True)
class Row:
    batch: int
    ours: Side
    hf: Side
    limit_steps_per_s: float  # bandwidth / bytes read per decode step
    same_tokens: float  # fraction of sequences whose greedy tokens equal transformers'


def prompts_for(batch: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed * 1000 + batch)
    return [[rng.randrange(100, 40_000) for _ in range(rng.randint(16, 48))] for _ in range(batch)]


def copy_bandwidth(nbytes: int = 512 << 20, reps: int = 8) -> float:
    """Bytes moved (read + written) per second by one large tensor copy: the best of ``reps``."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def step_stats(samples: Sequence[float], tokens: int, wall: float) -> Side:
    ms = sorted(s * 1e3 for s in samples)
    p90 = ms[min(len(ms) - 1, int(len(ms) * 0.9))] if ms else float("nan")
    p50 = statistics.median(ms) if ms else float("nan")
    return Side(tokens / wall, p50, p90, len(ms))


def run_ours(llm: LLM, prompts: list[list[int]], new: int) -> tuple[Side, list[list[int]]]:
    """One ``LLM.generate`` call; its engine's ``step`` wrapped to time decode-only steps."""
    engine = llm.engine
    inner = engine.step
    decode_steps: list[float] = []

    def timed() -> list:  # type: ignore[type-arg]
        before = engine.prompt_tokens_computed
        t0 = time.perf_counter()
        out = inner()
        dt = time.perf_counter() - t0
        if out and engine.prompt_tokens_computed == before:
            decode_steps.append(dt)
        return out

    engine.step = timed  # type: ignore[method-assign]
    try:
        params = SamplingParams(max_tokens=new, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        wall = time.perf_counter() - t0
    finally:
        del engine.step  # back to the class method
    tokens = sum(len(o.token_ids) for o in outs)
    return step_stats(decode_steps, tokens, wall), [list(o.token_ids) for o in outs]


def run_hf(model, prompts: list[list[int]], new: int, pad_id: int):  # type: ignore[no-untyped-def]
    from transformers import LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.calls: list[float] = []

        def __call__(self, input_ids, scores):  # type: ignore[no-untyped-def]
            self.calls.append(time.perf_counter())
            return scores

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    clock = Clock()
    with torch.inference_mode():
        t0 = time.perf_counter()
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
            do_sample=False, logits_processor=LogitsProcessorList([clock]), pad_token_id=pad_id,
        )
        wall = time.perf_counter() - t0
    gaps = [b - a for a, b in zip(clock.calls, clock.calls[1:], strict=False)]
    gen = out[:, width:].tolist()
    return step_stats(gaps, sum(len(g) for g in gen), wall), gen


def median_side(sides: Sequence[Side]) -> Side:
    def med(f: Callable[[Side], float]) -> float:
        return statistics.median(f(s) for s in sides)

    return Side(med(lambda s: s.tokens_per_s), med(lambda s: s.step_ms_p50),
                med(lambda s: s.step_ms_p90), sum(s.steps_measured for s in sides))


def weight_bytes(model: torch.nn.Module) -> int:
    # parameters() yields a tied tensor once: the embedding is read once, as the LM head
    return sum(p.numel() * p.element_size() for p in model.parameters())


def kv_bytes_per_token(cfg) -> int:  # type: ignore[no-untyped-def]
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 4


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1,
                   help="1 by default: two OpenMP threads on two shared cores stall at barriers")
    p.add_argument("--reps", type=int, default=3, help="repetitions (1 at batch >= 32)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.new_tokens < 2 or args.threads < 1 or args.reps < 1 or min(args.batches) < 1:
        p.error("--new-tokens >= 2, --threads, --reps and batches >= 1")
    load_start = os.getloadavg()
    t_start = time.time()
    torch.manual_seed(args.seed)
    folder = export_gguf(default_model_path())
    llm = LLM(str(folder), threads=args.threads,
              engine_config=EngineConfig(max_num_seqs=max(64, max(args.batches))))
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    torch.set_num_threads(args.threads)
    bandwidth = copy_bandwidth()
    wbytes = weight_bytes(llm.loaded.model)
    kv_tok = kv_bytes_per_token(llm.loaded.config)
    pad = llm.loaded.config.eos_token_ids[0] if llm.loaded.config.eos_token_ids else 0
    run_ours(llm, prompts_for(2, 99), 4)  # warm-up both (first-call allocations)
    run_hf(hf, prompts_for(2, 99), 4, pad)
    rows: list[Row] = []
    for batch in args.batches:
        prompts = prompts_for(batch, args.seed)
        reps = 1 if batch >= 32 else args.reps
        ours, theirs, same = [], [], 0.0
        for _ in range(reps):  # alternate, so drift in machine load hits both alike
            o, o_tok = run_ours(llm, prompts, args.new_tokens)
            h, h_tok = run_hf(hf, prompts, args.new_tokens, pad)
            ours.append(o)
            theirs.append(h)
            same = sum(a == b for a, b in zip(o_tok, h_tok, strict=True)) / batch
        mean_ctx = sum(len(q) for q in prompts) / batch + args.new_tokens / 2
        step_bytes = wbytes + batch * mean_ctx * kv_tok
        rows.append(Row(batch, median_side(ours), median_side(theirs), bandwidth / step_bytes, same))
    load_end = os.getloadavg()
    print(render(rows, args, bandwidth, wbytes, kv_tok, load_start, load_end,
                 time.time() - t_start))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "bandwidth_Bps": bandwidth, "weight_bytes": wbytes,
                       "kv_bytes_per_token": kv_tok, "loadavg_start": load_start,
                       "loadavg_end": load_end, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 0


def render(rows, args, bandwidth, wbytes, kv_tok, l0, l1, wall) -> str:  # type: ignore[no-untyped-def]
    head = (
        f"engine_bench: SmolLM2-135M fp32, {args.threads} threads, {args.new_tokens} new tokens, "
        f"prompts 16-48 tokens\n"
        f"memory bandwidth (copy, read+write) {bandwidth / 1e9:.2f} GB/s; weights "
        f"{wbytes / 1e6:.0f} MB read per decode step, KV {kv_tok / 1e3:.1f} kB per token\n"
        f"load average start {l0[0]:.2f} {l0[1]:.2f} {l0[2]:.2f}, end {l1[0]:.2f} {l1[1]:.2f} "
        f"{l1[2]:.2f}; wall {wall:.0f} s\n"
    )
    cols = ("batch", "ours tok/s", "HF tok/s", "ours/HF", "ours step ms p50/p90",
            "HF step ms p50/p90", "HF/ours step", "limit steps/s", "ours/limit", "HF/limit",
            "same tokens")
    lines = [" | ".join(cols), " | ".join("---" for _ in cols)]
    for r in rows:
        o, h = r.ours, r.hf
        lines.append(" | ".join((
            str(r.batch), f"{o.tokens_per_s:.1f}", f"{h.tokens_per_s:.1f}",
            f"{o.tokens_per_s / h.tokens_per_s:.2f}", f"{o.step_ms_p50:.1f}/{o.step_ms_p90:.1f}",
            f"{h.step_ms_p50:.1f}/{h.step_ms_p90:.1f}", f"{h.step_ms_p50 / o.step_ms_p50:.2f}",
            f"{r.limit_steps_per_s:.1f}", f"{1e3 / o.step_ms_p50 / r.limit_steps_per_s:.2f}",
            f"{1e3 / h.step_ms_p50 / r.limit_steps_per_s:.2f}", f"{r.same_tokens:.2f}",
        )))
    return head + "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
