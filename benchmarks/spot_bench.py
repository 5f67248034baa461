"""Spot-availability trace replay under load (issue 6): our notice → migration plan against two
baselines, on a real local 2P+2D Ray cluster.

    .venv/bin/python benchmarks/spot_bench.py [--trace benchmarks/data/spot_trace.csv]
        [--duration 80 --rate 0.3 --seed 0 --victim slot|busiest]
        [--policies ours,drop,replay] [--json out] [--md out]

Load: open-loop Poisson arrivals at ``--rate`` req/s for ``--duration`` s (the same schedule,
prompts and parameters for every policy: ``--seed``); prompts of 64–192 random token ids,
64–128 output tokens, greedy, EOS ignored. Each request streams in its own client thread.

Trace (``benchmarks/data/spot_trace.csv``, documented in its header): at ``time_s`` a notice for
an initial worker (role + slot) with ``notice_s`` of grace, or a replacement worker joining
(``add_worker``; the model loads while the load runs). With ``--victim busiest`` a notice hits
the worker of its role with the most requests in flight at that moment instead of the trace's
slot. Policies, each on a fresh cluster:

- ``ours``: ``notify_preemption(worker, now + notice_s)`` at the notice (the controller plans:
  finish in place, migrate KV, or recompute), the worker is killed at the deadline;
- ``drop``: at the notice the requests in flight on the worker are cancelled (counted lost) and
  the worker is killed;
- ``replay``: the worker is killed at the notice with no plan; the controller's crash recovery
  re-submits prompt + committed tokens to survivors (Dynamo's token replay).

Figures: requests lost (not completed with all their tokens); tokens computed beyond an
undisturbed run = Σ over workers (the killed ones read just before the kill) of prompt + decode
tokens computed, minus Σ over requests of (prompt + delivered − 1): what moving a request
without its KV re-prefilled (plus, for ``drop``, the partial prefills thrown away); latency
p50/p99 over completed requests, all and those in flight at a notice; controller counters
(resubmissions, migrations, migration recomputes). Token counts do not depend on machine load;
latencies do (``os.getloadavg()`` is recorded at start and end).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import csv
import heapq
import itertools
import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvrelay.benchmarks.multiturn_bench import (
    STAT_FIELDS,
    counters_delta,
    pct,
    settled_stats,
    stats_delta,
)
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.types import SamplingParams

POLICIES = ("ours", "drop", "replay")
DEFAULT_TRACE = Path(__file__).resolve().parent / "data" / "spot_trace.csv"


@dataclass(frozen=True, slots=True)
class TraceEvent:
    time_s: float
    event: str  # notice | join
    role: str  # prefill | decode
    slot: int  # notice: index among the initial workers of the role; join: -1
    notice_s: float


def read_trace(path: Path) -> list[TraceEvent]:
    with open(path, encoding="utf-8") as f:
        rows = list(csv.DictReader(line for line in f if not line.lstrip().startswith("#")))
    out = []
    for n, r in enumerate(rows, 1):
        try:
            ev = TraceEvent(float(r["time_s"]), r["event"].strip(), r["role"].strip(),
                            int(r["slot"]) if (r.get("slot") or "").strip() else -1,
                            float(r["notice_s"]) if (r.get("notice_s") or "").strip() else 0.0)
        except (KeyError, ValueError, AttributeError) as exc:
            raise SystemExit(f"{path}: row {n}: {exc!r}") from None
        if ev.event not in ("notice", "join") or ev.role not in ("prefill", "decode"):
            raise SystemExit(f"{path}: row {n}: unknown event/role {ev}")
        if ev.event == "notice" and (ev.slot < 0 or ev.notice_s < 0):
            raise SystemExit(f"{path}: row {n}: a notice needs a slot and notice_s >= 0")
        out.append(ev)
    return sorted(out, key=lambda e: e.time_s)


@dataclass(slots=True)
class Req:
    idx: int
    at: float  # arrival offset from the start of the load
    prompt: list[int]
    max_tokens: int
    submitted: float = float("nan")
    first: float = float("nan")
    finished: float = float("nan")
    tokens: list[int] = field(default_factory=list)
    reason: str = ""

    @property
    def completed(self) -> bool:
        return self.reason == "length" and len(self.tokens) == self.max_tokens


def workload(duration: float, rate: float, seed: int, vocab: int) -> list[Req]:
    rng = random.Random(seed)
    out: list[Req] = []
    t = rng.expovariate(rate)
    while t < duration:
        n = rng.randint(64, 192)
        out.append(Req(len(out), t, [rng.randrange(1000, vocab) for _ in range(n)],
                       rng.randint(64, 128)))
        t += rng.expovariate(rate)
    return out


def _inflight_on(controller: Any, worker_id: str) -> list[str]:
    """Runs in the controller (``__ray_call__``): requests the worker prefills or decodes."""
    w = controller.state.workers.get(worker_id)
    if w is None:
        return []
    return [r for r in w.assigned if (f := controller.state.flights.get(r)) is not None and not f.done]


def _final_stats(cluster: Cluster, worker_id: str) -> dict[str, Any]:
    """A worker's engine counters read from the worker itself (exact up to this call)."""
    import ray

    hb: Any = ray.get(ray.get_actor(f"kvrelay-worker-{worker_id}").heartbeat.remote(), timeout=30)
    return {"role": hb.role, **{k: int(getattr(hb.stats, k, 0)) for k in STAT_FIELDS}}


class Replay:
    def __init__(self, cluster: Cluster, policy: str, trace: list[TraceEvent], reqs: list[Req],
                 busiest: bool = False):
        self.c, self.policy, self.trace, self.reqs = cluster, policy, trace, reqs
        self.busiest = busiest
        self.at_stake: list[int] = []  # requests in flight on the leaving worker, per notice
        workers = cluster.workers()
        self.slots = {r: [w for w, role in workers.items() if role == r]
                      for r in ("prefill", "decode")}
        self.dead: dict[str, dict[str, Any]] = {}  # killed worker -> its final counters
        self.lost_at_notice: set[str] = set()
        self.log: list[tuple[float, str]] = []
        self.notice_times: list[float] = []
        self.joins: list[threading.Thread] = []
        self.t0 = 0.0
        self.seq = itertools.count()

    def _note(self, what: str) -> None:
        self.log.append((round(time.perf_counter() - self.t0, 2), what))

    def _run_req(self, r: Req) -> None:
        params = SamplingParams(max_tokens=r.max_tokens, temperature=0.0, ignore_eos=True)
        r.submitted = time.perf_counter()
        try:
            for ev in self.c.generate(self.c.request(r.prompt, params, request_id=f"r{r.idx}")):
                if ev.token_ids and not r.tokens:
                    r.first = time.perf_counter()
                r.tokens += ev.token_ids
                if ev.finish_reason is not None:
                    r.reason = ev.finish_reason.value
        except Exception as exc:
            r.reason = f"error: {exc!r}"[:200]
        r.finished = time.perf_counter()

    def _kill(self, wid: str) -> None:
        try:
            self.dead[wid] = _final_stats(self.c, wid)
        except Exception as exc:  # counted as missing in the report, never silently
            self._note(f"stats of {wid} unreadable: {exc!r}")
        self.c.kill_worker(wid)
        self._note(f"killed {wid}")

    def _victim(self, ev: TraceEvent) -> str:
        """The trace's slot, or (``busiest``) the live worker of the role with the most
        requests in flight: the notice that puts the most work at stake."""
        if not self.busiest:
            return self.slots[ev.role][ev.slot]
        live = [w for w, role in self.c.workers().items() if role == ev.role]
        return max(live, key=lambda w: len(self.c.call("__ray_call__", _inflight_on, w)))

    def _notice(self, ev: TraceEvent, heap: list[tuple[float, int, str, Any]]) -> None:
        wid = self._victim(ev)
        self.at_stake.append(len(self.c.call("__ray_call__", _inflight_on, wid)))
        self.notice_times.append(time.perf_counter())
        self._note(f"notice {wid} ({ev.role}) {ev.notice_s:.0f} s")
        if self.policy == "ours":
            self.c.call("notify_preemption", wid, time.time() + ev.notice_s)
            heapq.heappush(heap, (ev.time_s + ev.notice_s, next(self.seq), "kill", wid))
            return
        if self.policy == "drop":
            rids = list(self.c.call("__ray_call__", _inflight_on, wid))
            for rid in rids:
                self.c.call("cancel", rid)
            self.lost_at_notice.update(rids)
            self._note(f"dropped {len(rids)} requests")
        self._kill(wid)

    def _join(self, ev: TraceEvent) -> None:
        def add() -> None:
            wid = self.c.call("add_worker", ev.role)
            self._note(f"joined {wid} ({ev.role})")

        t = threading.Thread(target=add, name=f"join-{ev.role}")
        t.start()
        self.joins.append(t)

    def run(self, drain_timeout_s: float) -> float:
        # (time, tie-break sequence number, action, payload); the numbers keep payloads uncompared
        heap: list[tuple[float, int, str, Any]] = [(r.at, next(self.seq), "arrive", r)
                                                   for r in self.reqs]
        heap += [(e.time_s, next(self.seq), e.event, e) for e in self.trace]
        heapq.heapify(heap)
        pool = cf.ThreadPoolExecutor(max(1, len(self.reqs)))
        futs = []
        self.t0 = time.perf_counter()
        while heap:
            at, _, kind, payload = heapq.heappop(heap)
            delay = self.t0 + at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)  # open loop: act at the scheduled time
            if kind == "arrive":
                futs.append(pool.submit(self._run_req, payload))
            elif kind == "notice":
                self._notice(payload, heap)
            elif kind == "join":
                self._join(payload)
            else:
                self._kill(payload)
        cf.wait(futs, timeout=drain_timeout_s)
        for t in self.joins:
            t.join(timeout=drain_timeout_s)
        pool.shutdown(wait=False, cancel_futures=True)
        return time.perf_counter() - self.t0


def run_policy(policy: str, trace: list[TraceEvent], reqs: list[Req], drain_timeout_s: float,
               busiest: bool = False) -> dict[str, Any]:
    load0 = os.getloadavg()
    cluster = Cluster.start(ServeConfig(prefill_workers=2, decode_workers=2, grpc_port=None,
                                        http_port=None, threads_per_worker=1))
    try:
        warm = list(range(1000, 1100))
        with cf.ThreadPoolExecutor(4) as pool:
            list(pool.map(lambda i: cluster.complete(
                [i, *warm], SamplingParams(max_tokens=4, temperature=0.0)), range(4)))
        base, base_counters = settled_stats(cluster), cluster.counters()
        replay = Replay(cluster, policy, trace, reqs, busiest)
        wall = replay.run(drain_timeout_s)
        live = settled_stats(cluster)
        counters = counters_delta(cluster.counters(), base_counters)
        records = cluster.call("migration_records")
        integrity = cluster.integrity()
    finally:
        cluster.shutdown()
    per_worker = stats_delta({**replay.dead, **live}, base)
    computed = sum(r["prompt_tokens_computed"] + r["decode_tokens_computed"]
                   for r in per_worker.values())
    useful = sum(len(r.prompt) + len(r.tokens) - 1 for r in reqs if r.tokens)
    done = [r for r in reqs if r.completed]
    hit = [r for r in done if any(r.submitted < t < r.finished for t in replay.notice_times)]
    outcomes: dict[str, int] = {}
    for rec in records:
        for o in rec["outcomes"].values():
            key = o.split(":")[0]
            outcomes[key] = outcomes.get(key, 0) + 1
    return {
        "policy": policy,
        "loadavg_start": load0, "loadavg_end": os.getloadavg(),
        "requests": len(reqs), "completed": len(done), "lost": len(reqs) - len(done),
        "dropped_at_notice": len(replay.lost_at_notice),
        "in_flight_on_leaving": replay.at_stake,
        "lost_reasons": sorted({r.reason for r in reqs if not r.completed}),
        "tokens_computed": computed, "tokens_needed": useful,
        "excess_tokens": computed - useful,
        "latency_s": pct([r.finished - r.submitted for r in done]),
        "latency_at_notice_s": pct([r.finished - r.submitted for r in hit]),
        "ttft_s": pct([r.first - r.submitted for r in done]),
        "wall_s": wall,
        "counters": counters,
        "migration_outcomes": outcomes,
        "migration_records": records,
        "engine_recompute_preemptions": sum(r["recompute_preemptions"]
                                            for r in per_worker.values()),
        "per_worker": per_worker,
        "workers_without_final_stats": [w for w in base if w not in per_worker],
        "events": replay.log,
        "integrity": integrity,
        "outputs": {r.idx: r.tokens for r in done},
    }


def markdown(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    def lat(r: dict[str, Any], key: str) -> str:
        p = r[key]
        return f"{p['p50']:.1f} / {p['p99']:.1f} (n={p['n']})"

    rows = [
        ("requests on the leaving worker, per notice",
         lambda r: " + ".join(map(str, r.get("in_flight_on_leaving", [])))),
        ("requests lost", lambda r: f"{r['lost']} / {r['requests']}"),
        ("tokens computed beyond an undisturbed run",
         lambda r: f"{r['excess_tokens']:,} (of {r['tokens_computed']:,})"),
        ("resubmissions (crash recovery)", lambda r: str(r["counters"]["resubmissions"])),
        ("KV migrations / migration recomputes",
         lambda r: f"{r['counters']['migrations']} / {r['counters']['migration_recomputes']}"),
        ("plan outcomes", lambda r: ", ".join(f"{k} {v}" for k, v in
                                               sorted(r["migration_outcomes"].items())) or "—"),
        ("latency p50 / p99 (s), completed", lambda r: lat(r, "latency_s")),
        ("latency p50 / p99 (s), in flight at a notice", lambda r: lat(r, "latency_at_notice_s")),
        ("TTFT p50 / p99 (s)", lambda r: lat(r, "ttft_s")),
        ("engine recompute preemptions", lambda r: str(r["engine_recompute_preemptions"])),
        ("loadavg start → end (1 min)",
         lambda r: f"{r['loadavg_start'][0]:.1f} → {r['loadavg_end'][0]:.1f}"),
    ]
    names = {"ours": "ours (notice → plan)", "drop": "drop in-flight",
             "replay": "token replay (Dynamo)"}
    lines = ["| | " + " | ".join(names[r["policy"]] for r in results) + " |",
             "| --- |" + " ---: |" * len(results)]
    lines += [f"| {label} | " + " | ".join(fn(r) for r in results) + " |" for label, fn in rows]
    common = set.intersection(*(set(r["outputs"]) for r in results)) if results else set()
    same = sum(len({json.dumps(r["outputs"][i]) for r in results}) == 1 for i in common)
    lines += ["", f"Greedy outputs identical across policies for requests completed in all: "
              f"{same}/{len(common)}.",
              f"Load: Poisson {args.rate} req/s for {args.duration:.0f} s (seed {args.seed}), "
              f"prompts 64–192 tokens, outputs 64–128 tokens; trace {args.trace}, "
              f"victim: {args.victim}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=str(DEFAULT_TRACE))
    ap.add_argument("--duration", type=float, default=80.0)
    ap.add_argument("--rate", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--drain-timeout", type=float, default=240.0)
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--victim", choices=("slot", "busiest"), default="slot",
                    help="which worker a notice hits: the trace's slot, or the busiest one of "
                         "its role at that moment")
    ap.add_argument("--json", default=None)
    ap.add_argument("--md", default=None)
    args = ap.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not policies or any(p not in POLICIES for p in policies):
        ap.error(f"--policies: a comma list of {POLICIES}")
    if args.duration <= 0 or args.rate <= 0:
        ap.error("--duration and --rate must be positive")
    trace = read_trace(Path(args.trace))
    import ray

    from kvrelay.workers.model.source import load_tokenizer

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cfg, _, _ = load_tokenizer(None)
    ray.init(num_cpus=8, include_dashboard=False, _node_ip_address="127.0.0.1",
             namespace="kvrelay", log_to_driver=bool(os.environ.get("KVRELAY_RAY_LOGS")))
    results = []
    try:
        for policy in policies:
            reqs = workload(args.duration, args.rate, args.seed, cfg.vocab_size)
            r = run_policy(policy, trace, reqs, args.drain_timeout, args.victim == "busiest")
            print(json.dumps({k: v for k, v in r.items()
                              if k not in ("outputs", "per_worker", "migration_records")},
                             indent=1, default=str), flush=True)
            results.append(r)
    finally:
        ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results, args)
    print(md)
    if args.md:
        Path(args.md).write_text(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
