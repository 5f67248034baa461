"""Goodput under Gamma (bursty) arrivals at equal worker count: fixed PD vs colocated vs PD with
the SLO-aware pool-sizing planner on, driven through the OpenAI HTTP API by ``loadgen.py``.

    .venv/bin/python benchmarks/goodput_bench.py [--workers 3] [--sweep 1,2,3,4,6] \
        [--num-requests 60] [--configs pd,colocated,planner,pd_start] [--pd-split 2,1] \
        [--planner-start 1,2] [--autosize-interval-s 2 --autosize-window-s 10] \
        [--ttft-slo 2 --itl-slo 0.25] [--warmup 6] [--out benchmarks/results] \
        [--long-fraction 0.2 --long-prompt-range 1024,7936] [--repeats 3]

Configurations (every one with ``--workers`` workers, 1 torch thread each):

* ``pd``: fixed prefill/decode split ``--pd-split`` (P,D);
* ``colocated``: every worker does both;
* ``planner``: starts at ``--planner-start`` (P,D) with ``auto_pool_sizing`` on, so the planner
  (cluster/sizing/pool_sizing.py via cluster/sizing/autosize.py) has a mis-sized split to correct;
* ``pd_start``: optional, the planner's starting split held fixed (what the planner saves).
* ``semi_pd``: optional, ONE semi-PD worker (workers/semi_pd/: prefill and decode lanes over one
  KV storage, handoff by block ids, SM shares by green contexts on CUDA, the SLO-aware split on)
  owning the whole device — issue 16's configuration, with the serving defaults (the prefill
  lane overlapped, its share from ``--semi-pd-start``);
* ``colocated1``: optional, its strongest colocated baseline: ONE colocated worker owning the
  whole device, with chunked prefill: 512 tokens a step, ``colocated1@TOKENS`` another budget
  (sweep it: the strongest chunk is the baseline; any configuration takes ``@TOKENS``).
* ``semi_pd_plain``: optional, ``semi_pd`` with both lanes the plain step (the default until
  2026-12-06).
* ``semi_pd_overlap``: optional, ``semi_pd_plain`` with the overlapped decode lane
  (``--semi-pd-decode-overlap``: its freed blocks held until its steps are done).
* ``semi_pd_poverlap``: optional, ``semi_pd`` with the overlapped prefill lane, named
  (``--semi-pd-prefill-overlap``: the host schedules the next chunk while this one computes).
* ``semi_pd_both``: optional, ``semi_pd`` with both lanes overlapped. Any semi-PD configuration
  takes ``%SHARE``, its prefill SM share (``semi_pd_poverlap%90``).
* ``semi_pd_ftd``: optional, ``semi_pd`` with each first token sent by the decode lane as it
  adopts the request (``--semi-pd-first-token decode``).
* ``semi_pd_lockf``: optional, ``semi_pd`` whose prefill lane hands the storage lock to the
  decode lane between two admissions while it waits (``--semi-pd-decode-lock-first``);
  ``semi_pd_ftd_lockf`` both.
* ``semi_pd_fixed``: optional, ``semi_pd`` held at ``--semi-pd-fixed-split`` (the rule off),
  to compare with an adaptive ``semi_pd`` in one run (``--semi-pd-fixed`` fixes every one).

Semi-PD configurations also print, at the end of each rate, where each lane's time went since
the last rate (``SemiPDWorker.lane_times``: the decode lane's ``cycle`` is the worker-side time
between its steps, ``forward`` its kernels under the other lane's load, ``lock_wait`` /
``relock_wait`` the storage lock, ``sink`` its events' hand-off), kept in the JSON per repeat
(``rate_ends_data``, under ``lanes``). Every configuration prints, per rate, where a token's
time between the engines and the HTTP frontend went (``Cluster.delivery_times``, under
``delivery``): each worker's event sender (``outbox_wait``: its lag behind the engine's steps;
``sink_call``: its call to the controller; ``kernel_compile``: a Triton compile that stalled
its engine, workers/engine/kernel_compiles.py), the controller's ``from_worker`` (that call's
arrival), ``stream_wait`` (until the frontend's stream took the events) and ``loop_lag`` (its
event loop waking late), and this process's ``from_controller``, ``inbox_wait`` (until a
request's HTTP stream took them), ``loop_lag`` (its frontends' loop) and its garbage
collections' pauses (``driver_gc``). The load generator prints its own loop's lag after each
rate (``client loop lag``, kept in its JSON as ``client_loop_lag_ms``): its chunks' stamps are
late by as much. What is left of the loadgen's ITL past these is the engines' cadence.

For each, a fresh local Ray cluster (HTTP frontend on a free port) is started and the load
generator runs as its own process with the same workload (seeded Gamma arrivals, shape 0.5 as
BurstGPT fits; Zipf lengths capped for this CPU) at every rate of the sweep; its exact command
line is printed, and the time each rate's run ended is stamped from its output so that the
planner's role switches (read from the controller's ``role_switches``) can be placed on the
sweep. Goodput (DistServe) = the highest rate at which >= 90% of requests meet both SLOs, every
lower rate meeting it too.

Issue 16's workload: ``--long-fraction F`` makes F of the requests long prompts
(``--long-prompt-range``, outputs < ``--long-output-tokens``) landing in bursts of 2–4 among the
chat streams, the rate counting both (loadgen_workload.py); loadgen cuts every prompt so that
prompt + output fit ``--max-context`` (default: the served model's context, read from its
config). ``--repeats N`` runs the whole sweep N times on the same cluster after the one warm-up:
the table gives each repeat's SLO attainment (with its min–max), TTFT p99 and ITL p99 per rate,
each repeat's goodput and their median; ``goodput_<config>.json`` keeps every repeat's loadgen
report (``repeats``) and command (``commands``). Repeats send the same arrivals, but repeat r > 0
draws its prompts' words from another seed (``--prompt-seed``), since a prompt the prefix cache
still holds from an earlier repeat would skip its prefill. Within one sweep every rate sends the
same prompts unless ``--fresh-prompts`` (loadgen's flag) gives each rate its own words: for
prompts of thousands of tokens the prefix cache of a large KV pool holds an earlier rate's.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from kvrelay.benchmarks import loadgen
from kvrelay.benchmarks.goodput_report import NAMES, config_name, describe, render
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.engine.phase_times import PhaseTimes
from kvrelay.workers.model.source import load_tokenizer


def loadgen_argv(url: str, args: argparse.Namespace, out_json: Path,
                 repeat: int = 0) -> list[str]:
    """The sweep's loadgen command. Repeat r > 0 sends the same arrivals with prompts of other
    words (``--prompt-seed``): the prefix cache holds repeat 0's, and a hit skips the prefill."""
    again = ["--prompt-seed", str(args.seed + 1000 * repeat)] if repeat else []
    return [
        sys.executable, "-u", "-m", "kvrelay.benchmarks.loadgen", "--url", url,
        "--endpoint", "completions", "--sweep", args.sweep,
        *(["--num-requests", str(args.num_requests)] if args.duration_s is None
          else ["--duration", str(args.duration_s)]),
        "--gamma-shape", "0.5",
        "--max-prompt-tokens", str(args.max_prompt_tokens),
        "--max-output-tokens", str(args.max_output_tokens),
        *(["--min-output-tokens", str(args.min_output_tokens)] if args.min_output_tokens > 1
          else []),
        "--ttft-slo", str(args.ttft_slo), "--itl-slo", str(args.itl_slo),
        "--timeout", str(args.run_timeout), "--request-timeout", str(args.run_timeout),
        "--seed", str(args.seed), "--json", str(out_json),
        "--long-fraction", str(args.long_fraction), "--long-prompt-range", args.long_prompt_range,
        "--long-output-tokens", str(args.long_output_tokens),
        "--max-context", str(args.max_context), *again,
        *(["--fresh-prompts"] if args.fresh_prompts else []),
    ]


def split(text: str, workers: int) -> tuple[int, int]:
    p, d = (int(x) for x in text.split(","))
    if p < 1 or d < 1 or p + d != workers:
        raise argparse.ArgumentTypeError(f"split {text!r}: P,D >= 1 each, P + D = {workers}")
    return p, d


def semi_pd_start(text: str) -> tuple[int, int]:
    """``--semi-pd-start P,D``: the semi-PD lanes' starting SM shares, percent (1..100 each)."""
    try:
        p, d = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--semi-pd-start {text!r}: expected P,D") from None
    if not (1 <= p <= 100 and 1 <= d <= 100):
        raise argparse.ArgumentTypeError(f"--semi-pd-start {text!r}: each share in 1..100")
    return p, d


def configs(args: argparse.Namespace) -> dict[str, ServeConfig]:
    base = ServeConfig(model=args.model, device=args.device, dtype=args.dtype,
                       kv_cache_gb=args.kv_cache_gb, grpc_port=None, http_port=0,
                       threads_per_worker=args.threads_per_worker,
                       ttft_slo_s=args.ttft_slo, itl_slo_s=args.itl_slo,
                       capture_graphs=True,  # a bucket's first capture would stall a sweep
                       max_num_seqs=args.max_num_seqs)
    (pp, pdd), (sp, sd) = split(args.pd_split, args.workers), split(args.planner_start, args.workers)
    xp, xd = semi_pd_start(args.semi_pd_start)
    fp, fd = semi_pd_start(args.semi_pd_fixed_split)
    fixed_tokens = ({} if args.semi_pd_fixed_tokens is None
                    else {"semi_pd_prefill_tokens": args.semi_pd_fixed_tokens})

    def semi(**extra: bool | int | str) -> ServeConfig:  # one semi-PD worker, the options' start split
        return base.model_copy(update={"prefill_workers": 0, "decode_workers": 0,
                                       "colocated_workers": 1, "semi_pd": True,
                                       "semi_pd_adaptive": not args.semi_pd_fixed,
                                       "semi_pd_prefill_sm": xp, "semi_pd_decode_sm": xd,
                                       **extra})  # fmt: skip

    every = {
        "pd": base.model_copy(update={"prefill_workers": pp, "decode_workers": pdd}),
        "colocated": base.model_copy(update={"prefill_workers": 0, "decode_workers": 0,
                                             "colocated_workers": args.workers}),
        "planner": base.model_copy(update={"prefill_workers": sp, "decode_workers": sd,
                                           "auto_pool_sizing": True,
                                           "autosize_interval_s": args.autosize_interval_s,
                                           "autosize_window_s": args.autosize_window_s}),
        "pd_start": base.model_copy(update={"prefill_workers": sp, "decode_workers": sd}),
        "semi_pd": semi(),  # the serving defaults: the prefill lane overlapped
        "semi_pd_plain": semi(semi_pd_prefill_overlap=False),  # both lanes the plain step
        "colocated1": base.model_copy(update={"prefill_workers": 0, "decode_workers": 0,
                                              "colocated_workers": 1}),
        # semi_pd with decode-first CUDA stream priorities (the lanes' kernels otherwise share
        # the block scheduler first come, first served)
        "semi_pd_first": semi(semi_pd_decode_first=True),
        "semi_pd_overlap": semi(semi_pd_decode_overlap=True, semi_pd_prefill_overlap=False),
        "semi_pd_poverlap": semi(semi_pd_prefill_overlap=True),  # the prefill lane overlapped
        "semi_pd_both": semi(semi_pd_decode_overlap=True, semi_pd_prefill_overlap=True),
        # semi_pd whose first tokens go out with the decode lane's adoption (not the prefill's)
        "semi_pd_ftd": semi(semi_pd_first_token="decode"),
        # semi_pd whose prefill lane hands the storage lock to a waiting decode lane; both
        "semi_pd_lockf": semi(semi_pd_decode_lock_first=True),
        "semi_pd_ftd_lockf": semi(semi_pd_first_token="decode", semi_pd_decode_lock_first=True),
        # semi_pd held at --semi-pd-fixed-split (the rule off), beside an adaptive semi_pd
        "semi_pd_fixed": semi(semi_pd_adaptive=False, semi_pd_prefill_sm=fp,
                              semi_pd_decode_sm=fd, **fixed_tokens),
    }
    out = {}
    for name in args.configs.split(","):
        base_name, tokens, share, seqs, policy = config_name(name)
        cfg = every[base_name]
        if tokens is not None:
            cfg = cfg.model_copy(update={"max_num_batched_tokens": tokens})
        if share is not None:
            cfg = cfg.model_copy(update={"semi_pd_prefill_sm": share})
        if seqs is not None:
            cfg = cfg.model_copy(update={"max_num_seqs": seqs})
        if policy is not None:
            cfg = cfg.model_copy(update={"policy": policy})
        out[name] = cfg
    return out


def warm_up(name: str, url: str, args: argparse.Namespace) -> None:
    """A few requests through the whole HTTP path first, so that the sweep's lowest rate does
    not pay the fresh cluster's first-request costs (they failed it in a probe run)."""
    if args.warmup <= 0:
        return
    with tempfile.TemporaryDirectory() as tmp:
        argv = loadgen_argv(url, args, Path(tmp) / "warmup.json")
        at = argv.index("--sweep")
        argv[at:at + 4] = ["--rate", "2", "--num-requests", str(args.warmup)]
        argv[argv.index("--seed") + 1] = str(args.seed + 1)
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=args.run_timeout + 60)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: warm-up loadgen exited {proc.returncode}: {proc.stderr}")


def sweep(name: str, argv: list[str], out_json: Path, t0: float,
          on_rate_end: Callable[[str], Any] | None = None) -> dict[str, Any]:
    """One loadgen sweep; its report, with the time each rate's run ended (s after ``t0``) and
    what ``on_rate_end(rate)`` returned then (``rate_ends_data``)."""
    rate_ends: dict[str, float] = {}
    rate_data: dict[str, Any] = {}
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("== rate "):
                rate = line.split()[2]
                rate_ends[rate] = round(time.time() - t0, 1)
                if on_rate_end is not None:
                    rate_data[rate] = on_rate_end(rate)
            print(f"[{name}] {line}", end="", flush=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: loadgen exited {proc.returncode}")
    report: dict[str, Any] = json.loads(out_json.read_text())
    report["rate_ends_s"] = rate_ends
    if rate_data:
        report["rate_ends_data"] = rate_data
    return report


LANE_PHASES = ("cycle", "step", "held", "forward", "lock_wait", "relock_wait", "sink",
               "command", "idle_wait", "schedule", "commit", "sample", "reclaim",
               "adopt_wait", "first_decode", "handoff_gap")  # the last three: per request


def lane_times(workers: dict[str, str], reset: bool) -> dict[str, Any]:
    """Every semi-PD worker's per-lane phase times since the last reset
    (SemiPDWorker.lane_times: workers/engine/phase_times.py)."""
    import ray

    out = {}
    for wid in workers:
        actor = ray.get_actor(f"kvrelay-worker-{wid}", namespace="kvrelay")
        out[wid] = ray.get(actor.lane_times.remote(reset=reset))
    return out


def cpu_cell(phase: dict[str, float]) -> str:
    share = phase.get("cpu_share")
    return "" if share is None else f", cpu {100 * share:.0f}%"


def lane_line(name: str, rate: str, times: dict[str, Any]) -> str:
    """One line per worker: each lane's phases as p50 / p99 / max ms (count), and the share of
    a phase's time its thread computed where it was recorded (``cpu 40%``: the rest it sat
    blocked, on a lock or on the GIL, or a CUDA wait that did not spin)."""
    parts = []
    for wid, lanes in times.items():
        for lane in ("decode", "prefill"):
            phases = lanes.get(lane, {})
            cells_ = [f"{ph} {v['p50_ms']:.1f}/{v['p99_ms']:.1f}/{v['max_ms']:.0f} "
                      f"({v['count']:.0f}{cpu_cell(v)})" for ph in LANE_PHASES
                      if (v := phases.get(ph))]  # fmt: skip
            parts.append(f"{wid} {lane}: " + ", ".join(cells_))
    return f"[{name}] lane times ms p50/p99/max (n) at rate {rate}: " + "; ".join(parts)


# the delivery line's groups and their phases, in a token's order (not the metric's hops:
# cluster/metrics/defs.py DELIVERY_HOPS)
DELIVERY_PHASES = (("workers", ("outbox_wait", "sink_call", "kernel_compile", "eager_decode",
                                 "graph_capture")),
                   ("controller", ("from_worker", "stream_wait", "loop_lag")),
                   ("driver", ("from_controller", "inbox_wait", "loop_lag")),
                   ("driver_gc", ("gen0", "gen1", "gen2")))  # fmt: skip


class GcPauses:
    """This process's garbage collections, timed per generation (``gc.callbacks``): a full
    collection of a large heap stops every thread, the frontends' loop among them."""

    def __init__(self) -> None:
        self.times = PhaseTimes()
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.times.add(f"gen{info['generation']}", time.perf_counter() - self._start)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


def delivery_line(name: str, rate: str, times: dict[str, Any]) -> str:
    """The hops in a token's order, each phase's p50 / p99 / max ms (count)."""
    def cells(phases: dict[str, Any], names: tuple[str, ...]) -> list[str]:
        return [f"{ph} {v['p50_ms']:.1f}/{v['p99_ms']:.1f}/{v['max_ms']:.0f} ({v['count']:.0f})"
                for ph in names if (v := phases.get(ph))]  # fmt: skip

    parts = []
    for hop, names in DELIVERY_PHASES:
        if hop == "workers":
            parts += [f"{wid}: " + ", ".join(cells(t, names))
                      for wid, t in times.get(hop, {}).items()]  # fmt: skip
        elif found := cells(times.get(hop, {}), names):
            parts.append(f"{hop}: " + ", ".join(found))
    return f"[{name}] delivery ms p50/p99/max (n) at rate {rate}: " + "; ".join(parts)


def split_changes(workers: dict[str, str], t0: float) -> list[dict[str, Any]]:
    """Every semi-PD worker's split-rule changes (SemiPDWorker.split_log), at seconds after
    ``t0`` (negative: during the warm-up), oldest first."""
    import ray

    out = []
    for wid in workers:
        actor = ray.get_actor(f"kvrelay-worker-{wid}", namespace="kvrelay")
        for c in ray.get(actor.split_log.remote()):
            out.append({**c, "t_s": round(c["t"] - t0, 2), "worker": wid})
    return sorted(out, key=lambda c: c["t_s"])


def run_config(name: str, cfg: ServeConfig, args: argparse.Namespace) -> dict[str, Any]:
    """Warm-up, then ``--repeats`` sweeps on one cluster; every repeat's report is kept."""
    tag = name.replace("@", "_t").replace("%", "_p").replace(":", "_s").replace("/", "_")
    out_json = Path(args.out) / f"goodput_{tag}.json"
    with Cluster.start(cfg) as cluster, GcPauses() as gc_pauses:
        url = f"http://127.0.0.1:{cluster.ports['http_port']}"
        roles_before = cluster.workers()
        warm_up(name, url, args)
        print(f"[{name}] workers {roles_before}", flush=True)
        # each rate's lane and delivery times, from zero after the warm-up
        if cfg.semi_pd:
            lane_times(roles_before, reset=True)
        cluster.delivery_times(reset=True)
        gc_pauses.times.summary(reset=True)

        def on_rate_end(rate: str) -> dict[str, Any]:
            delivery = cluster.delivery_times(reset=True)
            delivery["driver_gc"] = gc_pauses.times.summary(reset=True)
            out = {"delivery": delivery}
            if cfg.semi_pd:
                out["lanes"] = lane_times(roles_before, reset=True)
                print(lane_line(name, rate, out["lanes"]), flush=True)
            print(delivery_line(name, rate, out["delivery"]), flush=True)
            return out

        t0 = time.time()
        repeats, commands = [], []
        for r in range(args.repeats):
            argv = loadgen_argv(url, args, out_json, r)
            commands.append(shlex.join(argv))
            print(f"[{name}] repeat {r + 1}/{args.repeats}: {commands[-1]}", flush=True)
            repeats.append(sweep(name, argv, out_json, t0, on_rate_end))
        switches = [
            {"t_s": round(t - t0, 1), "worker": w, "from": src, "to": dst}
            for t, w, src, dst in cluster.call("role_switches")
        ]
        roles_after = cluster.workers()
        splits = split_changes(roles_after, t0) if cfg.semi_pd and cfg.semi_pd_adaptive else []
        # requests the cluster still holds after every client gave up: there should be none
        stuck = cluster.call("debug_flights")
        if stuck:
            print(f"[{name}] {len(stuck)} requests still in flight after the run: {stuck[:8]}",
                  flush=True)
    report = dict(commands=commands, repeats=repeats, role_switches=switches,
                  split_changes=splits, roles_before=roles_before, roles_after=roles_after,
                  stuck_flights=stuck)
    out_json.write_text(json.dumps(report, indent=1))
    return report


def linear_flops(model: str | None) -> float | None:
    """FLOPs a prompt token costs in the linear layers (2 x their weights, from the served
    model's config.json; attention and the LM head not counted): the prefill ceiling's divisor,
    an underestimate of the work, so the ceiling it gives is an upper bound."""
    path = Path(model or "") / "config.json"
    if model is None or not path.is_file():
        return None
    c = json.loads(path.read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads = c["num_attention_heads"]
    kv = c.get("num_key_value_heads", heads) * c.get("head_dim", h // heads)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * inter  # q, o; k, v; gate, up, down
    return 2.0 * layers * per_layer


def matmul_tflops() -> float | None:
    """This GPU's bf16 matmul rate (gpu_models' 8192-cube ceiling), in a child process so
    this driver holds no CUDA context while the clusters run; None without CUDA."""
    code = ("import torch\nif torch.cuda.is_available():\n"
            "    from kvrelay.benchmarks.gpu_models import ceilings; print(ceilings()[1])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip
    try:
        return float(proc.stdout.split()[-1])
    except (IndexError, ValueError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--workers", type=int, default=3, help="workers in every configuration")
    a("--configs", default="pd,colocated,planner,pd_start",
      help=f"comma-separated, of {NAMES}; NAME@TOKENS sets its tokens a step (default 512), "
           "semi-PD NAME%%SHARE its prefill SM share, NAME:SEQS its max_num_seqs, NAME/POLICY "
           "its scheduling policy (e.g. colocated1@2048/deadline)")
    a("--pd-split", default="2,1", help="P,D of the fixed PD configuration")
    a("--planner-start", default="1,2", help="P,D the planner configuration starts from")
    a("--semi-pd-start", default="100,100",
      help="prefill,decode SM shares (percent) the semi-PD lanes start from")
    a("--semi-pd-fixed", action="store_true",
      help="semi-PD keeps its start split (the SLO-aware rule off)")
    a("--semi-pd-fixed-split", default="50,100",
      help="prefill,decode SM shares (percent) of the semi_pd_fixed configuration")
    a("--semi-pd-fixed-tokens", type=int, default=None,
      help="the semi_pd_fixed configuration's prefill lane tokens per step (default: as semi_pd)")
    a("--autosize-interval-s", type=float, default=2.0)
    a("--autosize-window-s", type=float, default=10.0)
    a("--sweep", default="1,2,3,4,6")
    a("--num-requests", type=int, default=60)
    a("--duration-s", type=float, default=None,
      help="each rate sends its arrivals of the first N seconds instead of --num-requests "
           "(a steady state: N x rate requests)")
    a("--max-prompt-tokens", type=int, default=512)
    a("--max-output-tokens", type=int, default=32)
    a("--min-output-tokens", type=int, default=1,
      help="the chat streams' outputs are at least this (loadgen's; default: Zipf from 1)")
    a("--max-num-seqs", type=int, default=64,
      help="every configuration's engines hold at most this many sequences (ServeConfig's)")
    a("--long-fraction", type=float, default=0.0, help="share of long prompts (loadgen's)")
    a("--long-prompt-range", default="1024,8192", help="LO,HI tokens of the long prompts")
    a("--long-output-tokens", type=int, default=16)
    a("--max-context", type=int, default=None,
      help="loadgen cuts prompts to fit it (default: the model's context)")
    a("--ttft-slo", type=float, default=2.0)
    a("--itl-slo", type=float, default=0.25)
    a("--run-timeout", type=float, default=120.0, help="per rate, seconds")
    a("--seed", type=int, default=0)
    a("--fresh-prompts", action="store_true",
      help="every rate sends prompts no earlier rate cached (loadgen's)")
    a("--repeats", type=int, default=1,
      help="sweeps per configuration, after one warm-up on the same cluster (the spread)")
    a("--warmup", type=int, default=6, help="requests at 2 req/s before the sweep (0: none)")
    a("--out", default="benchmarks/results")
    a("--model", default=None, help="served model (default: SmolLM2-135M-Instruct)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a("--dtype", default="auto")
    a("--kv-cache-gb", type=float, default=0.25, help="device KV pool per worker")
    a("--threads-per-worker", type=int, default=1)
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    try:
        cfgs = configs(args)
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    if args.max_context is None:
        args.max_context = load_tokenizer(args.model)[0].max_context
    try:  # the load generator's own checks, before any cluster starts
        loadgen.validate(loadgen.parser().parse_args(loadgen_argv("", args, Path())[4:]))
    except ValueError as e:
        p.error(str(e))
    args.linear_flops = linear_flops(args.model)
    args.matmul_tflops = matmul_tflops() if args.device != "cpu" else None
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    l0, t0 = os.getloadavg(), time.time()
    reps = {}
    for name, cfg in cfgs.items():
        reps[name] = run_config(name, cfg, args)
        print(f"[{name}] done, load average {os.getloadavg()[0]:.2f}", flush=True)
    l1 = os.getloadavg()
    text = render(reps, cfgs, args, l0, l1, time.time() - t0)
    print(text)
    (Path(args.out) / "goodput_bench.txt").write_text(text + "\n")
    with open(Path(args.out) / "goodput_bench.json", "w") as f:
        json.dump({"args": vars(args), "loadavg_start": l0, "loadavg_end": l1,
                   "configs": {n: describe(n, c) for n, c in cfgs.items()}, **reps}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
