"""KV handoff throughput of the transport against a plain copy of the same bytes.

    python benchmarks/transfer_bench.py                  # CPU: gloo over loopback
    python benchmarks/transfer_bench.py --device cuda    # one GPU: the same-GPU CUDA IPC path

Two processes on one host: this one hosts the rendezvous store and sends, a spawned one
receives. One timed iteration runs until the sender knows the blocks are in the receiver's
cache: on the CUDA IPC path that is ``send_blocks``' own return (the receiver copies straight
out of the sender's cache, synchronises, then acks); on gloo ``send_blocks`` (pack: one gather)
returns once the bytes are sent, so the receiver's ``recv_blocks`` (unpack: one scatter) is
followed by a one-element ack back. Blocks have the default model's geometry (SmolLM2-135M: 30
layers, 3 KV heads, head_dim 64, block 16, fp32 = 737,280 bytes) and are drawn at random from
caches of max(512, largest row) blocks on both sides, so every row moves as many blocks as it
names. Bytes come from the transport's counters: after each row the sender's byte counter must
have grown by exactly iterations x blocks x block bytes, and at the end the receiver's received
counter must equal the sender's sent counter, or the benchmark stops.

Limit, per row: one ``copy_`` of the same number of bytes on the same device (contiguous, the
fastest of 12 in this run); the fraction is copy time / handoff time (median of the row's
iterations after two warm-up ones). The same-GPU path does one device pass
over the payload, so 1.0 is its ceiling; gloo packs, moves (two kernel copies over loopback TCP)
and unpacks. The fixed time per transfer is the 1-block row's time less its copy's.
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


def acked(t: KVTransport, peer: str) -> bool:
    """Whether an iteration needs an ack back: not on the same-GPU path (see the docstring)."""
    return t.path(peer) != "cuda-ipc"


def receiver(port: int, device_name: str, plan: list[tuple[int, int]]) -> None:
    device = torch.device(device_name)
    with KVTransport("bench-d", "127.0.0.1", port, device=device, timeout_s=120) as d:
        cache = torch.zeros((cache_blocks(plan), *GEOMETRY), device=device)
        for it in range(20):  # tiny round trips (latency floor)
            d.recv("bench-p", f"ping{it}")
            d.send("bench-p", f"pong{it}", torch.zeros(1, device=device))
        ack = acked(d, "bench-p")
        for n_blocks, iters in plan:
            for it in range(iters):
                ids = torch.randperm(cache.shape[0])[:n_blocks]
                d.recv_blocks("bench-p", f"b{n_blocks}.{it}", cache, ids)
                if ack:
                    sync(device)
                    d.send("bench-p", f"ack{n_blocks}.{it}", torch.zeros(1, device=device))
        received = d.stats().peers["bench-p"].bytes_received
        d.send("bench-p", "received", torch.tensor([received], dtype=torch.int64))


def copy_time(nbytes: int, device: torch.device, reps: int = 12) -> float:
    """Seconds of one ``copy_`` of ``nbytes`` contiguous bytes on ``device``: the fastest of
    ``reps`` (a limit, so the best case; the first touches fault pages in)."""
    x = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    times = []
    for _ in range(reps):
        sync(device)
        t0 = time.perf_counter()
        y.copy_(x)
        sync(device)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 256, 1024])
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    if args.iters < 3:
        parser.error("--iters must be at least 3 (the first two are warm-up)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    plan = [(n, args.iters) for n in args.blocks]
    store, port = start_rendezvous_store()
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    child = ctx.Process(target=receiver, args=(port, str(device), plan))
    child.start()
    with KVTransport("bench-p", "127.0.0.1", port, device=device, timeout_s=120) as p:
        cache = torch.randn((cache_blocks(plan), *GEOMETRY), device=device)
        rtts = []
        for it in range(20):
            t0 = time.perf_counter()
            p.send("bench-d", f"ping{it}", torch.zeros(1, device=device))
            p.recv("bench-d", f"pong{it}")
            rtts.append(time.perf_counter() - t0)
        rtt = statistics.median(rtts[5:])
        ack = acked(p, "bench-d")
        path = {"cuda-ipc": "CUDA IPC (same GPU)", "gloo": "gloo, loopback TCP"}[
            str(p.path("bench-d"))
        ]
        done = "+ one-element ack back" if ack else "(returns once the receiver copied)"
        print(f"\n## KV transfer, {path}; one iteration = send_blocks {done}")
        print(f"cache: {cache.shape[0]} blocks of {BLOCK_BYTES} B on each side, on {device}")
        print(f"tiny round trip (send + recv of one element each way): {rtt * 1e3:.3f} ms\n")
        print("| blocks | MiB (counted) | median ms | GB/s | copy of the same bytes ms | "
              "copy GB/s | fraction of the copy |")  # fmt: skip
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        fixed = None
        for n_blocks, iters in plan:
            times = []
            before = p.stats().peers["bench-d"].bytes_sent
            for it in range(iters):
                ids = torch.randperm(cache.shape[0])[:n_blocks]
                t0 = time.perf_counter()
                p.send_blocks("bench-d", f"b{n_blocks}.{it}", cache, ids)
                if ack:
                    p.recv("bench-d", f"ack{n_blocks}.{it}")
                times.append(time.perf_counter() - t0)
            moved = p.stats().peers["bench-d"].bytes_sent - before
            if moved != iters * n_blocks * BLOCK_BYTES:
                raise SystemExit(
                    f"row of {n_blocks} blocks moved {moved} bytes, not "
                    f"{iters} x {n_blocks} x {BLOCK_BYTES}"
                )
            nbytes = moved // iters
            t = statistics.median(times[2:])
            tc = copy_time(nbytes, device)
            if n_blocks == 1:
                fixed = t - tc
            print(
                f"| {n_blocks} | {nbytes / 2**20:.1f} | {t * 1e3:.3f} | {nbytes / t / 1e9:.2f} "
                f"| {tc * 1e3:.3f} | {nbytes / tc / 1e9:.2f} | {tc / t:.3f} |"
            )
        if fixed is not None:
            print(f"\nfixed time per transfer (1-block row less its copy): {fixed * 1e3:.3f} ms")
        stats = p.stats().peers["bench-d"]
        received = int(p.recv("bench-d", "received")[0])
        print(
            f"sender counters: {stats.bytes_sent} bytes in {stats.transfers_sent} transfers; "
            f"receiver counted {received} bytes received"
        )
        if received != stats.bytes_sent:
            raise SystemExit("the receiver's byte counter disagrees with the sender's")
        child.join(60)  # before our transport closes: the receiver may still map our memory
    del store


if __name__ == "__main__":
    main()
