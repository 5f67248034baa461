"""The served path's ceiling (issue 17): tokens/s and CPU per token of each process between a
worker's engine and the client, with tokens as cheap as a real model makes them.

    python benchmarks/serve_path_bench.py --tokenizer DIR [--batches 32 128 --prompt 16
        --max-tokens 256 --reps 3] [--py-spy BIN --out DIR]

serve_ratio.py's served side (``Cluster.start``, one colocated worker, N concurrent gRPC streams
of ``AsyncClient.generate_stream`` from a separate client process, greedy, ``ignore_eos``) over
gpu_serve.py's ``micro`` model (one layer, hidden 64, 512-token vocabulary, fp32 on the CPU), so
that the engine's step is a small share of the work and the rest of the path (the worker's
sink -> Ray -> controller actor -> event stream -> frontends in the driver -> gRPC -> client)
sets the rate. Per rep: tokens/s over the decode window and end to end (serve_ratio's
``window``), and the CPU time (user + system, all threads, from /proc) each process spent during
the rep, per token the clients received: worker, controller actor, driver (frontends + Ray),
client (``--threads``: split by thread name). On a shared 2-core box the rates follow the
neighbours; the CPU per token does much less.
Checks per rep: the clients received N*T tokens, the server's ``usage`` says the same, and the
worker's engine computed N*(T-1) decode tokens and N*P prompt tokens (its first token comes from
the prefill step). ``--py-spy``: record the controller and driver with py-spy (``--nonblocking``,
collapsed stacks into ``--out``) during the first rep of the largest batch. Also per rep, counted:
the worker's ``on_events`` calls, the event stream's objects and the gRPC messages per token, the
driver's Ray calls per request. ``--controller-share S``: the controller process runs S of every
10 ms during the reps (SIGSTOP / SIGCONT), so that it is the stage that falls behind.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from kvrelay.benchmarks.gpu_serve import SHAPES, make_model
from kvrelay.benchmarks.multiturn_bench import settled_stats, stats_delta
from kvrelay.benchmarks.serve_ratio import (
    count_line,
    cpu_s,
    path_counts,
    path_pids,
    prompts,
    serve_config,
    stream_load,
    summary,
    thread_cpu_s,
    window,
)
from kvrelay.cluster.runtime.serve import Cluster

PROCS = ("worker", "controller", "driver", "client")
SPY_FLAGS = os.environ.get("SPY_FLAGS", "--nonblocking --gil").split()


def clean_outputs(model_dir: Path) -> Path:
    """Zero the embedding rows (tied to the LM head: logit 0) of the micro model's tokens that
    are not valid UTF-8 alone (115 of its 512). Its random weights make each greedy request
    repeat one token; one of those would keep the detokenizer's text ending in U+FFFD, so its
    window never slides and every step decodes the whole output so far (quadratic in T: that
    pathology, not the path, would set the rate)."""
    from safetensors.torch import load_file, save_file

    from kvrelay.workers.model.source import load_tokenizer

    _, tok, _ = load_tokenizer(str(model_dir))
    weights = load_file(model_dir / "model.safetensors")
    emb = weights["model.embed_tokens.weight"]  # [vocab, hidden]
    bad = [i for i in range(emb.shape[0]) if "\ufffd" in tok.decode([i])]
    emb[bad] = 0.0
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    return model_dir


def by_thread(before: dict[str, float], after: dict[str, float], tokens: int) -> str:
    moved = {k: 1e6 * (v - before.get(k, 0.0)) / tokens for k, v in after.items()}
    return ", ".join(f"{k} {v:.1f}" for k, v in sorted(moved.items(), key=lambda x: -x[1])[:6])


def py_spy(binary: str, pid: int, seconds: int, path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [binary, "record", "--pid", str(pid), "--duration", str(seconds), *SPY_FLAGS,
         "--format", "raw", "--output", str(path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip


@contextlib.contextmanager
def throttled(pid: int, share: float | None, period_s: float = 0.01) -> Iterator[None]:
    """``share`` of every ``period_s`` the process runs, the rest it is stopped (SIGSTOP /
    SIGCONT from a thread here): a stage made the slowest of the path, to see how the path
    behaves when that stage falls behind. None: not throttled."""
    if share is None:
        yield
        return
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(period_s * (1 - share))
            os.kill(pid, signal.SIGCONT)
            time.sleep(period_s * share)

    thread = threading.Thread(target=cycle, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        os.kill(pid, signal.SIGCONT)


def run(args: argparse.Namespace, pool: Any) -> list[dict[str, Any]]:
    vocab = SHAPES["micro"]["vocab_size"]
    rows = []
    with Cluster.start(serve_config(args)) as cluster:
        pids = path_pids(cluster, [pool])
        for n in args.batches:
            pool.apply(stream_load, (cluster.ports["grpc_port"], prompts(n, 8, n, vocab), 16))
            for r in range(args.reps):
                batch = prompts(n, args.prompt, 1000 + r, vocab)
                spies = []
                if args.py_spy and n == max(args.batches) and r == 0:
                    spies = [
                        py_spy(args.py_spy, pids[p], args.spy_s, Path(args.out) / f"{p}.txt")
                        for p in PROCS
                    ]
                before, c0 = settled_stats(cluster), cpu_s(pids)
                t0s = {p: thread_cpu_s(pids[p]) for p in PROCS}
                counts0 = path_counts(cluster)
                with throttled(pids["controller"], args.controller_share):
                    arrivals, t0, usage = pool.apply(
                        stream_load, (cluster.ports["grpc_port"], batch, args.max_tokens)
                    )
                c1 = cpu_s(pids)
                t1s = {p: thread_cpu_s(pids[p]) for p in PROCS}
                counts1 = path_counts(cluster)  # a controller call: after its CPU is read
                objects = counts1["stream_objects"] - counts0["stream_objects"]
                [moved] = stats_delta(settled_stats(cluster), before).values()
                for s in spies:
                    s.wait()
                row = summary(window(arrivals, t0))
                tokens = row["tokens"]
                row |= {
                    "batch": n,
                    "rep": r,
                    "usage_tokens": sum(usage),
                    "tokens_per_chunk": tokens / sum(len(a) for a in arrivals),
                    "stream_objects": objects,
                    "engine": {k: moved[k] for k in ("decode_tokens_computed",
                                                     "prompt_tokens_computed")},
                    "cpu_us_per_token": {p: 1e6 * (c1[p] - c0[p]) / tokens for p in PROCS},
                }  # fmt: skip
                row["counters_agree"] = (
                    tokens == row["usage_tokens"] == n * args.max_tokens
                    and row["engine"]["decode_tokens_computed"] == n * (args.max_tokens - 1)
                    and row["engine"]["prompt_tokens_computed"] == n * args.prompt
                )
                row["per_token"], counted = count_line(
                    counts0, counts1, tokens, sum(map(len, arrivals)), n
                )
                rows.append(row)
                if args.threads:
                    for p in PROCS:
                        print(f"  {p} threads, CPU us/token: {by_thread(t0s[p], t1s[p], tokens)}")
                cpu = " ".join(f"{p} {v:.1f}" for p, v in row["cpu_us_per_token"].items())
                print(
                    f"N={n} rep {r}: window {row['window_tok_s']:.0f} tok/s, e2e "
                    f"{row['e2e_tok_s']:.0f} tok/s, ITL p50 {row['itl_ms']['p50']:.2f} ms, "
                    f"{row['tokens_per_chunk']:.2f} tokens/chunk, {objects} stream objects; CPU "
                    f"us/token: {cpu}; tokens {tokens}, usage {row['usage_tokens']}, engine "
                    f"{row['engine']}, {'ok' if row['counters_agree'] else 'MISMATCH'}",
                    flush=True,
                )
                print(counted, flush=True)
        assert not cluster.call("debug_flights"), "requests left in flight"
    return rows


def report(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    print(f"\n## served path, micro model fp32 on cpu, P={args.prompt} T={args.max_tokens}")
    print(" N | window tok/s median (min-max) | e2e tok/s median | CPU us/token median: "
          + " / ".join(PROCS) + " | path (controller+driver+client)")  # fmt: skip
    for n in args.batches:
        mine = [x for x in rows if x["batch"] == n]
        win = [x["window_tok_s"] for x in mine]
        cpu = {p: statistics.median(x["cpu_us_per_token"][p] for x in mine) for p in PROCS}
        path = [sum(x["cpu_us_per_token"][p] for p in PROCS[1:]) for x in mine]
        print(
            f" {n} | {statistics.median(win):.0f} ({min(win):.0f}-{max(win):.0f}) | "
            f"{statistics.median(x['e2e_tok_s'] for x in mine):.0f} | "
            + " / ".join(f"{cpu[p]:.1f}" for p in PROCS)
            + f" | {statistics.median(path):.1f} ({min(path):.1f}-{max(path):.1f})"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per request (P)")
    ap.add_argument("--max-tokens", type=int, default=256, help="output tokens per request (T)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--py-spy", default=None, help="py-spy binary: profile the first big rep")
    ap.add_argument("--spy-s", type=int, default=8, help="seconds py-spy records")
    ap.add_argument("--threads", action="store_true", help="CPU per token by thread name")
    ap.add_argument(
        "--controller-share",
        type=float,
        default=None,
        help="run the controller only this share of each 10 ms (SIGSTOP/SIGCONT) during reps",
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    # what serve_config reads (serve_ratio's CPU settings)
    args.device, args.dtype, args.kv_cache_gb, args.max_batched_tokens = (
        "cpu", "float32", 0.25, 2048,
    )  # fmt: skip
    Path(args.out).mkdir(parents=True, exist_ok=True)
    args.model_dir = clean_outputs(
        make_model(
            Path("/tmp/kvrelay-micro-float32"), Path(args.tokenizer), torch.float32, "micro", "cpu"
        )
    )
    print(f"load average at start: {os.getloadavg()}", flush=True)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        rows = run(args, pool)
    report(args, rows)
    ok = all(x["counters_agree"] for x in rows)
    print(f"load average at end: {os.getloadavg()}; counters", "AGREE" if ok else "DISAGREE")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
