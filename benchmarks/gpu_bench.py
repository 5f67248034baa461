"""One run on one GPU: check and time kvrelay's model path against transformers and the roofline.

    python benchmarks/gpu_bench.py [--models 1b,8b] [--hf-compile-batches 1] [--out DIR]
    python benchmarks/gpu_bench.py --quick   # 1B decode at batch 1 and 128, its profile, and
                                             # transformers compiled at batch 1 (~2 min)
    python benchmarks/gpu_bench.py --engine-only  # issue 17: Engine.step, overlap off / on,
                                                  # vs the graph step at batch 1/32/128

Random-weight bf16 Llamas with the shapes of Llama-3.2-1B (hidden 2048, 16 layers, 32/8 heads,
intermediate 8192, vocab 128256, tied) and Llama-3.1-8B (4096, 32 layers, 32/8, 14336, untied).

* Ceilings, measured here: bandwidth = a 2 GiB device copy (bytes read + written) / time;
  matmul rate = an 8192^3 bf16 product.
* Check: our prefill logits against transformers' on the same weights (max-normalised error).
* Decode, 1k-token contexts, batch 1/8/32/128: ``gpu ms`` = one CUDA-graph step (inputs staged,
  replayed) timed with events; ``step ms`` = the host loop ``ModelRunner.run`` + greedy sample +
  reading the tokens, what an engine step costs without its scheduler. Limit = (weights + KV
  bytes read per step) / bandwidth. transformers: ``generate`` greedy from a 1023-token prompt,
  per-step time from host stamps in a logits processor (generate syncs every step), eager
  (dynamic cache) and with ``cache_implementation="static"`` (generate compiles its forward,
  mode reduce-overhead; each batch size compiles anew, so only ``--hf-compile-batches``).
* Engine: the whole ``Engine.step`` loop (scheduler included) decoding at batch 1 and 128
  (``--engine-only``: 1, 32 and 128), with the overlapped scheduler off and on, against the
  graph step of the same batch.
* Prefill, one prompt of 1k and 8k tokens: limit = (2 * matmul params * T + causal attention
  4 * H * D * T(T+1)/2 * L) FLOPs / matmul rate; transformers eager forward beside it.
* KV movement (1B cache): pack / copy_blocks of 256 blocks, bytes read + written / time, Triton
  and the torch reference; device-to-host of the packed buffer into pinned memory.
* Profile: torch.profiler over decode graph replays (1B, batch 1 and 128), GPU time by kernel
  class per step, against the step's wall time ("fused" = kernels/triton_fused.py's norm, RoPE +
  KV write and SiLU kernels).

The table prints last and goes to ``--out`` (default $OUT or .) as gpu_bench.txt. The models
and their limits are gpu_models.py's, the timers and profiles gpu_timing.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from kvrelay import kernels
from kvrelay.benchmarks.gpu_models import (
    BS,
    CTX,
    DECODE_BATCHES,
    GREEDY,
    PREFILL_LENS,
    SHAPES,
    VOCAB,
    build,
    ceilings,
    decode_bytes,
    make_seqs,
    prefill_flops,
)
from kvrelay.benchmarks.gpu_timing import (
    LINES,
    DeviceWaits,
    cuda_ms,
    host_ms,
    profiled,
    say,
    say_profile,
)
from kvrelay.kernels import reference
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.cuda_graphs import DecodeBatch
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.runner import ModelRunner, prepare_inputs
from kvrelay.workers.engine.sampler import Sampler, SampleRow
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.model.config import ModelConfig
from kvrelay.workers.model.llama import LlamaModel, kv_cache_shape
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.types import SamplingParams

RESULTS: dict[str, Any] = {}


def _sampled_step(
    runner: ModelRunner, sampler: Sampler, items: list[ScheduledSeq], rows: list[SampleRow]
) -> list[int]:
    out: list[int] = sampler.sample(runner.run(items)[0], rows).tolist()
    return out


def ours_decode(
    runner: ModelRunner, model: LlamaModel, config: ModelConfig, bw: float,
    batches: tuple[int, ...] = DECODE_BATCHES,
) -> None:  # fmt: skip
    sampler = Sampler()
    for b in batches:
        items = [ScheduledSeq(s, 1) for s in make_seqs(b, CTX, 0, 1)]
        rows = [SampleRow(GREEDY, CTX) for _ in items]
        assert runner.graphs is not None
        batch = DecodeBatch(
            [s.seq.token_at(CTX - 1) for s in items], [CTX - 1] * b,
            [s.seq.block_ids[(CTX - 1) // BS] * BS + (CTX - 1) % BS for s in items],
            [s.seq.block_ids for s in items],
        )  # fmt: skip
        gpu = cuda_ms(partial(runner.graphs.run, batch), iters=50)
        step = host_ms(partial(_sampled_step, runner, sampler, items, rows), iters=50)
        limit = decode_bytes(model, config, b) / bw / 1e6
        RESULTS.setdefault("decode", {})[b] = dict(gpu_ms=gpu, step_ms=step, limit_ms=limit)
        say(f"  ours decode b={b:3d}: gpu {gpu:7.3f} ms ({limit / gpu:.2f} of limit "
            f"{limit:.3f} ms) | step {step:7.3f} ms = {b / step * 1e3:8.0f} tok/s "
            f"({limit / step:.2f})")  # fmt: skip
    say(f"  graphs captured: {runner.graphs.num_graphs if runner.graphs else 0}")


def ours_prefill(runner: ModelRunner, model: LlamaModel, config: ModelConfig, rate: float) -> None:
    for t in PREFILL_LENS:
        items = [ScheduledSeq(make_seqs(1, 1, 0, t)[0], t)]
        ms = cuda_ms(partial(runner.run, items), iters=5, warmup=2)
        limit = prefill_flops(model, config, t) / rate / 1e9
        RESULTS.setdefault("prefill", {})[t] = dict(ms=ms, limit_ms=limit)
        say(f"  ours prefill T={t:5d}: {ms:8.2f} ms = {t / ms * 1e3:9.0f} tok/s "
            f"({limit / ms:.2f} of limit {limit:.2f} ms)")  # fmt: skip


class _Stamps:
    """A logits processor recording the host time of each generation step."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return scores


def hf_decode_ms(hf: Any, batch: int, compiled: bool, steps: int = 32) -> float:
    from transformers import LogitsProcessorList

    ids = torch.randint(3, VOCAB, (batch, CTX - 1), device="cuda")
    extra = {"cache_implementation": "static"} if compiled else {}

    def gen() -> list[float]:
        stamps = _Stamps()
        hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                    max_new_tokens=steps, min_new_tokens=steps, pad_token_id=0,
                    logits_processor=LogitsProcessorList([stamps]), **extra)  # fmt: skip
        return [b - a for a, b in zip(stamps.times, stamps.times[1:], strict=False)]

    t0 = time.perf_counter()
    gen()
    if compiled:
        say(
            f"    (transformers compile + first generate, b={batch}: {time.perf_counter() - t0:.0f} s)"
        )
        gen()
    return statistics.median(gen()) * 1e3


def hf_section(hf: Any, compile_batches: set[int], deadline: float) -> None:
    for b in DECODE_BATCHES:
        eager = hf_decode_ms(hf, b, False)
        line = (
            f"  transformers decode b={b:3d}: eager {eager:7.2f} ms = {b / eager * 1e3:7.0f} tok/s"
        )
        RESULTS.setdefault("hf_decode", {})[b] = {"eager_ms": eager}
        if b in compile_batches and time.monotonic() < deadline:
            try:
                comp = hf_decode_ms(hf, b, True)
                RESULTS["hf_decode"][b]["compiled_ms"] = comp
                line += f" | static+compile {comp:7.2f} ms = {b / comp * 1e3:7.0f} tok/s"
            except Exception as exc:  # report and carry on: the rest of the table still counts
                line += f" | static+compile failed: {exc!r:.200}"
        say(line)
    for t in PREFILL_LENS:
        ids = torch.randint(3, VOCAB, (1, t), device="cuda")
        with torch.no_grad():
            ms = cuda_ms(partial(hf, ids, logits_to_keep=1), iters=5, warmup=2)
        RESULTS.setdefault("hf_prefill", {})[t] = ms
        say(f"  transformers prefill T={t:5d}: eager {ms:8.2f} ms = {t / ms * 1e3:9.0f} tok/s")


def engine_section(
    model: LlamaModel, config: ModelConfig, batches: tuple[int, ...] = (1, 128),
    overlaps: tuple[bool, ...] = (False, True), windows: int = 5, steps: int = 30,
) -> None:  # fmt: skip
    """Engine.step end to end: prefill 1023-token prompts, then time decode-only steps, with the
    overlapped scheduler off and on; beside it the graph step of the same batch (ours_decode).

    Both engines live side by side and their timing windows alternate (off, on, off, on, ...), so
    drift on the machine hits both alike; each row prints the median window and the spread. The
    tokens each engine emitted in its windows are counted and must equal batch x steps."""
    tok = SimpleNamespace(eos_token_ids=())
    loaded = LoadedModel(config, model, tok, "bench", "random")  # type: ignore[arg-type]
    for b in batches:
        # the batch's prompts prefill over several steps (8192 tokens each) and the rows done
        # first decode meanwhile: room for those tokens too, or the early rows finish inside the
        # timed windows and the last windows time a smaller batch (the H200 run of 22:02 counted
        # 4721 of 4800 tokens at b=32)
        max_tokens = 4 + windows * steps + -(-b * CTX // 8192) + 4
        engines = {}
        for overlap in overlaps:
            eng = Engine(loaded, EngineConfig(block_size=BS, num_blocks=b * (-(-(CTX + max_tokens) // BS)) + 16,
                         max_num_seqs=b, max_num_batched_tokens=8192,
                         overlap_schedule=overlap), device="cuda")  # fmt: skip
            g = torch.Generator().manual_seed(1)
            for i in range(b):
                eng.add_request(
                    f"r{i}",
                    torch.randint(3, VOCAB, (CTX - 1,), generator=g).tolist(),
                    SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
                )
            while eng.stats().waiting or any(
                s.num_computed < len(s.prompt_ids) for s in eng.seqs.values()
            ):
                eng.step()
            for _ in range(3):
                eng.step()
            engines[overlap] = eng
        times: dict[bool, list[float]] = {o: [] for o in overlaps}
        emitted = dict.fromkeys(overlaps, 0)
        waited = dict.fromkeys(overlaps, 0.0)
        for _ in range(windows):
            for overlap, eng in engines.items():
                torch.cuda.synchronize()
                DeviceWaits.total = 0.0
                t0 = time.perf_counter()
                with DeviceWaits():
                    for _ in range(steps):
                        emitted[overlap] += sum(len(e.token_ids) for e in eng.step())
                times[overlap].append((time.perf_counter() - t0) * 1e3 / steps)
                waited[overlap] += DeviceWaits.total * 1e3 / steps / windows
        graph = RESULTS.get("decode", {}).get(b, {}).get("gpu_ms")
        for overlap, eng in engines.items():
            ts = sorted(times[overlap])
            ms = ts[len(ts) // 2]
            mode = "on" if overlap else "off"
            RESULTS.setdefault("engine", {}).setdefault(b, {})[mode] = ms
            RESULTS["engine"][b][f"{mode}_windows"] = times[overlap]
            vs = f" = {ms / graph:.2f}x the graph step {graph:.3f} ms" if graph else ""
            ok = "ok" if emitted[overlap] == b * windows * steps else "MISMATCH"
            RESULTS["engine"][b][f"{mode}_wait_ms"] = waited[overlap]
            say(
                f"  engine decode b={b:3d} overlap {mode:3s}: {ms:7.3f} ms/step = "
                f"{b / ms * 1e3:8.0f} tok/s{vs} (median of {windows} windows of {steps} steps, "
                f"{ts[0]:.3f}-{ts[-1]:.3f}; host blocked on the device {waited[overlap]:.3f} "
                f"ms/step; tokens {emitted[overlap]} {ok}; graph steps "
                f"{eng.runner.graph_steps}, eager {eng.runner.eager_steps})"
            )
        engines.clear()
        del eng
        torch.cuda.empty_cache()


def engine_only(bw: float) -> None:
    """Issue 17's check: whole Engine.step vs the model's graph step at batch 1/32/128, the
    overlapped scheduler off and on (target: within 1.15x of the graph step at 32 and 128)."""
    say("\n## Llama-1B shape, bf16, random weights (--engine-only)")
    hf, model, config = build(SHAPES["1b"])
    del hf
    batches = (1, 32, 128)
    nblocks = max(batches) * (-(-CTX // BS)) + 16
    cache = torch.empty(kv_cache_shape(config, nblocks, BS), dtype=torch.bfloat16, device="cuda")
    cache.normal_(0, 0.5)
    runner = ModelRunner(model, cache, BS)
    ours_decode(runner, model, config, bw, batches=batches)
    runner = cache = None  # type: ignore[assignment]
    torch.cuda.empty_cache()
    engine_section(model, config, batches=batches)


def batch1(bw: float, deadline: float) -> None:
    """Issue 17's batch-1 goals in one run: the 1B shape's graph step and whole Engine.step
    (overlap off / on) at batch 1 beside compiled transformers (static cache) at batch 1 in the
    same process, then the 8B shape's graph step at batch 1."""
    say("\n## batch 1 (--b1): Llama-1B shape, bf16, random weights")
    hf, model, config = build(SHAPES["1b"])
    cache = torch.empty(kv_cache_shape(config, 2 * CTX // BS + 16, BS), dtype=torch.bfloat16,
                        device="cuda").normal_(0, 0.5)  # fmt: skip
    ours_decode(ModelRunner(model, cache, BS), model, config, bw, batches=(1,))
    ours = dict(RESULTS["decode"][1])
    cache = None  # type: ignore[assignment]
    torch.cuda.empty_cache()
    engine_section(model, config, batches=(1,))
    model = None  # type: ignore[assignment]
    torch.cuda.empty_cache()
    if time.monotonic() < deadline:
        hf_ms = hf_decode_ms(hf, 1, True)
        RESULTS["b1_hf_compiled_ms"] = hf_ms
        engine_ms = RESULTS["engine"][1]["on"]
        say(f"  transformers decode b=  1: static+compile {hf_ms:7.3f} ms = {1e3 / hf_ms:5.0f} tok/s"
            f" | ours: graph step {hf_ms / ours['gpu_ms']:.2f}x, sampled step "
            f"{hf_ms / ours['step_ms']:.2f}x, Engine.step overlap on {hf_ms / engine_ms:.2f}x "
            f"({1e3 / engine_ms:.0f} tok/s); graph step {ours['limit_ms'] / ours['gpu_ms']:.2f} "
            f"of the bandwidth limit {ours['limit_ms']:.3f} ms")  # fmt: skip
    hf = None
    torch.cuda.empty_cache()
    say("\n## batch 1 (--b1): Llama-8B shape, bf16, random weights")
    hf, model, config = build(SHAPES["8b"])
    hf = None
    torch.cuda.empty_cache()
    cache = torch.empty(kv_cache_shape(config, 2 * CTX // BS + 16, BS), dtype=torch.bfloat16,
                        device="cuda").normal_(0, 0.5)  # fmt: skip
    ours_decode(ModelRunner(model, cache, BS), model, config, bw, batches=(1,))
    RESULTS["b1_8b"] = RESULTS["decode"].pop(1)
    RESULTS["decode"][1] = ours


def prefill_only(rate: float) -> None:
    """Issue 17's prefill check: the 1B shape at 1k and 8k tokens, timed and profiled."""
    say("\n## Llama-1B shape, bf16, random weights (--prefill-only)")
    hf, model, config = build(SHAPES["1b"])
    del hf
    cache = torch.zeros(kv_cache_shape(config, max(PREFILL_LENS) // BS + 16, BS),
                        dtype=torch.bfloat16, device="cuda")  # fmt: skip
    # both rows in one run: prefill graphs (workers/engine/prefill_graphs.py: one graph per
    # token bucket, one replay a step) off, on; past their cap (2048 tokens) a step runs eagerly
    # either way
    for graphs, key in ((False, "prefill_profile"), (True, "prefill_profile_graphs")):
        say(f"  prefill graphs {'on' if graphs else 'off'}:")
        runner = ModelRunner(model, cache, BS, use_prefill_graphs=graphs)
        prefill_profile(runner, model, config, rate, key=key)
        if runner.prefill is not None:
            say(f"  prefill graphs: {runner.prefill.num_graphs} captured (one a bucket), "
                f"{runner.prefill_graph_steps} of {runner.eager_steps} steps on them, "
                f"{runner.prefill.replays} replays (one a step)")  # fmt: skip


def kv_section(cache: torch.Tensor, bw: float) -> None:
    ids = torch.randperm(cache.shape[0] // 2, device="cuda")[:256]
    dst = torch.randperm(cache.shape[0] // 2, device="cuda")[:256] + cache.shape[0] // 2
    nbytes = 256 * cache[0].numel() * cache.element_size()
    pinned = torch.empty((256, *cache.shape[1:]), dtype=cache.dtype, pin_memory=True)
    packed = kernels.pack_blocks(cache, ids)
    rows = [
        ("pack 256 blocks", lambda: kernels.pack_blocks(cache, ids), lambda: reference.pack_blocks(cache, ids)),
        ("copy_blocks 256", lambda: kernels.copy_blocks(cache, ids, cache, dst),
         lambda: reference.copy_blocks(cache, ids, cache, dst)),
    ]  # fmt: skip
    say(
        f"  KV block {cache[0].numel() * cache.element_size() / 2**20:.2f} MiB; 256 blocks = {nbytes / 2**30:.2f} GiB"
    )
    for name, fast, ref in rows:
        ms, rms = cuda_ms(fast), cuda_ms(ref)
        gbs, rgbs = 2 * nbytes / ms / 1e6, 2 * nbytes / rms / 1e6
        RESULTS.setdefault("kv", {})[name] = dict(ms=ms, gbs=gbs, ref_gbs=rgbs)
        say(
            f"  {name}: triton {gbs:6.0f} GB/s ({gbs / bw:.2f}) | torch {rgbs:6.0f} GB/s ({rgbs / bw:.2f})"
        )
    ms = cuda_ms(lambda: pinned.copy_(packed, non_blocking=True))
    RESULTS["kv"]["d2h pinned"] = nbytes / ms / 1e6
    say(f"  device->host pinned (tier demote): {nbytes / ms / 1e6:6.1f} GB/s")


def profile_section(model: LlamaModel, cache: torch.Tensor, decode: dict[int, Any]) -> None:
    """Kernel time by class for one decode step (the eager step launches the same kernels the
    graph replays), against the graph step's wall time: the difference is launch gaps."""
    eager = ModelRunner(model, cache, BS, use_cuda_graphs=False)
    for b in (1, 128):
        items = [ScheduledSeq(s, 1) for s in make_seqs(b, CTX, 0, 1)]
        total, classes, kernels_ = profiled(partial(eager.run, items))
        wall = decode.get(b, {}).get("gpu_ms", float("nan"))
        say_profile(f"decode b={b} (wall = the graph step)", wall, total, classes, kernels_)
        RESULTS.setdefault("profile", {})[b] = dict(graph_ms=wall, kernel_ms=total, classes=classes)


def prefill_profile(runner: ModelRunner, model: LlamaModel, config: ModelConfig,
                    rate: float, key: str = "prefill_profile") -> None:  # fmt: skip
    """Issue 17's prefill at 1k: the step's wall time (CUDA events), the host's time to issue it
    and the kernel time by class, so a gap between wall and kernels (launch-bound host) is told
    from slow kernels, and each class against its share of the FLOP limit."""
    for t in PREFILL_LENS:
        items = [ScheduledSeq(make_seqs(1, 1, 0, t)[0], t)]
        run = partial(runner.run, items)
        wall = cuda_ms(run, iters=10, warmup=3)
        host = host_ms(run, iters=10, warmup=1)
        total, classes, kernels_ = profiled(run)
        limit = prefill_flops(model, config, t) / rate / 1e9
        say(f"  prefill T={t}: wall {wall:.3f} ms ({limit / wall:.2f} of the limit {limit:.3f} "
            f"ms), host issue+sync {host:.3f} ms")  # fmt: skip
        say_profile(f"prefill T={t}", wall, total, classes, kernels_, top=12)
        RESULTS.setdefault(key, {})[t] = dict(
            wall_ms=wall, host_ms=host, kernel_ms=total, limit_ms=limit, classes=classes
        )


def check(hf: Any, model: LlamaModel, cache: torch.Tensor, name: str) -> None:
    """Prefill logits of a 64-token prompt: ours and transformers' (both bf16) against
    transformers in fp32 on the same (bf16-valued) weights, so bf16 drift is told from error."""
    ids = torch.randint(3, VOCAB, (1, 64), device="cuda")
    seq = make_seqs(1, 1, 0, 64)[0]
    seq.prompt_ids, seq.output_ids = ids[0].tolist(), []
    attn = prepare_inputs([ScheduledSeq(seq, 64)], BS, torch.device("cuda")).attn
    ours = model.compute_logits(model(ids[0], torch.arange(64, device="cuda"), cache, attn))
    with torch.no_grad():
        theirs = hf(ids).logits[0].float()
        hf.float()  # in place, parameter by parameter: bf16 values are exact in fp32
        exact = hf(ids).logits[0].float()
        hf.to(torch.bfloat16)

    def err(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float((x - ref).abs().max() / ref.abs().max())

    agree = float((ours.argmax(-1) == exact.argmax(-1)).float().mean())
    agree_hf = float((theirs.argmax(-1) == exact.argmax(-1)).float().mean())
    RESULTS.setdefault("check", {})[name] = dict(
        ours_vs_hf=err(ours, theirs), ours_vs_fp32=err(ours, exact), hf_vs_fp32=err(theirs, exact)
    )
    say(f"  check (max|diff|/max|ref|, 64-token prefill): ours vs transformers bf16 "
        f"{err(ours, theirs):.2e}; vs transformers fp32: ours {err(ours, exact):.2e}, "
        f"transformers bf16 {err(theirs, exact):.2e}; argmax agreement with fp32: ours "
        f"{agree:.2f}, transformers bf16 {agree_hf:.2f}")  # fmt: skip


def bench_model(
    name: str, bw: float, rate: float, compile_batches: set[int], deadline: float,
    check_only: bool = False,
) -> None:  # fmt: skip
    say(f"\n## Llama-{name.upper()} shape, bf16, random weights")
    hf, model, config = build(SHAPES[name])
    params = sum(p.numel() for p in model.parameters())
    kv1 = CTX * config.num_layers * 2 * config.num_kv_heads * config.head_dim * 2
    weights = decode_bytes(model, config, 1) - kv1
    say(
        f"  params {params / 1e9:.2f} B; weights read per decode step {weights / 1e9:.2f} GB, "
        f"KV per 1k-token sequence {kv1 / 1e6:.0f} MB"
    )
    check(
        hf,
        model,
        torch.zeros(kv_cache_shape(config, 8, BS), dtype=torch.bfloat16, device="cuda"),
        name,
    )
    if check_only:
        return
    nblocks = max(DECODE_BATCHES) * (-(-CTX // BS)) + 8192 // BS + 16
    cache = torch.empty(kv_cache_shape(config, nblocks, BS), dtype=torch.bfloat16, device="cuda")
    cache.normal_(0, 0.5)
    runner = ModelRunner(model, cache, BS)
    sections: list[tuple[str, Callable[[], None]]] = [
        ("decode", lambda: ours_decode(runner, model, config, bw)),
        ("prefill", lambda: ours_prefill(runner, model, config, rate)),
    ]
    if name == "1b":
        sections += [
            ("profile", lambda: profile_section(model, cache, RESULTS.get("decode", {}))),
            ("kv", lambda: kv_section(cache, bw)),
        ]
    for section, call in sections:
        try:
            call()
        except Exception:
            say(f"  {section} FAILED:\n{traceback.format_exc()}")
    runner = cache = None  # type: ignore[assignment]
    torch.cuda.empty_cache()
    if name == "1b":
        try:
            engine_section(model, config)
        except Exception:
            say(f"  engine FAILED:\n{traceback.format_exc()}")
    model = None  # type: ignore[assignment]
    torch.cuda.empty_cache()
    try:
        hf_section(hf, compile_batches, deadline)
    except Exception:
        say(f"  transformers FAILED:\n{traceback.format_exc()}")
    hf = None
    torch.cuda.empty_cache()


# The unfused baseline and compiled transformers at batch 1, from the last full run on the same
# kind of device (H100 80GB HBM3; /work/team/gpu_bench_results.txt, 2026-11-24, call 2).
BASELINE_B1 = dict(gpu_ms=2.247, step_ms=2.328, hf_compiled_tok_s=269.0)


def quick(bw: float, deadline: float) -> None:
    """1B decode at batch 1 and 128 with the profile, then transformers compiled at batch 1."""
    say("\n## Llama-1B shape, bf16, random weights (--quick)")
    hf, model, config = build(SHAPES["1b"])
    empty = torch.zeros(kv_cache_shape(config, 8, BS), dtype=torch.bfloat16, device="cuda")
    check(hf, model, empty, "1b")
    nblocks = 128 * (-(-CTX // BS)) + 16
    cache = torch.empty(kv_cache_shape(config, nblocks, BS), dtype=torch.bfloat16, device="cuda")
    cache.normal_(0, 0.5)
    runner = ModelRunner(model, cache, BS)
    ours_decode(runner, model, config, bw, batches=(1, 128))
    profile_section(model, cache, RESULTS.get("decode", {}))
    runner = cache = None  # type: ignore[assignment]
    model = None  # type: ignore[assignment]
    torch.cuda.empty_cache()
    hf_b1 = BASELINE_B1["hf_compiled_tok_s"]
    if time.monotonic() < deadline:
        try:
            hf_b1 = 1e3 / hf_decode_ms(hf, 1, True)
            say(f"  transformers decode b=  1: static+compile {1e3 / hf_b1:7.2f} ms = "
                f"{hf_b1:7.0f} tok/s")  # fmt: skip
        except Exception as exc:  # the recorded figure stands in
            say(f"  transformers compiled b=1 failed ({exc!r:.200}); using {hf_b1:.0f} tok/s")
    d1 = RESULTS["decode"][1]
    say(f"  batch 1: ours {1e3 / d1['step_ms']:.0f} tok/s (step) = "
        f"{1e3 / d1['step_ms'] / hf_b1:.2f}x transformers compiled ({hf_b1:.0f} tok/s); "
        f"gpu {d1['gpu_ms']:.3f} ms = {d1['limit_ms'] / d1['gpu_ms']:.2f} of limit "
        f"(unfused baseline {BASELINE_B1['gpu_ms']:.3f} ms, "
        f"{d1['limit_ms'] / BASELINE_B1['gpu_ms']:.2f})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="1b,8b")
    parser.add_argument("--hf-compile-batches", default="1")
    parser.add_argument("--budget-s", type=float, default=480.0, help="skip compiles after this")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--check-only", default="", help="models to build and check only")
    parser.add_argument("--quick", action="store_true", help="1B decode at batch 1 and 128 only")
    parser.add_argument("--engine-only", action="store_true",
                        help="1B: Engine.step (overlap off / on) vs the graph step, b 1/32/128")
    parser.add_argument("--prefill-only", action="store_true",
                        help="1B: prefill at 1k and 8k, wall vs host vs kernel time by class")
    parser.add_argument("--b1", action="store_true",
                        help="batch 1: 1B graph step, Engine.step and compiled transformers; 8B")
    args = parser.parse_args()
    deadline = time.monotonic() + args.budget_s
    import transformers
    import triton

    dev = torch.cuda.get_device_name()
    say(f"# gpu_bench: {dev} | torch {torch.__version__} | triton {triton.__version__} | "
        f"transformers {transformers.__version__}")  # fmt: skip
    bw, rate = ceilings()
    RESULTS["ceilings"] = dict(copy_gbs=bw, matmul_tflops=rate)
    say(f"ceilings: copy {bw:.0f} GB/s (read + write), bf16 matmul {rate:.0f} TFLOP/s")
    batches = {int(x) for x in args.hf_compile_batches.split(",") if x}
    if args.quick:
        try:
            quick(bw, deadline)
        except Exception:
            say(f"quick FAILED:\n{traceback.format_exc()}")
    if args.engine_only:
        try:
            engine_only(bw)
        except Exception:
            say(f"engine FAILED:\n{traceback.format_exc()}")
    if args.prefill_only:
        try:
            prefill_only(rate)
        except Exception:
            say(f"prefill FAILED:\n{traceback.format_exc()}")
    if args.b1:
        try:
            batch1(bw, deadline)
        except Exception:
            say(f"b1 FAILED:\n{traceback.format_exc()}")
    only = args.quick or args.engine_only or args.prefill_only or args.b1
    for name in [] if only else args.models.split(","):
        try:
            bench_model(name, bw, rate, batches, deadline, name in args.check_only.split(","))
        except Exception:
            say(f"{name} FAILED:\n{traceback.format_exc()}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_bench.txt").write_text("\n".join(LINES) + "\n")
    (out / "gpu_bench.json").write_text(json.dumps(RESULTS, indent=1, default=str))


if __name__ == "__main__":
    main()
