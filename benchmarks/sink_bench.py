"""The event sink's cost on the engine thread (issue 17): ``EngineLoop`` with its sender thread
(the default) against the sink called on the engine thread (``sender=False``, before).

    python benchmarks/sink_bench.py [--batches 8 32 128] [--steps 400] [--warmup 50] [--reps 2]
        [--json PATH]

Each config runs a real ``EngineLoop`` over a real ``Engine`` (step_overhead.py's one-layer
random-weight Llama, CPU, one torch thread) decoding N requests (N events a step) into the
worker's real sink path minus the worker: ``_ControllerSink`` -> ``on_events_pickled.remote`` of a Ray
actor whose async ``on_events_pickled`` unpickles and counts the events. Per step, from ``time.thread_time`` of the
engine thread at the entry and exit of every ``Engine.step`` (``--warmup`` steps dropped, then
``--steps`` measured): **outside** = the thread's CPU between one step's exit and the next's
entry (the sink call or the enqueue, plus the loop's own work), **step** = inside the step, and
wall per step (noisy on a shared box). ``--device-ms D`` simulates the overlapped engine on a
GPU: each step then also waits (GIL released, as a CUDA sync does) until D ms after the
previous step's end, as if the device ran the step launched then; with D near the host's own
step time, whatever else the engine thread does per step shows in the wall time, as on the
H200 at batch 128 (host work not hidden). The floor is the loop with a sink that does nothing, on
the engine thread: what is left when delivery costs nothing. Check: the actor received every
token (N x steps per request).
"""

from __future__ import annotations

import argparse
import itertools
import json
import pickle
import statistics
import time
from functools import partial
from typing import Any

import ray
import torch

from kvrelay.benchmarks.step_overhead import tiny_model
from kvrelay.cluster.runtime.actors import _ControllerSink
from kvrelay.cluster.runtime.local_ray import init_local_ray
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.engine.loop import EngineLoop
from kvrelay.workers.types import SamplingParams, TokenEvent

MODES = ("inline", "sender", "floor")  # sink on the engine thread / sender thread / no sink


@ray.remote(num_cpus=0)
class Counter:
    """Stands in for the controller: an async ``on_events_pickled`` that counts what arrives."""

    def __init__(self) -> None:
        self.events = 0

    async def on_events_pickled(self, worker_id: str, blob: bytes, seq: int) -> None:
        self.events += len(pickle.loads(blob))

    async def count(self) -> int:
        return self.events

    async def reset(self) -> None:
        self.events = 0


def run(
    loaded: Any, counter: Any, batch: int, device_ms: float, mode: str, args: argparse.Namespace
) -> dict:
    total = args.warmup + args.steps + 8
    blocks = batch * (-(-(16 + total) // 16)) + 16
    config = EngineConfig(max_num_seqs=batch, max_num_batched_tokens=16 * batch,  # 1-step prefill
                          num_blocks=blocks, enable_prefix_caching=False, cpu_num_blocks=0)  # fmt: skip
    engine = Engine(loaded, config)
    marks: list[tuple[float, float, float]] = []  # (cpu at entry, cpu at exit, wall at exit)
    step = engine.step

    device_s = 1e-3 * device_ms
    launched = [time.perf_counter()]

    def timed_step() -> list[TokenEvent]:
        t0 = time.thread_time()
        out = step()
        if device_s:  # the overlapped GPU engine: wait for the step the device still runs
            time.sleep(max(0.0, launched[0] + device_s - time.perf_counter()))
            launched[0] = time.perf_counter()
        marks.append((t0, time.thread_time(), time.perf_counter()))
        return out

    engine.step = timed_step  # type: ignore[method-assign]
    ray.get(counter.reset.remote())
    sink = partial(_ControllerSink(counter), "w0") if mode != "floor" else (lambda events: None)
    loop = EngineLoop(engine, sink, name="bench", sender=mode == "sender").start()
    params = SamplingParams(max_tokens=total, temperature=0.0, ignore_eos=True)

    def add_all(e: Engine) -> None:
        for i in range(batch):
            e.add_request(f"r{i}", [3 + (i + j) % 500 for j in range(16)], params)

    loop.call(add_all)
    # poll the marks, not the loop: a command would interrupt the steps being timed
    deadline = time.monotonic() + 600
    while len(marks) < total:
        assert time.monotonic() < deadline and loop.error is None, "the engine stalled"
        time.sleep(0.05)
    assert not loop.call(lambda e: e.has_unfinished())
    loop.stop()
    expected = batch * total
    received = expected if mode == "floor" else ray.get(counter.count.remote())
    while received < expected and time.monotonic() < deadline:  # calls of other threads
        time.sleep(0.05)  # may land after this one: wait for the count, with a deadline
        received = ray.get(counter.count.remote())
    # the prefill step comes first; then decode steps only, every request in each
    window = marks[1 + args.warmup : 1 + args.warmup + args.steps + 1]
    outside = [b[0] - a[1] for a, b in itertools.pairwise(window)]
    inside = [a[1] - a[0] for a in window[:-1]]
    wall = [b[2] - a[2] for a, b in itertools.pairwise(window)]
    return {
        "batch": batch,
        "device_ms": device_ms,
        "mode": mode,
        "outside_ms": 1e3 * statistics.mean(outside),
        "step_ms": 1e3 * statistics.mean(inside),
        "wall_ms_p50": 1e3 * statistics.median(wall),
        "steps": len(outside),
        "received": received,
        "expected": expected,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[8, 32, 128])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--device-ms", type=float, nargs="+", default=[0.0],
                   help="per batch (or one for all): a simulated device step; 0: none")  # fmt: skip
    p.add_argument("--json")
    args = p.parse_args()
    devices = args.device_ms * len(args.batches) if len(args.device_ms) == 1 else args.device_ms
    torch.set_num_threads(1)
    init_local_ray(num_cpus=2)
    counter = Counter.remote()
    loaded = tiny_model("cpu")
    rows = [
        run(loaded, counter, batch, device_ms, mode, args)
        for _ in range(args.reps)
        for batch, device_ms in zip(args.batches, devices, strict=True)
        for mode in MODES
    ]
    ok = True
    print("| N | device ms | rep | outside ms: inline / sender / floor | step ms: inline / sender / floor "
          "| wall ms p50: inline / sender / floor | events received / expected |")  # fmt: skip
    print("| ---: | ---: | ---: | --- | --- | --- | --- |")
    for k in range(0, len(rows), len(MODES)):
        rs = rows[k : k + len(MODES)]
        ok &= all(r["received"] == r["expected"] and r["steps"] == args.steps for r in rs)
        print(
            f"| {rs[0]['batch']} | {rs[0]['device_ms']:g} | {k // (len(MODES) * len(args.batches)) + 1} | "
            + " | ".join(
                " / ".join(f"{r[key]:.3f}" for r in rs)
                for key in ("outside_ms", "step_ms", "wall_ms_p50")
            )
            + f" | {' / '.join(str(r['received']) for r in rs[:2])} / {rs[0]['expected']} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)
    print("checks", "PASSED" if ok else "FAILED")
    ray.shutdown()
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
