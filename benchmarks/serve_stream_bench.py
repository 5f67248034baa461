"""Tokens/s streamed through ``kvrelay serve``'s OpenAI HTTP frontend: what the client sees when
every token crosses the frontend (and, since issue 15, the Ray boundary between the controller
and the frontends in the driver process).

    python benchmarks/serve_stream_bench.py --runs 3 --streams 4 --requests 16 --max-tokens 64 \
        [-- extra kvrelay serve flags]

Each run starts ``kvrelay serve`` on fresh ports, waits for ``/ready``, sends two warm-up
requests, then keeps ``--streams`` streaming completions in flight (closed loop, ``ignore_eos``,
greedy) until ``--requests`` have finished; tokens are the ``usage`` the server reports, checked
against the chunks counted. Then SIGTERM, and the next run starts a fresh server.
Prints tokens/s over the run's wall time, TTFT and inter-chunk gaps (p50 / p99), and the Ray
objects that carried the request events per token streamed (warm-ups included), from the count
serve prints when it stops (code before that count existed: nan).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.client import HTTPConnection


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _status(port: int, path: str) -> int:
    conn = HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        return int(resp.status)
    except OSError:
        return 0
    finally:
        conn.close()


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens = self.chunks = 0
        self.ttft: list[float] = []
        self.gaps: list[float] = []


def stream_once(port: int, model: str, max_tokens: int, stats: Stats | None) -> None:
    body = {
        "model": model,
        "prompt": "Write a long story about a lighthouse keeper.",
        "stream": True,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    conn = HTTPConnection("127.0.0.1", port, timeout=300)
    t0 = time.monotonic()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, (resp.status, resp.read()[:300])
    times: list[float] = []
    usage = 0
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        data = json.loads(line[6:])
        assert "error" not in data, data
        if data.get("usage"):
            usage = int(data["usage"]["completion_tokens"])
        if data.get("choices") and data["choices"][0].get("text"):
            times.append(time.monotonic())
    conn.close()
    assert usage == max_tokens, (usage, max_tokens)
    if stats is not None:
        with stats.lock:
            stats.tokens += usage
            stats.chunks += len(times)
            if times:
                stats.ttft.append(times[0] - t0)
                stats.gaps += [b - a for a, b in itertools.pairwise(times)]


def load(
    port: int, model: str, streams: int, requests: int, max_tokens: int
) -> tuple[Stats, float]:
    stats = Stats()
    left = [requests]
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            stream_once(port, model, max_tokens, stats)

    threads = [threading.Thread(target=worker) for _ in range(streams)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stats, time.monotonic() - t0


def _pct(xs: list[float], q: float) -> float:
    return sorted(xs)[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def one_run(args: argparse.Namespace) -> dict[str, float]:
    exe = shutil.which("kvrelay")
    assert exe, "kvrelay is not on PATH"
    hport, gport = _free_port(), _free_port()
    err = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(
        [exe, "serve", f"--http-port={hport}", f"--grpc-port={gport}", *args.extra],
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 300
        while _status(hport, "/ready") != 200:
            assert proc.poll() is None, "kvrelay serve exited"
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.05)
        conn = HTTPConnection("127.0.0.1", hport, timeout=30)
        conn.request("GET", "/v1/models")
        model = json.loads(conn.getresponse().read())["data"][0]["id"]
        conn.close()
        for _ in range(2):
            stream_once(hport, model, 8, None)
        stats, wall = load(hport, model, args.streams, args.requests, args.max_tokens)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert stats.tokens == args.requests * args.max_tokens, stats.tokens
    err.seek(0)
    found = re.search(r"stopped \((\d+) Ray objects of request events", err.read())
    err.close()
    streamed = stats.tokens + 2 * 8  # the warm-ups' tokens crossed too
    return {
        "tokens_per_s": stats.tokens / wall,
        "wall_s": wall,
        "chunks": stats.chunks,
        "ttft_p50_ms": 1e3 * _pct(stats.ttft, 0.5),
        "gap_p50_ms": 1e3 * _pct(stats.gaps, 0.5),
        "gap_p99_ms": 1e3 * _pct(stats.gaps, 0.99),
        "ray_objects_per_token": int(found.group(1)) / streamed if found else float("nan"),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("extra", nargs="*", help="flags for kvrelay serve (after --)")
    args = p.parse_args(argv)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    runs = []
    for i in range(args.runs):
        r = one_run(args)
        runs.append(r)
        print(
            f"run {i}: "
            + "  ".join(f"{k} {v:.{3 if k.startswith('ray') else 1}f}" for k, v in r.items()),
            flush=True,
        )
    vals = [r["tokens_per_s"] for r in runs]
    print(
        f"tokens/s: median {statistics.median(vals):.1f}  min {min(vals):.1f}  "
        f"max {max(vals):.1f}  (n={len(vals)}, {args.streams} streams x {args.max_tokens} "
        f"tokens, cpus={os.cpu_count()})"
    )
    print(f"load average at end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
