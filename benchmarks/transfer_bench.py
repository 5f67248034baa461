"""KV handoff throughput of the transport against a plain copy of the same bytes.

    python benchmarks/transfer_bench.py                  # CPU: gloo over loopback
    python benchmarks/transfer_bench.py --device cuda    # one GPU: the same-GPU CUDA IPC path,
                                                         # with IPC events, then with host syncs
    python benchmarks/transfer_bench.py --control        # CPU: the same-GPU path's control round
                                                         # trip (link vs the store it replaced)

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

On CUDA, ``--ipc-events both`` (the default) runs the table twice, each with fresh processes:
the same-GPU path ordered by CUDA IPC events (no host sync on either side), then with a stream
synchronisation on each side (``KVTransport(ipc_events=False)``, the path before). At the end
of each run both sides' counters must agree: bytes and transfers the sender sent = what the
receiver received and the other way round (pings, pongs, acks), and no failures on either side.

Where a same-GPU transfer's fixed time goes, phase by phase: transfer_phases.py.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import queue
import socket
import statistics
import threading
import time
from dataclasses import replace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvrelay.workers.transport.kv_transport import KVTransport, start_rendezvous_store
from kvrelay.workers.transport.link import Kind, accept_link, connect_link
from kvrelay.workers.transport.wire import Header, TransferError, block_ids_section

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


def receiver(port: int, device_name: str, plan: list[tuple[int, int]], events: bool) -> None:
    device = torch.device(device_name)
    with KVTransport(
        "bench-d", "127.0.0.1", port, device=device, timeout_s=120, ipc_events=events
    ) as d:
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
        s = d.stats().peers["bench-p"]
        counts = [s.bytes_received, s.transfers_received, s.bytes_sent, s.transfers_sent]
        d.send("bench-p", "received", torch.tensor([*counts, s.failures], dtype=torch.int64))


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


# ---- --control: the same-GPU path's control round trip, on CPU -------------------------------
CONTROL_ROUNDS = 2000


def one_block_header(seq: int) -> Header:
    """A 1-block same-GPU ``send_blocks`` header: real field sizes (64-byte CUDA IPC handles as
    hex, the ref-counter file name, the block id), dummy values."""
    ipc = {
        "size": [BLOCK_BYTES * 1024], "stride": [1], "offset": 0, "storage_cls": "UntypedStorage",
        "handle": "ab" * 64, "storage_size": BLOCK_BYTES * 1024, "storage_offset": 0,
        "ref_handle": "/torch_12345_1234567890_0", "ref_offset": 0, "event_handle": "cd" * 64,
        "event_sync": True, "cache_shape": [1024, *GEOMETRY],
        "ready": "ef" * 64,
    }  # fmt: skip
    shape = (1, *GEOMETRY)
    ids = block_ids_section(torch.tensor([seq % 1024]))
    return Header(seq, f"b1.{seq}", torch.float32, shape, BLOCK_BYTES, ipc=ipc, blocks=ids)


def control_client(port: int) -> dist.Store:
    return dist.TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(60))


def control_receiver(port: int, rounds: int) -> None:
    """Spawned: the receiving side of each exchange. A reader thread takes every header and
    hands it to this (caller) thread, which acks: the thread structure of a channel."""
    ctl = control_client(port)
    ctl.wait(["ctl/link"])
    link = connect_link(ctl.get("ctl/link"), time.monotonic() + 60)
    seqs: queue.SimpleQueue[int] = queue.SimpleQueue()

    def read_link() -> None:
        with contextlib.suppress(TransferError):
            while True:
                frame = link.recv()
                if frame.kind == Kind.HEADER:
                    seqs.put(Header.decode(frame.body).seq)

    def read_store() -> None:  # what a channel's reader did before: wait + get, delete
        reader = control_client(port)
        for seq in range(rounds):
            seqs.put(Header.decode(reader.get(f"ctl/msg/{seq}")).seq)
            reader.delete_key(f"ctl/msg/{seq}")

    threading.Thread(target=read_link, daemon=True).start()
    for _ in range(rounds):
        link.ack(seqs.get(), time.monotonic() + 10)
    threading.Thread(target=read_store, daemon=True).start()
    for _ in range(rounds):
        ctl.compare_set(f"ctl/ack/{seqs.get()}", "", "done")
    ctl.wait(["ctl/echo"])
    with socket.socket(socket.AF_UNIX) as echo:
        echo.connect("\0" + ctl.get("ctl/echo").decode())
        for _ in range(rounds):
            echo.sendall(echo.recv(64))
    link.close("done")


def control(rounds: int) -> None:
    """Time one same-GPU transfer's control exchange, CPU only: the link now, the store protocol
    before, a bare Unix-socket ping-pong (the limit)."""
    store, port = start_rendezvous_store()
    ctl, waiter = control_client(port), control_client(port)
    child = mp.get_context("spawn").Process(target=control_receiver, args=(port, rounds))
    child.start()
    link = accept_link(lambda address: ctl.set("ctl/link", address), time.monotonic() + 60)
    rows = {"link": [], "store": [], "bare": []}
    for seq in range(rounds):
        t0 = time.perf_counter()
        if not link.publish(seq, one_block_header(seq).encode(), time.monotonic() + 10):
            raise SystemExit(f"link: no ack for {seq}")
        rows["link"].append(time.perf_counter() - t0)
    for seq in range(rounds):  # the sender's part before: set the header, delete the last ack,
        t0 = time.perf_counter()  # wait for this one (receiver: get, compare_set, delete)
        # (the store takes text: this header's JSON, its 8-byte id section left out)
        ctl.set(f"ctl/msg/{seq}", replace(one_block_header(seq), blocks=None).encode().decode())
        if seq:
            ctl.delete_key(f"ctl/ack/{seq - 1}")
        waiter.wait([f"ctl/ack/{seq}"])
        rows["store"].append(time.perf_counter() - t0)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(f"\0kvrelay-bench-{os.getpid()}")  # abstract, as the link's
        listener.listen(1)
        ctl.set("ctl/echo", f"kvrelay-bench-{os.getpid()}")
        echo, _ = listener.accept()
        with echo:
            for _ in range(rounds):
                t0 = time.perf_counter()
                echo.sendall(b"x" * 13)
                echo.recv(64)
                rows["bare"].append(time.perf_counter() - t0)
    child.join(60)
    link.close("done")
    link.release()
    names = {
        "link": "link (now): HEADER → ACK → CONFIRM, workers/transport/link.py",
        "store": "store (before): set, delete, wait; the receiver: get, compare_set, delete",
        "bare": "limit: bare 13-byte ping-pong, one Unix socket, no threads",
    }
    print(f"\n## Same-GPU transfer control round trip on CPU ({rounds} rounds, 1-block header)")
    print("one round: the sender sends a header and returns on the receiver's ack; the receiver's")
    print("reader thread decodes it and hands it to a caller thread, which acks (as a channel)\n")
    print("| exchange | median µs | p10 µs | p90 µs |")
    print("| --- | ---: | ---: | ---: |")
    for key, times in rows.items():
        ts = sorted(times[rounds // 10 :])  # the first tenth warms up
        p = [ts[len(ts) // 2], ts[len(ts) // 10], ts[len(ts) * 9 // 10]]
        print(f"| {names[key]} | " + " | ".join(f"{v * 1e6:.0f}" for v in p) + " |")
    print(
        "\nthe store row leaves out the two per-transfer reads of the pair's prefix (multi_get "
        "on each side) that the same-GPU path also paid before; the link path has none"
    )
    del store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 16, 256, 1024])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument(
        "--ipc-events",
        choices=["on", "off", "both"],
        default="both",
        help="same GPU: order the copy with CUDA IPC events (on), host syncs (off), or both runs",
    )
    parser.add_argument(
        "--control", action="store_true", help="only the same-GPU control round trip, on CPU"
    )
    args = parser.parse_args()
    if args.control:
        control(CONTROL_ROUNDS)
        return
    if args.iters < 3:
        parser.error("--iters must be at least 3 (the first two are warm-up)")
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
        device = torch.device("cuda", 0)
    plan = [(n, args.iters) for n in args.blocks]
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.ipc_events]
    for events in modes if device.type == "cuda" else [True]:
        handoff(device, plan, events)


def handoff(device: torch.device, plan: list[tuple[int, int]], events: bool) -> None:
    """One table: the plan's rows between this process and a spawned receiver."""
    store, port = start_rendezvous_store()
    ctx = mp.get_context("spawn")  # CUDA cannot be used in a forked child
    child = ctx.Process(target=receiver, args=(port, str(device), plan, events))
    child.start()
    with KVTransport(
        "bench-p", "127.0.0.1", port, device=device, timeout_s=120, ipc_events=events
    ) as p:
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
        if p.path("bench-d") == "cuda-ipc":
            path += ", IPC events" if p.ipc_events("bench-d") else ", host syncs"
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
        before = p.stats().peers["bench-d"]
        theirs = p.recv("bench-d", "received").tolist()  # [5] int64: the receiver's counters
        s = p.stats().peers["bench-d"]
        print(
            f"sender sent {s.bytes_sent} bytes in {s.transfers_sent} transfers, received "
            f"{before.bytes_received} in {before.transfers_received}, {s.failures} failures; "
            f"the receiver received {theirs[0]} in {theirs[1]}, sent {theirs[2]} in "
            f"{theirs[3]}, {theirs[4]} failures"
        )
        mine = [s.bytes_sent, s.transfers_sent, before.bytes_received, before.transfers_received]
        if theirs != [*mine, 0] or s.failures or s.transfers_received != mine[3] + 1:
            raise SystemExit("the two sides' counters disagree (or a transfer failed)")
        child.join(60)  # before our transport closes: the receiver may still map our memory
    del store


if __name__ == "__main__":
    main()
