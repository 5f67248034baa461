"""Goodput under Gamma (bursty) arrivals at equal worker count: fixed PD vs colocated vs PD with
the SLO-aware pool-sizing planner on, driven through the OpenAI HTTP API by ``loadgen.py``.

    .venv/bin/python benchmarks/goodput_bench.py [--workers 3] [--sweep 1,2,3,4,6] \
        [--num-requests 60] [--configs pd,colocated,planner,pd_start] [--pd-split 2,1] \
        [--planner-start 1,2] [--autosize-interval-s 2 --autosize-window-s 10] \
        [--ttft-slo 2 --itl-slo 0.25] [--warmup 6] [--out benchmarks/results]

Configurations (every one with ``--workers`` workers, 1 torch thread each):

* ``pd``: fixed prefill/decode split ``--pd-split`` (P,D);
* ``colocated``: every worker does both;
* ``planner``: starts at ``--planner-start`` (P,D) with ``auto_pool_sizing`` on, so the planner
  (cluster/sizing/pool_sizing.py via cluster/sizing/autosize.py) has a mis-sized split to correct;
* ``pd_start``: optional, the planner's starting split held fixed (what the planner saves).
* ``semi_pd``: optional, ONE semi-PD worker (workers/semi_pd/: prefill and decode lanes over one
  KV storage, handoff by block ids, SM shares by green contexts on CUDA, the SLO-aware split on)
  owning the whole device — issue 16's configuration;
* ``colocated1``: optional, its strongest colocated baseline: ONE colocated worker owning the
  whole device, with chunked prefill (``--max-num-batched-tokens``).

For each, a fresh local Ray cluster (HTTP frontend on a free port) is started and the load
generator runs as its own process with the same workload (seeded Gamma arrivals, shape 0.5 as
BurstGPT fits; Zipf lengths capped for this CPU) at every rate of the sweep; its exact command
line is printed, and the time each rate's run ended is stamped from its output so that the
planner's role switches (read from the controller's ``role_switches``) can be placed on the
sweep. Goodput (DistServe) = the highest rate at which >= 90% of requests meet both SLOs, every
lower rate meeting it too.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrelay.benchmarks import loadgen
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.model.source import load_tokenizer

NAMES = ("pd", "colocated", "planner", "pd_start", "semi_pd", "colocated1")


def loadgen_argv(url: str, args: argparse.Namespace, out_json: Path) -> list[str]:
    return [
        sys.executable, "-u", "-m", "kvrelay.benchmarks.loadgen", "--url", url,
        "--endpoint", "completions", "--sweep", args.sweep,
        "--num-requests", str(args.num_requests), "--gamma-shape", "0.5",
        "--max-prompt-tokens", str(args.max_prompt_tokens),
        "--max-output-tokens", str(args.max_output_tokens),
        "--ttft-slo", str(args.ttft_slo), "--itl-slo", str(args.itl_slo),
        "--timeout", str(args.run_timeout), "--request-timeout", str(args.run_timeout),
        "--seed", str(args.seed), "--json", str(out_json),
        "--long-fraction", str(args.long_fraction), "--long-prompt-range", args.long_prompt_range,
        "--long-output-tokens", str(args.long_output_tokens),
        "--max-context", str(args.max_context),
    ]


def split(text: str, workers: int) -> tuple[int, int]:
    p, d = (int(x) for x in text.split(","))
    if p < 1 or d < 1 or p + d != workers:
        raise argparse.ArgumentTypeError(f"split {text!r}: P,D >= 1 each, P + D = {workers}")
    return p, d


def configs(args: argparse.Namespace) -> dict[str, ServeConfig]:
    base = ServeConfig(model=args.model, device=args.device, dtype=args.dtype,
                       kv_cache_gb=args.kv_cache_gb, grpc_port=None, http_port=0,
                       threads_per_worker=args.threads_per_worker,
                       ttft_slo_s=args.ttft_slo, itl_slo_s=args.itl_slo)
    (pp, pdd), (sp, sd) = split(args.pd_split, args.workers), split(args.planner_start, args.workers)
    every = {
        "pd": base.model_copy(update={"prefill_workers": pp, "decode_workers": pdd}),
        "colocated": base.model_copy(update={"prefill_workers": 0, "decode_workers": 0,
                                             "colocated_workers": args.workers}),
        "planner": base.model_copy(update={"prefill_workers": sp, "decode_workers": sd,
                                           "auto_pool_sizing": True,
                                           "autosize_interval_s": args.autosize_interval_s,
                                           "autosize_window_s": args.autosize_window_s}),
        "pd_start": base.model_copy(update={"prefill_workers": sp, "decode_workers": sd}),
        "semi_pd": base.model_copy(update={"prefill_workers": 0, "decode_workers": 0,
                                           "colocated_workers": 1, "semi_pd": True,
                                           "semi_pd_adaptive": True}),
        "colocated1": base.model_copy(update={"prefill_workers": 0, "decode_workers": 0,
                                              "colocated_workers": 1}),
    }
    return {n: every[n] for n in args.configs.split(",")}


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


def run_config(name: str, cfg: ServeConfig, args: argparse.Namespace) -> dict[str, Any]:
    out_json = Path(args.out) / f"goodput_{name}.json"
    with Cluster.start(cfg) as cluster:
        url = f"http://127.0.0.1:{cluster.ports['http_port']}"
        argv = loadgen_argv(url, args, out_json)
        roles_before = cluster.workers()
        warm_up(name, url, args)
        print(f"[{name}] workers {roles_before}\n[{name}] {shlex.join(argv)}", flush=True)
        t0 = time.time()
        rate_ends: dict[str, float] = {}  # rate -> seconds after t0 its run ended
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) as proc:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.startswith("== rate "):
                    rate_ends[line.split()[2]] = round(time.time() - t0, 1)
                print(f"[{name}] {line}", end="", flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: loadgen exited {proc.returncode}")
        switches = [
            {"t_s": round(t - t0, 1), "worker": w, "from": src, "to": dst}
            for t, w, src, dst in cluster.call("role_switches")
        ]
        roles_after = cluster.workers()
        # requests the cluster still holds after every client gave up: there should be none
        stuck = cluster.call("debug_flights")
        if stuck:
            print(f"[{name}] {len(stuck)} requests still in flight after the run: {stuck[:8]}",
                  flush=True)
    report: dict[str, Any] = json.loads(out_json.read_text())
    report.update(command=shlex.join(argv), rate_ends_s=rate_ends, role_switches=switches,
                  roles_before=roles_before, roles_after=roles_after, stuck_flights=stuck)
    out_json.write_text(json.dumps(report, indent=1))
    return report


def describe(name: str, cfg: ServeConfig) -> str:
    if cfg.semi_pd:
        return f"semi-PD x{cfg.colocated_workers} (one KV storage, SM split)"
    if cfg.colocated_workers:
        return f"colocated x{cfg.colocated_workers}"
    tail = " + planner" if cfg.auto_pool_sizing else ""
    return f"{name}: {cfg.prefill_workers}P+{cfg.decode_workers}D{tail}"


def long_mix(args: argparse.Namespace) -> str:
    if not args.long_fraction:
        return ""
    return (f", {100 * args.long_fraction:g}% long prompts of {args.long_prompt_range} tokens "
            f"(outputs < {args.long_output_tokens}) in bursts of 2-4")


def render(reps: dict[str, dict[str, Any]], cfgs: dict[str, ServeConfig],
           args: argparse.Namespace, l0: Sequence[float], l1: Sequence[float],
           wall: float) -> str:
    def g(rep: dict[str, Any], rate: str, key: str) -> float:
        s = rep["runs"][rate]["all"]
        if key == "slo":
            return float(s["slo_attainment"])
        return float("nan") if s[key] is None or s[key]["p99"] is None else float(s[key]["p99"])

    names = list(reps)
    lines = [
        f"goodput_bench: {args.workers} workers per configuration "
        f"({'; '.join(describe(n, cfgs[n]) for n in names)}); SLOs TTFT <= {args.ttft_slo} s, "
        f"ITL <= {args.itl_slo} s; {args.num_requests} requests per rate, Gamma shape 0.5, "
        f"prompts <= {args.max_prompt_tokens}, outputs <= {args.max_output_tokens} tokens "
        f"(Zipf 1.1){long_mix(args)}; planner interval {args.autosize_interval_s} s, window "
        f"{args.autosize_window_s} s",
        f"load average start {l0[0]:.2f} {l0[1]:.2f} {l0[2]:.2f}, end {l1[0]:.2f} {l1[1]:.2f} "
        f"{l1[2]:.2f}; wall {wall:.0f} s",
        "",
        "| rate req/s | " + " | ".join(f"{n} SLO %" for n in names) + " | "
        + " | ".join(f"{n} TTFT p99 s" for n in names) + " | "
        + " | ".join(f"{n} ITL p99 ms" for n in names) + " |",
        "| ---: " * (1 + 3 * len(names)) + "|",
    ]
    for rate in reps[names[0]]["runs"]:
        cells = [f"{100 * g(reps[n], rate, 'slo'):.0f}" for n in names]
        cells += [f"{g(reps[n], rate, 'ttft_s'):.2f}" for n in names]
        cells += [f"{1e3 * g(reps[n], rate, 'itl_s'):.0f}" for n in names]
        lines.append(f"| {rate} | " + " | ".join(cells) + " |")
    gp = {n: float(reps[n]["goodput_rps"]["all"]) for n in names}
    top = max(float(r) for r in reps[names[0]]["runs"])
    lines += ["", "goodput req/s: " + ", ".join(
        f"{n} {v:g}{' (top of sweep: a lower bound)' if v >= top else ''}" for n, v in gp.items())]
    for a, b in (("pd", "colocated"), ("planner", "colocated"), ("planner", "pd"),
                 ("planner", "pd_start")):
        if a in gp and b in gp:
            lines.append(f"goodput {a}/{b}: "
                         + (f"{gp[a] / gp[b]:.2f}" if gp[b] else f"n/a ({b} goodput 0)"))
    for n in names:
        ends = ", ".join(f"{r} req/s at {t:g} s" for r, t in reps[n]["rate_ends_s"].items())
        lines.append(f"[{n}] rate runs ended: {ends}")
        for s in reps[n]["role_switches"]:
            lines.append(f"[{n}] role switch at {s['t_s']:g} s: {s['worker']} "
                         f"{s['from']} -> {s['to']}")
        if cfgs[n].auto_pool_sizing and not reps[n]["role_switches"]:
            lines.append(f"[{n}] the planner made no role switch")
        if reps[n]["roles_before"] != reps[n]["roles_after"]:
            lines.append(f"[{n}] roles after the sweep: {reps[n]['roles_after']}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--workers", type=int, default=3, help="workers in every configuration")
    a("--configs", default="pd,colocated,planner,pd_start", help=f"comma-separated, of {NAMES}")
    a("--pd-split", default="2,1", help="P,D of the fixed PD configuration")
    a("--planner-start", default="1,2", help="P,D the planner configuration starts from")
    a("--autosize-interval-s", type=float, default=2.0)
    a("--autosize-window-s", type=float, default=10.0)
    a("--sweep", default="1,2,3,4,6")
    a("--num-requests", type=int, default=60)
    a("--max-prompt-tokens", type=int, default=512)
    a("--max-output-tokens", type=int, default=32)
    a("--long-fraction", type=float, default=0.0, help="share of long prompts (loadgen's)")
    a("--long-prompt-range", default="1024,8192", help="LO,HI tokens of the long prompts")
    a("--long-output-tokens", type=int, default=16)
    a("--max-context", type=int, default=None,
      help="loadgen cuts prompts to fit it (default: the model's context)")
    a("--ttft-slo", type=float, default=2.0)
    a("--itl-slo", type=float, default=0.25)
    a("--run-timeout", type=float, default=120.0, help="per rate, seconds")
    a("--seed", type=int, default=0)
    a("--warmup", type=int, default=6, help="requests at 2 req/s before the sweep (0: none)")
    a("--out", default="benchmarks/results")
    a("--model", default=None, help="served model (default: SmolLM2-135M-Instruct)")
    a("--device", default="auto", choices=("auto", "cpu", "cuda"))
    a("--dtype", default="auto")
    a("--kv-cache-gb", type=float, default=0.25, help="device KV pool per worker")
    a("--threads-per-worker", type=int, default=1)
    args = p.parse_args(argv)
    if not set(args.configs.split(",")) <= set(NAMES):
        p.error(f"--configs: choose among {NAMES}")
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
