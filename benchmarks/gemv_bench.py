"""Small-batch projections (issue 17): cuBLAS against the split-K Triton GEMV, 1B / 8B shapes.

``F.linear`` against kernels/triton_gemv.py at the decode shapes of Llama-3.2-1B and
Llama-3.1-8B, bf16.

    python benchmarks/gemv_bench.py --out gemv.json     # GPU, ~1-2 min
    python benchmarks/gemv_bench.py --device cpu        # dry run: tiny shapes, F.linear both ways

* Ceiling, measured here: ``gpu_models.ceilings()`` (a 2 GiB device copy, bytes read + written).
* Per projection (fused q|k|v, o, fused gate|up, down) and M = 1, 2, 4, 8, 16 rows: bytes =
  W + x + y; GB/s = bytes / median time, and its fraction of the copy rate. Two timings each:
  ``call`` = ``triton.testing.do_bench`` of one call (L2 flushed before each: the weights come
  from HBM as in a decode step, launch latency hidden behind the flush); ``graph`` = one CUDA
  graph of 20 calls / 20 (no launch gaps), the calls cycling through copies of W that together
  exceed 200 MB, so that L2 (50 MB) cannot serve them. ``err`` = rel_err(ours, cuBLAS).
* Sweep (``--no-sweep`` skips it): at M = 1 and 8, the GEMV's chosen tuning (``choose``) and
  single-step variants of it (splits /2 and x2, block_n /2 and x2, block_k /2, the other warp
  count, one more stage, the other code path: FMA <-> tl.dot), one call each; the best per
  shape is printed.
* Model: the 1B and 8B decode step at batch 1 (1k-token context), one CUDA-graph replay
  (``gpu_bench.ours_decode``), with ``kernels.GEMV`` off and on; limit = ``decode_bytes`` /
  copy rate. ``logits_rel_err`` / ``same_argmax`` compare one step's logits off vs on.

On CPU (``--device cpu``, or no CUDA) the shapes are divided by 16, both columns run
``kernels.linear`` (which is ``F.linear`` there: no Triton), times come from
``time.perf_counter`` and the model rows are skipped: it only shows the script runs.
"""

from __future__ import annotations

import argparse
import json
import math
import traceback
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F

from kvrelay import kernels
from kvrelay.benchmarks import gpu_bench, gpu_models, gpu_timing
from kvrelay.kernels.reference import rel_err
from kvrelay.workers.engine.runner import ModelRunner
from kvrelay.workers.engine.scheduler import ScheduledSeq
from kvrelay.workers.model.llama import kv_cache_shape

ROWS = (1, 2, 4, 8, 16)
SWEEP_ROWS = (1, 8)
GRAPH_CALLS = 20
GRAPH_BYTES = 200 << 20  # W copies cycled in the graph: 4x an H100/H200 L2
CPU_SCALE = 16


def projections(shape: dict[str, Any], scale: int = 1) -> dict[str, tuple[int, int]]:
    """(N, K) of each projection of a ``gpu_models.SHAPES`` entry (hidden, intermediate / scale)."""
    hidden, inter = shape["hidden_size"] // scale, shape["intermediate_size"] // scale
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim // scale
    return {"qkv": (hidden + 2 * kv, hidden), "o": (hidden, hidden),
            "gate_up": (2 * inter, hidden), "down": (hidden, inter)}  # fmt: skip


def cpu_ms(fn: Callable[[], object], iters: int = 20) -> float:
    """Median wall time of a host call (the CPU dry run's timer)."""
    return gpu_timing.host_ms(fn, iters=iters, warmup=1)


def call_ms(fn: Callable[[], object], dev: str) -> float:
    if dev == "cpu":
        return cpu_ms(fn)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=10, rep=40, return_mode="median"))


def graph_ms(
    fn: Callable[[torch.Tensor, torch.Tensor], object], x: torch.Tensor, weights: list[torch.Tensor]
) -> float:
    """One call's share of a CUDA graph of GRAPH_CALLS calls ``fn(x, w)`` cycling through
    ``weights``."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn(x, weights[0])  # compile / pick kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(GRAPH_CALLS):
            fn(x, weights[i % len(weights)])
    ms = float(triton.testing.do_bench(graph.replay, warmup=5, rep=40, return_mode="median"))
    return ms / GRAPH_CALLS


def gemv_rows(name: str, shape: dict[str, Any], dev: str, bw: float) -> list[dict[str, Any]]:
    """cuBLAS and the GEMV at every projection of one model shape and every M in ROWS."""
    if dev == "cuda":
        from kvrelay.kernels.triton_gemv import gemv as ours
    else:
        ours = kernels.linear  # F.linear on CPU
    rows = []
    for proj, (n, k) in projections(shape, 1 if dev == "cuda" else CPU_SCALE).items():
        g = torch.Generator(dev).manual_seed(n + k)
        w = (torch.randn(n, k, generator=g, device=dev) / k**0.5).to(torch.bfloat16)
        n_copies = min(GRAPH_CALLS, math.ceil(GRAPH_BYTES / w.nbytes)) if dev == "cuda" else 1
        copies = [w] + [w.clone() for _ in range(n_copies - 1)]
        for m in ROWS:
            x = torch.randn(m, k, generator=g, device=dev).to(torch.bfloat16)
            nbytes = w.nbytes + x.nbytes + m * n * 2
            row: dict[str, Any] = dict(model=name, proj=proj, n=n, k=k, m=m, bytes=nbytes)
            row["err"] = rel_err(ours(x, w), F.linear(x, w))
            for col, fn in (("cublas", F.linear), ("gemv", ours)):
                row[f"{col}_call_us"] = call_ms(partial(fn, x, w), dev) * 1e3
                if dev == "cuda":
                    row[f"{col}_graph_us"] = graph_ms(fn, x, copies) * 1e3
            for key in [c for c in row if c.endswith("_us")]:
                gbs = nbytes / row[key] / 1e3
                row[key.replace("_us", "_frac")] = gbs / bw
            rows.append(row)
            times = " | ".join(
                f"{key[:-3]} {row[key]:7.1f} us ({row[key[:-3] + '_frac']:.2f})"
                for key in row
                if key.endswith("_us")
            )
            print(f"{name} {proj:7s} N={n:5d} K={k:5d} M={m:2d}: {times} | err {row['err']:.1e}",
                  flush=True)  # fmt: skip
        del copies
    return rows


def sweep_rows(name: str, shape: dict[str, Any], dev: str, bw: float) -> list[dict[str, Any]]:
    """The chosen tuning and its single-step variants, one call each (main runs it on CUDA only;
    on CPU it needs TRITON_INTERPRET=1)."""
    from kvrelay.kernels.triton_decode import sm_count
    from kvrelay.kernels.triton_gemv import DOT_M, choose, gemv

    sms = sm_count(torch.device(dev))
    rows = []
    for proj, (n, k) in projections(shape, 1 if dev == "cuda" else CPU_SCALE).items():
        w = (torch.randn(n, k, device=dev) / k**0.5).to(torch.bfloat16)
        for m in SWEEP_ROWS:
            x = torch.randn(m, k, device=dev).to(torch.bfloat16)
            base = choose(m, n, k, 2, sms)
            variants = dict.fromkeys([
                base, base._replace(splits=max(1, base.splits // 2)),
                base._replace(splits=min(64, base.splits * 2)),
                base._replace(block_n=max(16, base.block_n // 2)),
                base._replace(block_n=base.block_n * 2), base._replace(block_k=base.block_k // 2),
                base._replace(num_warps=12 - base.num_warps),
                base._replace(num_stages=base.num_stages + 1),
                base._replace(block_m=1 if base.block_m > 1 else DOT_M),
            ])  # fmt: skip
            results = []
            for t in variants:
                try:
                    us = call_ms(partial(gemv, x, w, None, t), dev) * 1e3
                except Exception as exc:  # e.g. a variant's tiles exceed shared memory
                    results.append(dict(tuning=t._asdict(), us=math.inf, error=repr(exc)[:300]))
                    continue
                nbytes = w.nbytes + x.nbytes + m * n * 2
                results.append(dict(tuning=t._asdict(), us=us, frac=nbytes / us / 1e3 / bw))
            best = min(results, key=lambda r: r["us"])
            rows.append(dict(model=name, proj=proj, n=n, k=k, m=m, chosen=results[0], best=best,
                             variants=results))  # fmt: skip
            print(f"sweep {name} {proj:7s} M={m:2d}: chosen {results[0]['us']:7.1f} us "
                  f"({results[0]['frac']:.2f}) | best {best['us']:7.1f} us ({best['frac']:.2f}) "
                  f"{best['tuning']}", flush=True)  # fmt: skip
    return rows


def model_rows(name: str, bw: float) -> list[dict[str, Any]]:
    """The decode graph step at batch 1, kernels.GEMV off and on (gpu_models' model,
    gpu_bench's timing)."""
    hf, model, config = gpu_models.build(gpu_models.SHAPES[name])
    del hf
    torch.cuda.empty_cache()
    nblocks = -(-gpu_models.CTX // gpu_models.BS) + 16
    cache = torch.empty(
        kv_cache_shape(config, nblocks, gpu_models.BS), dtype=torch.bfloat16, device="cuda"
    )
    cache.normal_(0, 0.5)
    items = [ScheduledSeq(s, 1) for s in gpu_models.make_seqs(1, gpu_models.CTX, 0, 1)]
    rows, logits = [], {}
    for on in (False, True):
        kernels.GEMV = on
        runner = ModelRunner(model, cache, gpu_models.BS)
        gpu_bench.ours_decode(runner, model, config, bw, batches=(1,))
        logits[on] = runner.run(items)[0].clone()
        decode = gpu_bench.RESULTS["decode"][1]
        rows.append(dict(model=name, gemv=on, gpu_ms=decode["gpu_ms"], step_ms=decode["step_ms"],
                         limit_ms=decode["limit_ms"],
                         frac=decode["limit_ms"] / decode["gpu_ms"]))  # fmt: skip
        runner = None  # type: ignore[assignment]
        torch.cuda.empty_cache()
    kernels.GEMV = False
    for row in rows:
        row["logits_rel_err"] = rel_err(logits[True], logits[False])
        row["same_argmax"] = bool(torch.equal(logits[True].argmax(-1), logits[False].argmax(-1)))
    off, on_ = rows
    print(f"model {name} b=1: graph step off {off['gpu_ms']:.3f} ms ({off['frac']:.2f} of limit) "
          f"| on {on_['gpu_ms']:.3f} ms ({on_['frac']:.2f}) | logits rel err "
          f"{off['logits_rel_err']:.1e}, same argmax {off['same_argmax']}", flush=True)  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--no-sweep", action="store_true", help="skip the tuning sweep")
    ap.add_argument("--no-model", action="store_true", help="skip the whole-model decode rows")
    ap.add_argument("--out", default=None, help="JSON file, rewritten after each section")
    args = ap.parse_args()
    dev = args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu"
    result: dict[str, Any] = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                              "args": vars(args), "gemv": [], "model": [], "sweep": []}  # fmt: skip

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1, default=str)

    if dev == "cuda":
        bw, _ = gpu_models.ceilings()
    else:  # the same measurement with the host's clock
        a = torch.randn(1 << 26)
        b = torch.empty_like(a)
        bw = 2 * a.nbytes / cpu_ms(lambda: b.copy_(a), iters=5) / 1e6
    result["copy_gbs"] = bw
    print(f"# gemv_bench on {result['device']}: copy {bw:.0f} GB/s (read + write)", flush=True)
    names = args.models.split(",")
    sections: list[tuple[str, str, Callable[[], list[dict[str, Any]]]]] = [
        ("gemv", name, partial(gemv_rows, name, gpu_models.SHAPES[name], dev, bw)) for name in names
    ]
    if dev == "cuda" and not args.no_model:
        sections += [("model", name, partial(model_rows, name, bw)) for name in names]
    if dev == "cuda" and not args.no_sweep:
        sections += [
            ("sweep", name, partial(sweep_rows, name, gpu_models.SHAPES[name], dev, bw))
            for name in names
        ]
    failed = False
    for section, name, run in sections:
        try:
            result[section] += run()
        except Exception:  # report and carry on: the other sections still count
            print(f"{section} {name} FAILED:\n{traceback.format_exc()}", flush=True)
            result.setdefault("failed", []).append(f"{section} {name}")
            failed = True
        save()
        if dev == "cuda":
            torch.cuda.empty_cache()
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
