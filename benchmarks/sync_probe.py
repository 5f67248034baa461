"""Where does an engine's host wait for its device? One engine under eviction pressure, each
host-side phase of its step probed for synchronising CUDA calls (issue 16: the semi-PD prefill
lane held its storage lock 23-28 ms of a 28-36 ms step, and the code suggested demotion's copy).

    python benchmarks/sync_probe.py --model DIR [--out probe.json]           # on the GPU machine
    python benchmarks/sync_probe.py --model DIR --device cpu --requests 6    # a dry run

Fresh random prompts (``--prompt-range``) arrive all at once at an engine whose device pool
(``--kv-cache-gb``) holds a fraction of them and whose CPU tier (``--cpu-kv-gb``) takes the
evicted blocks, as a served worker's does under fresh prompts. The engine runs four ways:
overlapped step or plain, stream-ordered demotion (``EngineConfig.stream_demotion``) off or on.
Around ``schedule``, ``commit``, ``reclaim``, the launch (``runner.run``) and ``sample``, torch's
sync debug mode (``torch.cuda.set_sync_debug_mode("warn")``) turns every synchronising call
(a device-to-host copy, ``.item()``, a pageable upload, a stream or event wait) into a warning,
recorded with the line of ours that made it. Printed per way: each phase's host time (p50 / p99
ms) and its synchronising sites with their counts; the blocks demoted and the steps taken (the
counters that say the pressure was there, with the preemptions), and how many requests' greedy
tokens equal the first way's. In bf16 they may not all: a swap's copy finishes when it does, so
which steps a preempted request rejoins, and so the batches' composition and their rounding,
vary from run to run (the exact comparison is tests/gpu/test_stream_demotion_gpu.py's, fp32).
A phase of an overlapped step that synchronises waits for the step still running: its time is
that step's remaining device time. On CPU nothing is probed (no CUDA calls): the dry run checks
the plumbing.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kvrelay.workers.engine import scheduler as scheduler_mod
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.types import SamplingParams

PROBED = ("schedule", "commit", "reclaim", "launch", "sample")
# frames of this package, as imported (the sync's site is the innermost one of them)
OURS = str(Path(scheduler_mod.__file__).resolve().parents[2])


def ours(filename: str) -> bool:
    """A file of this package, not this probe's (nor an environment kept inside the checkout)."""
    path = str(Path(filename).resolve())
    return (
        path.startswith(OURS) and "-packages/" not in path and path != str(Path(__file__).resolve())
    )


class SyncSites:
    """Synchronising calls seen per phase, by the innermost frame of ours that made them."""

    def __init__(self) -> None:
        self.sites: dict[str, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.phase: str | None = None
        self.thread: int | None = None  # the engine's (a copier thread's own waits are not its)

    def showwarning(self, message: Any, category: Any, filename: str, lineno: int,
                    file: Any = None, line: Any = None) -> None:  # fmt: skip
        if self.phase is None or "synchronizing" not in str(message):
            return
        if threading.get_ident() != self.thread:
            return
        frames = [f for f in traceback.extract_stack()[:-1] if ours(f.filename)]
        where = (
            f"{Path(frames[-1].filename).name}:{frames[-1].lineno} {frames[-1].name}"
            if frames
            else f"{Path(filename).name}:{lineno}"
        )
        self.sites[self.phase][where] += 1

    @contextmanager
    def probing(self, phase: str, on: bool) -> Iterator[None]:
        outer = self.phase, self.thread
        self.phase, self.thread = phase, threading.get_ident()
        if on:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if on:
                torch.cuda.set_sync_debug_mode("default")
            self.phase, self.thread = outer


def probe(engine: Engine, sites: SyncSites, times: PhaseTimes, cuda: bool) -> None:
    """Wrap the engine's host-side phases (instance attributes shadow the methods)."""

    def wrap(owner: Any, attr: str, phase: str) -> None:
        fn: Callable[..., Any] = getattr(owner, attr)

        def probed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            with sites.probing(phase, cuda):
                out = fn(*args, **kwargs)
            times.add(phase, time.perf_counter() - t0)
            return out

        setattr(owner, attr, probed)

    wrap(engine.scheduler, "schedule", "schedule")
    wrap(engine, "_commit", "commit")
    wrap(engine, "_reclaim", "reclaim")
    wrap(engine.runner, "run", "launch")
    wrap(engine.sampler, "sample", "sample")


def prompts(n: int, lo: int, hi: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randrange(lo, hi + 1))] for _ in range(n)]


def run_way(loaded: Any, args: argparse.Namespace, overlap: bool, ordered: bool,
            work: list[list[int]], warm: list[list[int]]) -> dict[str, Any]:  # fmt: skip
    cfg = EngineConfig(kv_cache_gb=args.kv_cache_gb, cpu_kv_gb=args.cpu_kv_gb,
                       max_num_batched_tokens=args.chunk, max_num_seqs=args.max_num_seqs,
                       overlap_schedule=overlap, stream_demotion=ordered)  # fmt: skip
    engine = Engine(loaded, cfg, device=args.device)
    params = SamplingParams(max_tokens=args.output_tokens, temperature=0.0, ignore_eos=True)

    def drain(batch: list[list[int]], tag: str) -> tuple[dict[str, list[int]], float]:
        out: dict[str, list[int]] = collections.defaultdict(list)
        for i, p in enumerate(batch):
            engine.add_request(f"{tag}{i}", p, params)
        t0 = time.perf_counter()
        while engine.has_unfinished():
            for ev in engine.step():
                out[ev.request_id] += ev.token_ids
        if args.device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    drain(warm, "w")  # first compiles and graph captures, outside the probe
    cuda = args.device == "cuda"
    sites, times = SyncSites(), PhaseTimes()
    probe(engine, sites, times, cuda)
    before = engine.stats()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = sites.showwarning
        tokens, wall = drain(work, "r")
    stats = engine.stats()
    engine.check_integrity()
    engine.close()
    return {
        "overlap": overlap, "ordered": ordered, "wall_s": wall, "steps": stats.steps - before.steps,
        "preemptions": stats.preemptions - before.preemptions,
        **{k: stats.extra.get(k, 0) - before.extra.get(k, 0)
           for k in ("demoted_blocks", "ordered_demotions")},
        "phases": times.summary(),
        "sync_sites": {ph: dict(c.most_common()) for ph, c in sites.sites.items()},
        "tokens": [tokens[f"r{i}"] for i in range(len(work))],
    }  # fmt: skip


def header(args: argparse.Namespace) -> str:
    return (f"sync_probe: {args.requests} fresh prompts of {args.prompt_range} tokens at once, "
            f"{args.output_tokens} out each; chunk {args.chunk}, device KV {args.kv_cache_gb} GB, "
            f"CPU tier {args.cpu_kv_gb} GB, {args.device}")  # fmt: skip


def render(w: dict[str, Any]) -> str:
    """One way's figures: the counters, then per phase its host time and sync sites."""
    name = (f"{'overlapped' if w['overlap'] else 'plain'} step, demotion "
            f"{'stream-ordered' if w['ordered'] else 'synchronous'}")  # fmt: skip
    lines = [f"== {name}: {w['steps']} steps in {w['wall_s']:.2f} s, "
             f"{w['demoted_blocks']:.0f} blocks demoted "
             f"({w['ordered_demotions']:.0f} ordered demotions), {w['preemptions']} preemptions"]  # fmt: skip
    for ph in PROBED:
        t = w["phases"].get(ph)
        if t is None:
            continue
        syncs = w["sync_sites"].get(ph, {})
        lines.append(
            f"  {ph:<9} {t['p50_ms']:7.2f} / {t['p99_ms']:7.2f} ms p50/p99 "
            f"({t['count']:.0f} calls, {t['total_s']:.2f} s), {sum(syncs.values())} syncs"
        )
        lines += [f"      {n:6d}  {site}" for site, n in syncs.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = ap.add_argument
    a("--model", required=True, help="a model folder (config.json, weights, tokenizer)")
    a("--device", default="cuda")
    a("--dtype", default="bfloat16")
    a("--requests", type=int, default=48)
    a("--prompt-range", default="1024,4096", help="LO,HI tokens, uniform")
    a("--output-tokens", type=int, default=16)
    a("--chunk", type=int, default=4096, help="tokens a step (max_num_batched_tokens)")
    a("--max-num-seqs", type=int, default=64)
    a("--kv-cache-gb", type=float, default=1.0)
    a("--cpu-kv-gb", type=float, default=0.5)
    a("--ways", default="plain:sync,plain:ordered,overlap:sync,overlap:ordered")
    a("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args(argv)
    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
    lo, hi = (int(x) for x in args.prompt_range.split(","))
    vocab = int(loaded.config.vocab_size)
    work = prompts(args.requests, lo, hi, vocab, seed=1)
    warm = prompts(4, lo, hi, vocab, seed=2)
    print(header(args), flush=True)
    ways = []
    for way in args.ways.split(","):
        step, demotion = way.split(":")
        ways.append(run_way(loaded, args, step == "overlap", demotion == "ordered", work, warm))
        print(render(ways[-1]), flush=True)
    for w in ways[1:]:
        w["same_tokens"] = sum(a == b for a, b in zip(w["tokens"], ways[0]["tokens"], strict=True))
    print("requests whose greedy tokens equal the first way's: "
          + ", ".join(f"{w['same_tokens']}/{args.requests}" for w in ways[1:]))  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"args": vars(args), "ways": [{k: v for k, v in w.items() if k != "tokens"}
                                          for w in ways]}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
