"""Cold start of ``kvrelay serve``: seconds from the command to ``/ready`` = 200 and to the first
successful completion, on the default model (GGUF cache warm: the first run exports it, and is
reported separately), a local 1P+1D CPU cluster.

    python benchmarks/cold_start.py --runs 3 [-- extra kvrelay serve flags]

Each run starts ``kvrelay serve`` on fresh ports, polls /ready every 20 ms, sends one completion,
then SIGTERMs the server and waits for it to exit; phases come from its own log lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str, body: dict[str, object] | None = None) -> int:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            r.read()
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except OSError:
        return 0


def one_run(extra: list[str]) -> dict[str, float]:
    exe = shutil.which("kvrelay")
    assert exe, "kvrelay is not on PATH"
    hport, gport = _free_port(), _free_port()
    t0 = time.monotonic()
    proc = subprocess.Popen(
        [exe, "serve", f"--http-port={hport}", f"--grpc-port={gport}", *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    out: dict[str, float] = {}
    try:
        base = f"http://127.0.0.1:{hport}"
        while _get(base + "/health") != 200:
            assert proc.poll() is None, "kvrelay serve exited"
            time.sleep(0.02)
        out["health_s"] = time.monotonic() - t0
        body = {"model": "", "prompt": "Hello", "max_tokens": 1, "temperature": 0}
        while (ready := _get(base + "/ready")) != 200:
            assert proc.poll() is None, "kvrelay serve exited"
            if ready == 404:  # a build without /ready (before issue 15): poll requests instead
                if _get(base + "/v1/completions", body) == 200:
                    break
            time.sleep(0.02)
        out["ready_s"] = time.monotonic() - t0
        status = _get(base + "/v1/completions", body)
        out["first_ok_s"] = time.monotonic() - t0
        assert status == 200, status
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("extra", nargs="*", help="flags for kvrelay serve (after --)")
    args = p.parse_args(argv)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    warm = one_run(args.extra)  # exports the GGUF cache if needed; not counted
    print(f"warm-up run: {json.dumps({k: round(v, 2) for k, v in warm.items()})}", flush=True)
    runs = [one_run(args.extra) for _ in range(args.runs)]
    for i, r in enumerate(runs):
        print(f"run {i}: " + "  ".join(f"{k} {v:.2f}" for k, v in r.items()), flush=True)
    for key in ("health_s", "ready_s", "first_ok_s"):
        vals = [r[key] for r in runs]
        print(f"{key}: median {statistics.median(vals):.2f} s  min {min(vals):.2f}  "
              f"max {max(vals):.2f}  (n={len(vals)}, cpus={os.cpu_count()})")
    print(f"load average at end: {os.getloadavg()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
