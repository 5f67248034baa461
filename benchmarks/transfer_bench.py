"""KV handoff throughput of the transport against the machine's copy bandwidth.

    python benchmarks/transfer_bench.py                  # CPU: gloo over loopback
    python benchmarks/transfer_bench.py --device cuda    # one GPU: the same-GPU CUDA IPC path

Two processes on one host: this one hosts the rendezvous store and sends, a spawned one
receives. One timed iteration = ``send_blocks`` (pack: one gather) -> ``recv_blocks`` (unpack:
one scatter, synchronised on CUDA) -> a one-element ack back; the sender's wall time from
send start to ack. Blocks have the default model's geometry (SmolLM2-135M: 30 layers, 3 KV heads,
head_dim 64, block 16, fp32 = 737,280 bytes) and are drawn at random from a cache of
max(512, largest row) blocks, so every row moves as many blocks as it names. After each row
the sender's byte counter must have grown by exactly iterations x blocks x block bytes, or the
benchmark stops: a row cannot claim bytes it did not move.

Limit: bytes copied per second by one large ``copy_`` on the same device (256 MiB on CPU,
1 GiB on CUDA), i.e. what a single memcpy of the payload would cost; the ratio is ours / limit.
A handoff does at least three copies of the payload (pack, move, unpack) plus, over loopback
TCP, two kernel copies, so a ratio near 1/3 is already close to what the data path allows.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.multiprocessing as mp

from kvrelay.workers.transport.kv_transport import KVTransport, start_rendezvous_store

GEOMETRY = (30, 2, 16, 3, 64)  # [L, 2, bs, Hkv, D]
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4
MIN_CACHE_BLOCKS = 512


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cache_blocks(plan: list[tuple[int, int]]) -> int:
    """Enough blocks for the largest row (a random draw of n ids needs n blocks)."""
    return max(MIN_CACHE_BLOCKS, *(n for n, _ in plan))


def receiver(port: int, device_name: str, plan: list[tuple[int, int]]) -> None:
    device = torch.device(device_name)
    with KVTransport("bench-d", "127.0.0.1", port, device=device, timeout_s=120) as d:
        cache = torch.zeros((cache_blocks(plan), *GEOMETRY), device=device)
        for it in range(20):  # tiny round trips (latency floor)
            d.recv("bench-p", f"ping{it}")
            d.send("bench-p", f"pong{it}", torch.zeros(1, device=device))
        for n_blocks, iters in plan:
            for it in range(iters):
                ids = torch.randperm(cache.shape[0])[:n_blocks]
                d.recv_blocks("bench-p", f"b{n_blocks}.{it}", cache, ids)
                sync(device)
                d.send("bench-p", f"ack{n_blocks}.{it}", torch.zeros(1, device=device))


def copy_limit(device: torch.device) -> float:
    n = (1 << 30 if device.type == "cuda" else 256 << 20) // 4
    x = torch.randn(n, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(10):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return n * 4 / statistics.median(times[2:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[16, 256])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    plan = [(n, args.iters) for n in args.blocks]
    store, port = start_rendezvous_store()
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    child = ctx.Process(target=receiver, args=(port, str(device), plan))
    child.start()
    limit = copy_limit(device)
    with KVTransport("bench-p", "127.0.0.1", port, device=device, timeout_s=120) as p:
        cache = torch.randn((cache_blocks(plan), *GEOMETRY), device=device)
        rtts = []
        for it in range(20):
            t0 = time.perf_counter()
            p.send("bench-d", f"ping{it}", torch.zeros(1, device=device))
            p.recv("bench-d", f"pong{it}")
            rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts[5:])
        path = "CUDA IPC (same GPU)" if device.type == "cuda" else "gloo, loopback TCP"
        print(f"\n## KV transfer, {path}; limit = one copy_ on {device} = {limit / 1e9:.2f} GB/s")
        print(f"tiny round trip (send + recv of one element each way): {rtt * 1e3:.2f} ms\n")
        print("| blocks | MiB | median ms | GB/s | limit GB/s | ratio |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for n_blocks, iters in plan:
            times = []
            before = p.stats().peers["bench-d"].bytes_sent
            for it in range(iters):
                ids = torch.randperm(cache.shape[0])[:n_blocks]
                t0 = time.perf_counter()
                p.send_blocks("bench-d", f"b{n_blocks}.{it}", cache, ids)
                p.recv("bench-d", f"ack{n_blocks}.{it}")
                times.append(time.perf_counter() - t0)
            t = statistics.median(times[2:])
            nbytes = n_blocks * BLOCK_BYTES
            moved = p.stats().peers["bench-d"].bytes_sent - before
            if moved != iters * nbytes:
                raise SystemExit(
                    f"row of {n_blocks} blocks moved {moved} bytes, not {iters} x {nbytes}"
                )
            gbs = nbytes / t / 1e9
            print(
                f"| {n_blocks} | {nbytes / 2**20:.1f} | {t * 1e3:.2f} | {gbs:.2f} "
                f"| {limit / 1e9:.2f} | {gbs / (limit / 1e9):.2f} |"
            )
        stats = p.stats().peers["bench-d"]
        print(f"\nsender counters: {stats.bytes_sent} bytes in {stats.transfers_sent} transfers")
        child.join(60)  # before our transport closes: the receiver may still map our memory
    del store


if __name__ == "__main__":
    main()
