"""KV relay across a real network link vs loopback, and the latency crossing hosts adds.

    sudo python benchmarks/relay_bench.py                       # both parts (needs root, iproute2)
    python benchmarks/relay_bench.py --part relay --iters 10
    python benchmarks/relay_bench.py --part ttft --prompt-tokens 1024 4096 --reps 3

Hosts are network namespaces on this machine (tests/netns_hosts.py): a veth pair per host to
a bridge, so "across hosts" means through two veth pairs and a bridge in the kernel, with no
NIC: a lower bound on what a real network costs, and the upper bound of what the transport can
push through the kernel's TCP path here.

Part ``relay``: two processes, a ``KVTransport`` each (gloo); the sender ``send_blocks`` a
request's KV (the default model's geometry: 737,280 bytes per 16-token block, so a 1k-token
prompt is 64 blocks = 45 MiB and a 4k-token prompt 256 blocks = 180 MiB), the receiver
``recv_blocks`` it into random blocks of its cache and acks; the sender's wall time from send
to ack. ``loopback``: both processes in one namespace on 127.0.0.1; ``veth``: one per
namespace, each bound to its host's address. The veth link's byte counters
(/sys/class/net/eth0/statistics) are read around the run to show the bytes really crossed.

Part ``ttft``: a real kvrelay cluster (Ray head + controller on one host), 1 prefill and
1 decode worker, either both on one host (``same host``) or on two hosts (``cross host``);
one request at a time, a fresh random prompt each (no prefix-cache hits), 2 greedy tokens.
TTFT is when the first token reaches the client: the prefill worker emits it before the
handoff, so crossing hosts should add almost nothing there; the second token arrives after
the KV crossed to the decode worker and one decode step, so the crossing shows up in it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GEOMETRY = (30, 2, 16, 3, 64)  # SmolLM2-135M: [L, 2, block_size, Hkv, head_dim]
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4
BLOCK_TOKENS = 16
CACHE_BLOCKS = 320
STORE_PORT = 29511  # inside a namespace: nothing else listens there
TCP_PORT = 29512
RAY_PORT = 6379
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}


def _load(path: Path, name: str) -> Any:
    """A helper that lives outside the package (tests/) loaded by path."""
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ---- part relay: in-namespace peers ----------------------------------------------------------
def peer(args: argparse.Namespace) -> None:
    import torch

    from kvrelay.workers.transport.kv_transport import KVTransport, start_rendezvous_store

    store_host, port = args.store.rsplit(":", 1)
    store = None
    if args.role == "recv":
        store, _ = start_rendezvous_store(store_host, int(port))
    me, other = ("relay-d", "relay-p") if args.role == "recv" else ("relay-p", "relay-d")
    with KVTransport(me, store_host, int(port), bind_host=args.bind, timeout_s=120) as t:
        cache = torch.randn((CACHE_BLOCKS, *GEOMETRY))
        rows = []
        for it in range(3):  # connect and warm up
            if args.role == "send":
                t.send(other, f"w{it}", torch.zeros(1))
            else:
                t.recv(other, f"w{it}")
        for n_blocks in args.blocks:
            times = []
            for it in range(args.iters):
                ids = torch.randperm(CACHE_BLOCKS)[:n_blocks]
                tid = f"b{n_blocks}.{it}"
                if args.role == "send":
                    t0 = time.perf_counter()
                    t.send_blocks(other, tid, cache, ids)
                    t.recv(other, f"ack.{tid}")
                    times.append(time.perf_counter() - t0)
                else:
                    t.recv_blocks(other, tid, cache, ids)
                    t.send(other, f"ack.{tid}", torch.zeros(1))
            if times:
                rows.append(
                    {"blocks": n_blocks, "median_s": statistics.median(times), "min_s": min(times)}
                )
        if args.role == "send":
            print(json.dumps({"rows": rows}), flush=True)
            t.send(other, "bye", torch.zeros(1))
        else:
            t.recv(other, "bye")  # the sender read every ack before we close
    del store


def tcp_peer(args: argparse.Namespace) -> None:
    """The path's limit: one TCP stream, ``sendall`` of 16 MiB buffers, no copies on top."""
    import socket

    total, chunk = args.mib << 20, 16 << 20
    if args.role == "recv":
        with socket.create_server((args.host, TCP_PORT)) as srv:
            print("listening", flush=True)
            conn, _ = srv.accept()
            with conn:
                buf = bytearray(4 << 20)
                while conn.recv_into(buf):
                    pass
                conn.sendall(b"k")
        return
    data = b"\0" * chunk
    with socket.create_connection((args.host, TCP_PORT)) as conn:
        t0 = time.perf_counter()
        for _ in range(total // chunk):
            conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        conn.recv(1)
        print(json.dumps({"gbs": total / (time.perf_counter() - t0) / 1e9}), flush=True)


def _tcp_limit(hosts: Any, rx_host: str, tx_host: str, rx_ip: str) -> float:
    base = [sys.executable, __file__, "_tcp", "--host", rx_ip, "--mib", "512"]
    recv = hosts.popen(rx_host, [*base, "--role", "recv"], stdout=subprocess.PIPE, text=True)
    assert recv.stdout is not None and recv.stdout.readline().strip() == "listening"
    send = hosts.run(tx_host, [*base, "--role", "send"], timeout=300)
    recv.wait(timeout=60)
    if send.returncode != 0:
        raise SystemExit(f"tcp limit failed: {send.stderr[-2000:]}")
    return float(json.loads(send.stdout.strip().splitlines()[-1])["gbs"])


def relay_part(nh: Any, blocks: list[int], iters: int) -> list[dict[str, Any]]:
    results = []
    with nh.NetnsHosts(["solo", "a", "b"], tag="rb") as hosts:
        for path, (rx_host, tx_host) in (("loopback", ("solo", "solo")), ("veth", ("a", "b"))):
            rx_ip = "127.0.0.1" if path == "loopback" else hosts.ip(rx_host)
            tx_ip = "127.0.0.1" if path == "loopback" else hosts.ip(tx_host)
            common = [
                sys.executable,
                __file__,
                "_peer",
                "--store",
                f"{rx_ip}:{STORE_PORT}",
                "--iters",
                str(iters),
                "--blocks",
                *map(str, blocks),
            ]
            limit = _tcp_limit(hosts, rx_host, tx_host, rx_ip)
            before = hosts.link_bytes(tx_host)
            recv = hosts.popen(rx_host, [*common, "--role", "recv", "--bind", rx_ip])
            send = hosts.run(tx_host, [*common, "--role", "send", "--bind", tx_ip], timeout=900)
            recv.wait(timeout=120)
            if send.returncode != 0 or recv.returncode != 0:
                raise SystemExit(f"relay peers failed ({path}):\n{send.stderr[-3000:]}")
            after = hosts.link_bytes(tx_host)
            link_tx = after[1] - before[1]
            for row in json.loads(send.stdout.strip().splitlines()[-1])["rows"]:
                results.append({"path": path, "link_tx": link_tx, "limit_gbs": limit, **row})
    return results


def print_relay(rows: list[dict[str, Any]], iters: int) -> None:
    base = {r["blocks"]: r["median_s"] for r in rows if r["path"] == "loopback"}
    print(f"\n## KV relay, gloo: loopback vs across the veth link (median of {iters})\n")
    print("limit: one plain TCP stream over the same path (sendall of 16 MiB buffers)\n")
    print(
        "| path | blocks | prompt tokens | MiB | median ms | GB/s | limit GB/s | of limit "
        "| vs loopback |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        nbytes = r["blocks"] * BLOCK_BYTES
        gbs = nbytes / r["median_s"] / 1e9
        ratio = base[r["blocks"]] / r["median_s"]
        print(
            f"| {r['path']} | {r['blocks']} | {r['blocks'] * BLOCK_TOKENS} | "
            f"{nbytes / 2**20:.0f} | {r['median_s'] * 1e3:.1f} | {gbs:.2f} | "
            f"{r['limit_gbs']:.2f} | {gbs / r['limit_gbs']:.2f} | {ratio:.2f} |"
        )
    veth = [r for r in rows if r["path"] == "veth"]
    if veth:
        payload = sum(r["blocks"] * BLOCK_BYTES for r in veth) * iters
        print(
            f"\nveth: sender's eth0 tx {veth[0]['link_tx'] / 2**20:.0f} MiB for "
            f"{payload / 2**20:.0f} MiB of KV payload (x{veth[0]['link_tx'] / payload:.3f})"
        )


# ---- part ttft -------------------------------------------------------------------------------
def ttft_driver(spec: dict[str, Any]) -> None:
    """Inside the head host: ``Cluster.start`` joins the Ray cluster the hosts form, and its
    controller places 1P + 1D on the nodes offering ``kvrelay_prefill`` / ``kvrelay_decode``."""
    from kvrelay.cluster.runtime.config import ServeConfig
    from kvrelay.cluster.runtime.serve import Cluster
    from kvrelay.workers.types import SamplingParams

    cfg = ServeConfig(
        address=spec["address"],
        grpc_port=None,
        http_port=None,
        transport_host=spec["head_ip"],
        transport_interface=spec["interface"],
        placement_resource_prefix="kvrelay_",
        cpus_per_worker=spec["threads"],
        threads_per_worker=spec["threads"],
        kv_cache_gb=0.3,
        handoff_timeout_s=60.0,
    )
    cluster = Cluster.start(cfg)
    try:
        rng = random.Random(0)
        params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
        out: dict[str, Any] = {}
        (p_id,) = [w for w, role in cluster.workers().items() if role == "prefill"]
        for n in [64, *spec["prompt_tokens"]]:  # 64: warm-up (channels, first steps)
            sent0 = cluster.call("transport_totals")[p_id]
            rows = []
            for _ in range(1 if n == 64 else spec["reps"]):
                prompt = [rng.randrange(1000, 40000) for _ in range(n)]
                t0 = time.perf_counter()
                stamps = []
                for ev in cluster.generate(cluster.request(prompt, params)):
                    stamps += [time.perf_counter() - t0] * len(ev.token_ids)
                rows.append(stamps[:2])
            sent1 = cluster.call("transport_totals")[p_id]
            out[str(n)] = rows
            out[f"send_s.{n}"] = (
                sent1.get("seconds_sending", 0.0) - sent0.get("seconds_sending", 0.0)
            ) / max(1.0, sent1.get("transfers_sent", 0.0) - sent0.get("transfers_sent", 0.0))
        out["handoff_bytes"] = cluster.counters()["handoff_bytes"]
        print("RELAY-BENCH " + json.dumps(out), flush=True)
    finally:
        cluster.shutdown()


def ttft_part(nh: Any, prompt_tokens: list[int], reps: int, threads: int) -> dict[str, Any]:
    from kvrelay.cluster.cli.node import NodeArgs, ray_start_argv

    results = {}
    env = {**os.environ, **RAY_ENV}
    for mode in ("same host", "cross host"):
        names = ["head"] if mode == "same host" else ["head", "p", "d"]
        with nh.NetnsHosts(names, tag="tt") as hosts:
            head_ip = hosts.ip("head")

            def start(host: str, args: NodeArgs, _h: Any = hosts) -> None:
                argv = ray_start_argv(args, ray_bin=str(Path(sys.executable).parent / "ray"))
                res = _h.run(host, argv, env=env, timeout=120)
                if res.returncode != 0:
                    raise SystemExit(f"ray start on {host} failed:\n{res.stderr[-3000:]}")

            common = {"object_store_bytes": 100_000_000}
            if mode == "same host":
                slots = json.dumps({"kvrelay_prefill": 1, "kvrelay_decode": 1})
                start(
                    "head",
                    NodeArgs(
                        "none",
                        head=True,
                        port=RAY_PORT,
                        node_ip=head_ip,
                        num_cpus=2 * threads,
                        temp_dir=hosts.temp_dir("head"),
                        extra=(f"--resources={slots}",),
                        **common,
                    ),
                )
            else:
                start(
                    "head",
                    NodeArgs(
                        "none",
                        head=True,
                        port=RAY_PORT,
                        node_ip=head_ip,
                        num_cpus=0,
                        temp_dir=hosts.temp_dir("head"),
                        **common,
                    ),
                )
                for host, role in (("p", "prefill"), ("d", "decode")):
                    start(
                        host,
                        NodeArgs(
                            role,
                            address=f"{head_ip}:{RAY_PORT}",
                            node_ip=hosts.ip(host),
                            num_cpus=threads,
                            slots=1,
                            temp_dir=hosts.temp_dir(host),
                            **common,
                        ),
                    )
            spec = {
                "address": f"{head_ip}:{RAY_PORT}",
                "head_ip": head_ip,
                "interface": "lo" if mode == "same host" else "eth0",
                "prompt_tokens": prompt_tokens,
                "reps": reps,
                "threads": threads,
            }
            res = hosts.run(
                "head", [sys.executable, __file__, "_ttft", json.dumps(spec)], env=env, timeout=1800
            )
            lines = [ln for ln in res.stdout.splitlines() if ln.startswith("RELAY-BENCH ")]
            if res.returncode != 0 or not lines:
                raise SystemExit(f"ttft driver failed ({mode}):\n{res.stderr[-4000:]}")
            results[mode] = json.loads(lines[-1].split(" ", 1)[1])
    return results


def print_ttft(results: dict[str, Any], prompt_tokens: list[int], reps: int) -> None:
    print(
        f"\n## Latency added by crossing hosts (1P + 1D, one request at a time, median of {reps})\n"
    )
    print("TTFT: first token at the client (emitted by the prefill worker before the handoff);")
    print("2nd token: after the KV relay and one decode step; relay: the prefill worker's mean")
    print("time inside send_blocks per handoff (transport counters)\n")
    print(
        "| prompt tokens | TTFT same host ms | TTFT cross host ms | ratio | "
        "2nd token same host ms | 2nd token cross host ms | added ms | ratio | "
        "relay same host ms | relay cross host ms |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in prompt_tokens:
        same, cross = results["same host"], results["cross host"]
        t1s, t1c = (statistics.median(r[0] for r in x[str(n)]) * 1e3 for x in (same, cross))
        t2s, t2c = (statistics.median(r[1] for r in x[str(n)]) * 1e3 for x in (same, cross))
        print(
            f"| {n} | {t1s:.0f} | {t1c:.0f} | {t1c / t1s:.2f} | {t2s:.0f} | {t2c:.0f} | "
            f"{t2c - t2s:+.0f} | {t2c / t2s:.2f} | {same[f'send_s.{n}'] * 1e3:.0f} | "
            f"{cross[f'send_s.{n}'] * 1e3:.0f} |"
        )
    print(
        f"\nKV relayed: {results['cross host']['handoff_bytes'] / 2**20:.0f} MiB (cross host run)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd")
    p = sub.add_parser("_peer")
    p.add_argument("--role", choices=["send", "recv"], required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--bind", required=True)
    p.add_argument("--blocks", type=int, nargs="+", required=True)
    p.add_argument("--iters", type=int, required=True)
    c = sub.add_parser("_tcp")
    c.add_argument("--role", choices=["send", "recv"], required=True)
    c.add_argument("--host", required=True)
    c.add_argument("--mib", type=int, required=True)
    t = sub.add_parser("_ttft")
    t.add_argument("spec")
    parser.add_argument("--part", choices=["relay", "ttft", "all"], default="all")
    parser.add_argument("--blocks", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args()
    if args.cmd == "_peer":
        return peer(args)
    if args.cmd == "_tcp":
        return tcp_peer(args)
    if args.cmd == "_ttft":
        return ttft_driver(json.loads(args.spec))
    nh = _load(ROOT / "tests" / "netns_hosts.py", "kvrelay_netns_hosts")
    reason = nh.why_unavailable()
    if reason:
        raise SystemExit(f"relay_bench: {reason}")
    print(
        f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs "
        "(other work on the machine skews both columns)"
    )
    if args.part in ("relay", "all"):
        print_relay(relay_part(nh, args.blocks, args.iters), args.iters)
    if args.part in ("ttft", "all"):
        print_ttft(
            ttft_part(nh, args.prompt_tokens, args.reps, args.threads),
            args.prompt_tokens,
            args.reps,
        )
    print(f"\nload average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
