"""A load step against ONE semi-PD worker (issue 16): does the SLO-aware SM split move within a
window after the step, and back once the load falls?

    python benchmarks/semipd_step.py --model DIR [--out DIR]          # on the GPU machine
    python benchmarks/semipd_step.py --model DIR --device cpu --streams 4 --burst-rate 1 \
        --long-range 256,512 --steady-s 4 --burst-s 4 --after-s 6 --ttft-slo 0.5 --itl-slo 0.3

Three phases, one cluster (``Cluster.start``, one semi-PD worker owning the device, the split
rule on, window ``--window-s``): ``--steady-s`` seconds of ``--streams`` decode streams (short
prompts, ``--stream-tokens`` each, restarted as they finish), then ``--burst-s`` seconds in which
long prompts (uniform in ``--long-range`` tokens, ``--long-output`` tokens out) also arrive at
``--burst-rate`` a second, then ``--after-s`` seconds of the streams alone. The worker's window
log (``SemiPDWorker.window_log``) is printed window by window beside the phase it closed in:
its p99 TTFT and ITL against the SLOs and the samples they came from, the split it ran under
and the next, the fits' predictions at both and the rule's reason. The client's own figures per
phase (stream ITL p50/p99, long-prompt TTFT p50/p99) are printed beside them, and two checks:

* **moved**: the first window that closed after the step began and measured one latency (TTFT
  or TPOT, not both) past the margin changed the split (the rule answers within one window of
  the step showing; with both past it, semi-PD's Algorithm 1 keeps the split, and so does ours);
* **returned**: after the burst ends the split relaxes back toward its start (or is there).

The first window that *shows* the step closes at most one window after the step's first long
prompts get their first token, which is itself up to the TTFT the step causes: the check is on
the windows, and the seconds from the step to the first change are printed.
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time
from pathlib import Path
from typing import Any

# the split rule's own nearest-rank percentile: the client's figures read as its windows do
from kvrelay.workers.semi_pd.tuner import percentile

PHASES = ("steady", "burst", "after")


class Load:
    """The client side: streams and long prompts through the gRPC API, timed per token."""

    def __init__(self, addr: str, args: argparse.Namespace, t0: float) -> None:
        self.addr, self.args, self.t0 = addr, args, t0
        self.lock = threading.Lock()
        self.itl: list[tuple[float, float]] = []  # (time since t0, gap)
        self.ttft: list[tuple[float, float, str]] = []  # (submit time, TTFT, kind)
        self.errors: list[str] = []

    def one(self, client: Any, prompt: list[int], max_tokens: int, kind: str) -> None:
        sent = time.perf_counter()
        last = None
        try:
            for chunk in client.generate(token_ids=prompt, max_tokens=max_tokens, stream=True,
                                         temperature=0.0, ignore_eos=True, timeout=300):
                if not chunk.token_ids:
                    continue
                now = time.perf_counter()
                with self.lock:
                    if last is None:
                        self.ttft.append((sent - self.t0, now - sent, kind))
                    else:
                        self.itl.append((now - self.t0, now - last))
                last = now
        except Exception as exc:  # recorded, reported, counted as a failure
            with self.lock:
                self.errors.append(f"{kind}: {exc!r}")

    def stream(self, seed: int, until: float) -> None:
        from kvrelay.client import Client

        rng = random.Random(seed)
        with Client(self.addr, timeout=300) as client:
            while time.perf_counter() < until:
                prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(32, 256))]
                self.one(client, prompt, self.args.stream_tokens, "stream")

    def burst(self, start: float, end: float) -> None:
        from kvrelay.client import Client

        rng = random.Random(1)
        lo, hi = self.args.long_range
        threads = []
        with Client(self.addr, timeout=300) as client:
            k = 0
            while True:
                at = start + k / self.args.burst_rate
                if at >= end:
                    break
                time.sleep(max(0.0, at - time.perf_counter()))
                prompt = [rng.randrange(100, 40000) for _ in range(rng.randint(lo, hi))]
                t = threading.Thread(target=self.one,
                                     args=(client, prompt, self.args.long_output, "long"))
                t.start()
                threads.append(t)
                k += 1
            for t in threads:
                t.join(300)


def phase_of(t: float, args: argparse.Namespace) -> str:
    if t < args.steady_s:
        return "steady"
    return "burst" if t < args.steady_s + args.burst_s else "after"


def run(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from kvrelay.cluster.runtime.config import ServeConfig
    from kvrelay.cluster.runtime.serve import Cluster
    from kvrelay.workers.semi_pd.worker import DEFAULT_SPLIT

    cfg = ServeConfig(model=args.model, device=args.device, dtype=args.dtype,
                      kv_cache_gb=args.kv_cache_gb, grpc_port=0, http_port=None,
                      prefill_workers=0, decode_workers=0, colocated_workers=1, semi_pd=True,
                      semi_pd_adaptive=True, semi_pd_window_s=args.window_s,
                      ttft_slo_s=args.ttft_slo, itl_slo_s=args.itl_slo,
                      capture_graphs=args.device == "cuda", enable_prefix_caching=False)
    with Cluster.start(cfg) as cluster:
        addr = f"127.0.0.1:{cluster.ports['grpc_port']}"
        (wid,) = cluster.workers()
        actor = ray.get_actor(f"kvrelay-worker-{wid}", namespace="kvrelay")
        warm = Load(addr, args, time.perf_counter())  # first requests, every stream shape
        ws = [threading.Thread(target=warm.stream, args=(1000 + i, time.perf_counter() + 3))
              for i in range(args.streams)]
        for t in ws:
            t.start()
        warm.burst(time.perf_counter(), time.perf_counter() + 2 / args.burst_rate)
        for t in ws:
            t.join(300)
        # the warm-up's first steps (Triton compiles, allocator growth) read as failed TTFTs
        # and moved the split (the H200 run of 21:59 started its steady phase at 100/30):
        # measure from the rule's home split
        ray.get(actor.set_split.remote(DEFAULT_SPLIT))
        t0_wall, t0 = time.time(), time.perf_counter()
        load = Load(addr, args, t0)
        total = args.steady_s + args.burst_s + args.after_s
        threads = [threading.Thread(target=load.stream, args=(i, t0 + total))
                   for i in range(args.streams)]
        threads.append(threading.Thread(
            target=load.burst, args=(t0 + args.steady_s, t0 + args.steady_s + args.burst_s)))
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        log = [{**e, "t_s": round(e["t"] - t0_wall, 3)} for e in ray.get(actor.window_log.remote())]
        integrity = cluster.integrity()
    return {"args": {k: v for k, v in vars(args).items()}, "windows": log, "load": load,
            "integrity": integrity}


def report(args: argparse.Namespace, res: dict[str, Any]) -> tuple[list[str], bool]:
    load: Load = res["load"]
    windows = [w for w in res["windows"] if w["t_s"] >= 0]  # not the warm-up's
    lines = [f"semi-PD load step: SLOs TTFT p99 <= {args.ttft_slo:g} s, ITL p99 <= "
             f"{args.itl_slo * 1e3:g} ms; window {args.window_s:g} s, margin 0.8; phases steady "
             f"0-{args.steady_s:g} s, burst -{args.steady_s + args.burst_s:g} s, after -"
             f"{args.steady_s + args.burst_s + args.after_s:g} s"]
    lines.append(f"{'t s':>7} {'phase':6} {'TTFT p99':>9} {'ITL p99':>8} {'n ttft/itl':>11} "
                 f"{'split':>8} -> {'next':8} {'pred TTFT/ITL at next':>22}  reason")
    for w in windows:
        pt, pi = w["predicted_new"]
        mark = "*" if w["old"] != w["new"] else " "
        lines.append(
            f"{w['t_s']:7.2f} {phase_of(w['t_s'], args):6} {w['ttft_s']:8.3f}s "
            f"{w['tpot_s'] * 1e3:6.1f}ms {w['samples'][0]:5d}/{w['samples'][1]:<5d} "
            f"{w['old'][0]:>3}/{w['old'][1]:<3} {mark}-> {w['new'][0]:>3}/{w['new'][1]:<3} "
            f"{pt:10.3f}s/{pi * 1e3:7.1f}ms  {w['reason']}")
    for ph in PHASES:
        itl = [g for t, g in load.itl if phase_of(t, args) == ph]
        ttft = [d for t, d, k in load.ttft if phase_of(t, args) == ph and k == "long"]
        st = [d for t, d, k in load.ttft if phase_of(t, args) == ph and k == "stream"]
        lines.append(
            f"client {ph:6}: stream ITL p50/p99 {percentile(itl, .5) * 1e3:.1f}/"
            f"{percentile(itl, .99) * 1e3:.1f} ms ({len(itl)} gaps); stream TTFT p99 "
            f"{percentile(st, .99):.3f} s ({len(st)}); long TTFT p50/p99 "
            f"{percentile(ttft, .5):.3f}/{percentile(ttft, .99):.3f} s ({len(ttft)})")
    step = args.steady_s
    end = args.steady_s + args.burst_s
    margin = 0.8
    after_step = [w for w in windows if w["t_s"] > step]
    ttft_hot = [w["ttft_s"] > margin * args.ttft_slo for w in after_step]
    tpot_hot = [w["tpot_s"] > margin * args.itl_slo for w in after_step]
    # semi-PD's Algorithm 1 keeps (x, y) when both SLOs fail: no share move helps both. The
    # rule must answer the first window in which exactly one of them is past the margin
    both = sum(a and b for a, b in zip(ttft_hot, tpot_hot, strict=True))
    hot = [w for w, a, b in zip(after_step, ttft_hot, tpot_hot, strict=True) if a != b]
    first_hot = hot[0] if hot else None
    if both:
        lines.append(f"{both} window(s) after the step had both SLOs past the margin (kept, as "
                     "semi-PD's rule does)")
    moved = first_hot is not None and first_hot["old"] != first_hot["new"]
    changes = [w for w in windows if w["t_s"] > step and w["old"] != w["new"]]
    if changes:
        c = changes[0]
        lines.append(f"first change after the step: {c['t_s'] - step:.2f} s after it "
                     f"({(c['t_s'] - step) / args.window_s:.1f} windows), {c['old']} -> "
                     f"{c['new']}: {c['reason']}")
    if first_hot is None:
        lines.append("no window after the step had one SLO past the margin: the step was too "
                     "small (or hit both)")
    start = windows[0]["old"] if windows else None
    after = [w for w in windows if w["t_s"] > end]
    low = changes[0]["new"] if changes else None
    returned = bool(after) and low is not None and (
        after[-1]["new"] == start or any(w["reason"].startswith("relax") for w in after))
    when = f" ({first_hot['t_s'] - step:.2f} s after the step)" if first_hot else ""
    lines.append(f"moved at the first window showing one SLO past its margin: "
                 f"{'PASS' if moved else 'FAIL'}{when}; "
                 f"moved back after the burst: {'PASS' if returned else 'FAIL'} "
                 f"(start {start}, end {after[-1]['new'] if after else None})")
    lines.append(f"requests failed: {len(load.errors)} {load.errors[:3]}; "
                 f"integrity {res['integrity']}")
    return lines, moved and returned and not load.errors


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-cache-gb", type=float, default=8.0)
    ap.add_argument("--ttft-slo", type=float, default=1.0)
    ap.add_argument("--itl-slo", type=float, default=0.05)
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--streams", type=int, default=32)
    ap.add_argument("--stream-tokens", type=int, default=256)
    ap.add_argument("--burst-rate", type=float, default=8.0, help="long prompts a second")
    ap.add_argument("--long-range", default="4096,7936",
                    type=lambda s: tuple(int(x) for x in s.split(",")))
    ap.add_argument("--long-output", type=int, default=8)
    ap.add_argument("--steady-s", type=float, default=10.0)
    ap.add_argument("--burst-s", type=float, default=8.0)
    ap.add_argument("--after-s", type=float, default=20.0)
    ap.add_argument("--out", default=".")
    args = ap.parse_args()
    res = run(args)
    lines, ok = report(args, res)
    print("\n".join(lines), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    load: Load = res["load"]
    (out / "semipd_step.json").write_text(json.dumps(
        {"args": res["args"], "windows": res["windows"], "itl": load.itl, "ttft": load.ttft,
         "errors": load.errors, "integrity": res["integrity"], "report": lines}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
