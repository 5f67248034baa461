"""Goodput under Gamma (bursty) arrivals: PD (1P+1D) vs colocated (2 workers), driven through
the OpenAI HTTP API by ``benchmarks/loadgen.py``.

    .venv/bin/python benchmarks/goodput_bench.py [--sweep 0.5,1,2] [--num-requests 12]
        [--ttft-slo 2 --itl-slo 0.25] [--out benchmarks/results]

For each configuration a fresh local Ray cluster (1 thread per worker, HTTP frontend on a free
port) is started, then the load generator runs as its own process with the same workload
(seeded Gamma arrivals, shape 0.5 as BurstGPT fits; Zipf lengths capped for this CPU) at every
rate of the sweep; its exact command line is printed. Goodput (DistServe) = the highest rate at
which >= 90% of requests meet both SLOs. The table gives, per rate, SLO attainment and TTFT /
ITL p99 for both, and the PD/colocated ratio of goodput.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kvrelay.cluster.serve import Cluster, ServeConfig


def loadgen_argv(url: str, args: argparse.Namespace, out_json: Path) -> list[str]:
    return [
        sys.executable, "-m", "kvrelay.benchmarks.loadgen", "--url", url,
        "--endpoint", "completions", "--sweep", args.sweep,
        "--num-requests", str(args.num_requests), "--gamma-shape", "0.5",
        "--max-prompt-tokens", str(args.max_prompt_tokens),
        "--max-output-tokens", str(args.max_output_tokens),
        "--ttft-slo", str(args.ttft_slo), "--itl-slo", str(args.itl_slo),
        "--timeout", str(args.run_timeout), "--request-timeout", str(args.run_timeout),
        "--seed", str(args.seed), "--json", str(out_json),
    ]


def run_config(name: str, cfg: ServeConfig, args: argparse.Namespace) -> dict[str, Any]:
    out_json = Path(args.out) / f"goodput_{name}.json"
    with Cluster.start(cfg) as cluster:
        url = f"http://127.0.0.1:{cluster.ports['http_port']}"
        argv = loadgen_argv(url, args, out_json)
        print(f"[{name}] {shlex.join(argv)}", flush=True)
        proc = subprocess.run(argv, capture_output=True, text=True,
                              timeout=args.run_timeout * len(args.sweep.split(",")) + 60)
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", flush=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{name}: loadgen exited {proc.returncode}")
    report: dict[str, Any] = json.loads(out_json.read_text())
    report["command"] = shlex.join(argv)
    return report


def render(pd: dict[str, Any], co: dict[str, Any], args: argparse.Namespace,
           l0: tuple[float, ...], l1: tuple[float, ...], wall: float) -> str:
    def g(rep: dict[str, Any], rate: str, key: str) -> float:
        s = rep["runs"][rate]["all"]
        return float("nan") if key != "slo" and s[key] is None else (
            s["slo_attainment"] if key == "slo" else s[key]["p99"])

    lines = [
        f"goodput_bench: SLOs TTFT <= {args.ttft_slo} s, ITL <= {args.itl_slo} s; "
        f"{args.num_requests} requests per rate, Gamma shape 0.5, prompts <= "
        f"{args.max_prompt_tokens}, outputs <= {args.max_output_tokens} tokens (Zipf 1.1)",
        f"load average start {l0[0]:.2f} {l0[1]:.2f} {l0[2]:.2f}, end {l1[0]:.2f} {l1[1]:.2f} "
        f"{l1[2]:.2f}; wall {wall:.0f} s",
        "rate req/s | PD SLO% | colo SLO% | PD TTFT p99 s | colo TTFT p99 s | PD ITL p99 ms | "
        "colo ITL p99 ms",
        "--- | --- | --- | --- | --- | --- | ---",
    ]
    for rate in pd["runs"]:
        lines.append(
            f"{rate} | {100 * g(pd, rate, 'slo'):.0f} | {100 * g(co, rate, 'slo'):.0f} | "
            f"{g(pd, rate, 'ttft_s'):.2f} | {g(co, rate, 'ttft_s'):.2f} | "
            f"{1e3 * g(pd, rate, 'itl_s'):.0f} | {1e3 * g(co, rate, 'itl_s'):.0f}")
    gp, gc = pd["goodput_rps"]["all"], co["goodput_rps"]["all"]
    ratio = f"{gp / gc:.2f}" if gc else "n/a (colocated goodput 0)"
    lines.append(f"goodput req/s: PD {gp:g}, colocated {gc:g}, PD/colocated {ratio}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--sweep", default="0.5,1,2")
    a("--num-requests", type=int, default=12)
    a("--max-prompt-tokens", type=int, default=512)
    a("--max-output-tokens", type=int, default=32)
    a("--ttft-slo", type=float, default=2.0)
    a("--itl-slo", type=float, default=0.25)
    a("--run-timeout", type=float, default=60.0, help="per rate, seconds")
    a("--seed", type=int, default=0)
    a("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    base = dict(grpc_port=None, http_port=0, threads_per_worker=1)
    l0, t0 = os.getloadavg(), time.time()
    pd = run_config("pd", ServeConfig(prefill_workers=1, decode_workers=1, **base), args)
    co = run_config("colocated", ServeConfig(prefill_workers=0, decode_workers=0,
                                             colocated_workers=2, **base), args)
    l1 = os.getloadavg()
    print(render(pd, co, args, l0, l1, time.time() - t0))
    with open(Path(args.out) / "goodput_bench.json", "w") as f:
        json.dump({"args": vars(args), "loadavg_start": l0, "loadavg_end": l1,
                   "pd": pd, "colocated": co}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
