"""KV handoff throughput of the transport against a plain copy of the same bytes.

    python benchmarks/transfer_bench.py                  # CPU: gloo over loopback
    python benchmarks/transfer_bench.py --device cuda    # one GPU: the same-GPU CUDA IPC path,
                                                         # with IPC events, then with host syncs
    python benchmarks/transfer_bench.py --control        # CPU: the same-GPU path's control round
                                                         # trip (link vs the store it replaced)
    python benchmarks/transfer_bench.py --device cuda --phases   # one GPU: where the fixed time
                                                         # of a same-GPU transfer goes, phase by phase
    python benchmarks/transfer_bench.py --phases         # CPU: the same phase table, both ends in
                                                         # one process, CUDA IPC stood in for

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

``--phases`` (issue 16: what to cut): rows of 1 and 256 blocks (``--blocks``), each run as four
interleaved sub-rows with the transport's phase trace (workers/transport/trace.py) off, on,
off, on, both sides switched together between sub-rows (a tiny message from the receiver says
it switched). Per row: ``send_blocks`` timed from outside with the trace off and on (the
trace's cost, next to the cost of its marks measured alone), then, for the traced transfers
after each sub-row's first two, the sender's and the receiver's marks of one transfer joined by
(channel, seq) on one time axis (CLOCK_MONOTONIC, shared by the processes of a host): each
mark's time from the sender's entry and each step since the same side's previous mark (median,
p10, p90 in µs), the three messages' crossings (from the writer's last mark before the write to
the reader's mark after the read), and the sum check: the sender's steps add up to its
enter → return by construction, so the check is against the time measured around
``send_blocks``: measured = traced + what lies outside the record (the call and
``KVTransport``'s counters), and outside must not be negative. The benchmark stops when a
traced transfer lacks the other side's record or the counters disagree. On CPU the same table
comes from the real channel code in one process with the CUDA IPC handles, the stream and the
events stood in for (no device work: ``ids``, ``ready``, ``done`` do not exist there).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import itertools
import os
import queue
import socket
import statistics
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from kvrelay.workers.transport.kv_transport import KVTransport, start_rendezvous_store
from kvrelay.workers.transport.link import Kind, accept_link, connect_link
from kvrelay.workers.transport.trace import (
    RECV_PHASES,
    SEND_PHASES,
    TRACE_KEEP,
    Tracer,
    TransferRecord,
    join,
)
from kvrelay.workers.transport.wire import Header, TransferError

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
    hex, the ref-counter file name, the block list), dummy values."""
    ipc = {
        "size": [BLOCK_BYTES * 1024], "stride": [1], "offset": 0, "storage_cls": "UntypedStorage",
        "handle": "ab" * 64, "storage_size": BLOCK_BYTES * 1024, "storage_offset": 0,
        "ref_handle": "/torch_12345_1234567890_0", "ref_offset": 0, "event_handle": "cd" * 64,
        "event_sync": True, "blocks": [seq % 1024], "cache_shape": [1024, *GEOMETRY],
        "ready": "ef" * 64,
    }  # fmt: skip
    shape = (1, *GEOMETRY)
    return Header(seq, f"b1.{seq}", torch.float32, shape, BLOCK_BYTES, ipc=ipc)


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
        if not link.publish(seq, one_block_header(seq).encode().encode(), time.monotonic() + 10):
            raise SystemExit(f"link: no ack for {seq}")
        rows["link"].append(time.perf_counter() - t0)
    for seq in range(rounds):  # the sender's part before: set the header, delete the last ack,
        t0 = time.perf_counter()  # wait for this one (receiver: get, compare_set, delete)
        ctl.set(f"ctl/msg/{seq}", one_block_header(seq).encode())
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


# ---- --phases: where one same-GPU transfer's time goes (issue 16) -----------------------------
PHASE_ITERS = 100  # per sub-row; four sub-rows (trace off, on, off, on) per row
PHASE_WARMUP = 2  # transfers of each sub-row left out
Timed = dict[str, tuple[int, int]]  # transfer id -> (monotonic ns before, after send_blocks)


def phase_plan(blocks: list[int], iters: int) -> list[tuple[int, int, bool]]:
    """(blocks, iterations, trace on) sub-rows: off, on, off, on for each row."""
    return [(n, iters, on) for n in blocks for on in (False, True, False, True)]


def phase_receiver(
    port: int, device_name: str, plan: list[tuple[int, int, bool]], events: bool, out: Any
) -> None:
    """Spawned: receives every sub-row, switching its trace before each and saying so; puts
    its receive records (plain, picklable) on ``out`` at the end."""
    device = torch.device(device_name)
    records: list[TransferRecord] = []
    with KVTransport(
        "bench-d", "127.0.0.1", port, device=device, timeout_s=120, ipc_events=events, trace=False
    ) as d:
        cache = torch.zeros((cache_blocks([(n, 1) for n, _, _ in plan]), *GEOMETRY), device=device)
        d.recv("bench-p", "hello")
        for row, (n_blocks, iters, on) in enumerate(plan):
            d.tracer.enabled = on
            d.send("bench-p", f"row{row}", torch.zeros(1, device=device))  # switched
            for it in range(iters):
                ids = torch.randperm(cache.shape[0])[:n_blocks]
                d.recv_blocks("bench-p", f"b{row}.{it}", cache, ids)
            d.tracer.enabled = False
            records += d.trace("bench-p", "recv")
            d.tracer.clear()
        s = d.stats().peers["bench-p"]
        out.put((records, [s.bytes_received, s.transfers_received, s.failures]))
        d.recv("bench-p", "bye")  # the sender has the records: our memory is no longer read


def phases(device: torch.device, blocks: list[int], iters: int, events: bool) -> None:
    """The phase tables of one run (fresh processes) between this process and a receiver."""
    plan = phase_plan(blocks, iters)
    store, port = start_rendezvous_store()
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    child = ctx.Process(target=phase_receiver, args=(port, str(device), plan, events, out))
    child.start()
    with KVTransport(
        "bench-p", "127.0.0.1", port, device=device, timeout_s=120, ipc_events=events, trace=False
    ) as p:
        p.send("bench-d", "hello", torch.zeros(1, device=device))
        cache = torch.randn((cache_blocks([(n, 1) for n in blocks]), *GEOMETRY), device=device)
        path = str(p.path("bench-d"))
        rows: list[tuple[int, bool, Timed, list[TransferRecord]]] = []
        for row, (n_blocks, sub_iters, on) in enumerate(plan):
            p.recv("bench-d", f"row{row}")  # the receiver switched its trace
            p.tracer.enabled = on
            before = p.stats().peers["bench-d"].bytes_sent
            timed: Timed = {}
            for it in range(sub_iters):
                ids = torch.randperm(cache.shape[0])[:n_blocks]
                t0 = time.monotonic_ns()
                p.send_blocks("bench-d", f"b{row}.{it}", cache, ids)
                timed[f"b{row}.{it}"] = (t0, time.monotonic_ns())
            p.tracer.enabled = False
            moved = p.stats().peers["bench-d"].bytes_sent - before
            if moved != sub_iters * n_blocks * BLOCK_BYTES:
                raise SystemExit(f"sub-row {row} moved {moved} bytes, not {sub_iters} x {n_blocks}")
            rows.append((n_blocks, on, timed, p.trace("bench-d", "send")))
            p.tracer.clear()
        received, theirs = out.get(timeout=300)
        s = p.stats().peers["bench-d"]
        p.send("bench-d", "bye", torch.zeros(1, device=device))
        if theirs != [s.bytes_sent, s.transfers_sent, 0] or s.failures:
            raise SystemExit(
                f"the receiver counted {theirs}, we sent {s.bytes_sent} B in "
                f"{s.transfers_sent} transfers with {s.failures} failures"
            )
        child.join(60)
    del store
    mode = {"cuda-ipc": "CUDA IPC (same GPU)", "gloo": "gloo (no phase trace there)"}.get(
        path, path
    )
    if path == "cuda-ipc":
        mode += ", IPC events" if events else ", host syncs"
    print(f"\n## Phases of one transfer, {mode}, on {device}")
    print(f"({iters} transfers per sub-row, trace off / on / off / on; the first {PHASE_WARMUP}")
    print(f"of each sub-row left out; µs; {marks_cost()})")
    for n_blocks in blocks:
        phase_report(
            n_blocks,
            [(on, t, r) for n, on, t, r in rows if n == n_blocks],
            received,
            path == "cuda-ipc",
        )


def mark_cost_ns(reps: int = 20000) -> float:
    """ns of one ``Span.mark`` (a ``time.monotonic_ns()`` and a list append), the median of 5."""
    tracer = Tracer(True)
    costs = []
    for _ in range(5):
        span = tracer.span("send", "x", "t", "enter")
        t0 = time.perf_counter_ns()
        for _ in range(reps):
            span.mark("m")
        costs.append((time.perf_counter_ns() - t0) / reps)
    return statistics.median(costs)


def marks_cost() -> str:
    """The marks' own cost per transfer, measured alone."""
    ns, n = mark_cost_ns(), len(SEND_PHASES) + len(RECV_PHASES)
    return f"one mark alone: {ns:.0f} ns, × {n} marks a transfer = {ns * n / 1e3:.1f} µs"


def pcts(values: list[float]) -> tuple[float, float, float]:
    """(median, p10, p90)."""
    v = sorted(values)
    return (statistics.median(v), v[int(0.1 * (len(v) - 1))], v[int(0.9 * (len(v) - 1))])


def fmt(values: list[float]) -> str:
    med, p10, p90 = pcts(values)
    return f"{med:.1f} ({p10:.1f}–{p90:.1f})"


def warm(tid: str) -> bool:
    """Whether ``b<row>.<it>`` is past its sub-row's warm-up."""
    return int(tid.rsplit(".", 1)[1]) >= PHASE_WARMUP


def phase_report(
    n_blocks: int,
    subrows: list[tuple[bool, Timed, list[TransferRecord]]],
    received: list[TransferRecord],
    ipc: bool = True,
) -> None:
    """One row's tables: trace cost, sum check, the joined marks on the sender's time axis."""
    us = 1e-3
    off = [(b - a) * us for on, t, _ in subrows if not on for tid, (a, b) in t.items() if warm(tid)]
    on_t = [(b - a) * us for on, t, _ in subrows if on for tid, (a, b) in t.items() if warm(tid)]
    timed = {tid: ab for on, t, _ in subrows if on for tid, ab in t.items()}
    sent = [r for on, _, recs in subrows if on for r in recs]
    print(f"\n### {n_blocks} block{'s' * (n_blocks > 1)}: send_blocks, timed from outside")
    print(f"trace off: {fmt(off)} µs, on: {fmt(on_t)} µs (median (p10–p90) of {len(off)} and")
    print(f"{len(on_t)} transfers); the trace's cost, median on − off: "
          f"{statistics.median(on_t) - statistics.median(off):+.1f} µs")  # fmt: skip
    if not ipc:
        print("no phase records: not the same-GPU path (the trace covers only that)")
        return
    if len(sent) != len(timed):
        raise SystemExit(f"{len(timed)} traced sends, {len(sent)} send records")
    pairs = [(s, r) for s, r in join(sent, received) if warm(s.transfer_id)]
    if len(join(sent, received)) != len(sent):
        raise SystemExit(f"{len(sent)} traced sends, {len(join(sent, received))} joined")
    shapes = {(s.phases, r.phases) for s, r in pairs}
    if len(shapes) != 1:
        raise SystemExit(f"the records' phases differ between transfers: {shapes}")
    s_phases, r_phases = shapes.pop()
    at: dict[tuple[str, str], list[float]] = {}
    step: dict[tuple[str, str], list[float]] = {}
    since: dict[tuple[str, str], str] = {}  # the same side's previous mark
    for s, r in pairs:
        zero = s.at("enter")
        for rec in (s, r):
            for (before, ns0), (name, ns) in itertools.pairwise(rec.marks):
                step.setdefault((rec.side, name), []).append((ns - ns0) * us)
                since[(rec.side, name)] = before
            for name, ns in rec.marks:
                at.setdefault((rec.side, name), []).append((ns - zero) * us)
    entered = [(r.entered_ns - s.at("enter")) * us for s, r in pairs if r.entered_ns]
    measured = [(timed[s.transfer_id][1] - timed[s.transfer_id][0]) * us for s, _ in pairs]
    traced = [(s.at("return") - s.at("enter")) * us for s, _ in pairs]
    outside = [m - t for m, t in zip(measured, traced, strict=True)]
    mean = statistics.fmean
    steps = sum(mean(step[("send", name)]) for name in s_phases[1:])
    print(f"\nsum check ({len(pairs)} traced transfers, each joined with the receiver's record): "
          f"measured around send_blocks {fmt(measured)} = the sender's enter → return "
          f"{fmt(traced)} + outside the record (before enter, after return) {fmt(outside)}; "
          f"outside < 0 in {sum(o < 0 for o in outside)} (the clocks would disagree); in means: "
          f"measured {mean(measured):.1f} = the sender's steps {steps:.1f} + outside "
          f"{mean(outside):.1f} (medians do not add up; means do)")  # fmt: skip
    print("\n| side | mark | at µs from the sender's enter | step µs since the side's previous |")
    print("| --- | --- | ---: | ---: |")
    keys = sorted(at, key=lambda k: statistics.median(at[k]))
    if entered:
        print(f"| recv | caller entered recv_blocks | {fmt(entered)} | |")
    for key in keys:
        cell = f"{fmt(step[key])} since {since[key]}" if key in since else ""
        print(f"| {key[0]} | {key[1]} | {fmt(at[key])} | {cell} |")
    ack_from = "done" if "done" in r_phases else "launched"
    crossings = [
        ("HEADER", ("send", "encoded"), ("recv", "frame")),
        ("ACK", ("recv", ack_from), ("send", "ack_read")),
        ("CONFIRM", ("send", "settled"), ("recv", "confirmed")),
    ]
    print("\ncrossings (the writer's last mark before the write → the reader's mark after the "
          "read: the write, the wake-up, the read, the decode of the frame):")  # fmt: skip
    for name, (a_side, a), (b_side, b) in crossings:
        gap = [(rb - ra) for ra, rb in zip(at[(a_side, a)], at[(b_side, b)], strict=True)]
        print(f"- {name}: {a_side} {a} → {b_side} {b}: {fmt(gap)} µs")
    back = [(r.at("return") - s.at("return")) * us for s, r in pairs]
    print(f"- the receiver's return − the sender's return: {fmt(back)} µs")


# ---- --phases on CPU: the same table from the real channel code, CUDA IPC stood in for ----------
class _Stub:
    """A stream or an IPC event off CUDA: nothing to wait for."""

    def synchronize(self) -> None:
        pass

    def record(self, stream: object = None) -> None:
        pass

    def query(self) -> bool:
        return True


class _StubEvents:
    def __init__(self) -> None:
        self.ready, self.done = _Stub(), _Stub()
        self.ready_handle, self.done_handle = "ee" * 64, b"d" * 64


@contextlib.contextmanager
def cpu_stand_in() -> Iterator[None]:
    """Exports by reference in this process, stub stream and events (as
    tests/unit/test_transport_trace.py does), undone on exit."""
    from kvrelay.workers.transport import channel as channel_mod

    exported: dict[str, torch.Tensor] = {}

    def export(flat: torch.Tensor) -> dict[str, Any]:
        exported[f"cpu-{flat.data_ptr():x}"] = flat
        return {"handle": f"cpu-{flat.data_ptr():x}", "storage_offset": 0, "offset": 0}

    saved = [
        (channel_mod, "export_ipc", lambda flat: export(flat)),
        (channel_mod, "import_ipc", lambda fields, nbytes, device: exported[fields["handle"]]),
        (channel_mod, "open_event", lambda handle, device: _Stub()),
        (torch.cuda, "current_stream", lambda device=None: _Stub()),
    ]
    old = [(mod, name, getattr(mod, name)) for mod, name, _ in saved]
    for mod, name, new in saved:
        setattr(mod, name, new)
    try:
        yield
    finally:
        for mod, name, value in old:
            setattr(mod, name, value)


def copy_into(
    dst: torch.Tensor, dst_ids: torch.Tensor, src: torch.Tensor, ids: torch.Tensor
) -> None:
    """``recv_blocks``' copy on CPU: blocks ``ids`` of ``src`` into blocks ``dst_ids`` of ``dst``."""
    dst.index_copy_(0, dst_ids, src.index_select(0, ids))


def cpu_phases(blocks: list[int], iters: int) -> None:
    """``--phases`` without a GPU: the sender's and the receiver's channel in this process
    (threads), joined by a real control link; CUDA IPC stood in for (:func:`cpu_stand_in`)."""
    from kvrelay.workers.transport.buffers import BufferPool
    from kvrelay.workers.transport.channel import Channel
    from kvrelay.workers.transport.inbox import Inbox

    store, port = start_rendezvous_store()
    ctl, waiter = control_client(port), control_client(port)  # (a client serves one call)
    deadline = time.monotonic() + 60
    got: dict[int, Any] = {}
    t = threading.Thread(
        target=lambda: got.setdefault(0, accept_link(lambda a: ctl.set("ph/link", a), deadline))
    )
    t.start()
    waiter.wait(["ph/link"])
    got[1] = connect_link(waiter.get("ph/link"), deadline)
    t.join(60)
    plan = phase_plan(blocks, iters)
    tracers = [Tracer(), Tracer(keep=len(plan) * iters)]
    inboxes = [Inbox(), Inbox()]
    n_cache = cache_blocks([(n, 1) for n in blocks])
    caches = [torch.randn((n_cache, *GEOMETRY)), torch.zeros((n_cache, *GEOMETRY))]
    errors: list[BaseException] = []
    with cpu_stand_in():
        chans = [
            Channel(
                prefix="ph", rank=rank, generation=1, pg=None, link=got[rank], ctl=ctl,
                reader_store=None, inbox=inboxes[rank], device=torch.device("cpu"),
                max_message_bytes=1 << 34, buffers=BufferPool(0), on_break=lambda: None,
                events=_StubEvents(), tracer=tracers[rank],  # type: ignore[arg-type]
                peer=("bench-d", "bench-p")[rank],
            )
            for rank in (0, 1)
        ]  # fmt: skip

        def receive() -> None:  # recv_blocks' part: take the arrival, copy, ack, confirm
            try:
                dst = caches[1]
                for row, (n_blocks, sub_iters, _) in enumerate(plan):
                    for it in range(sub_iters):
                        dst_ids = torch.randperm(n_cache)[:n_blocks]
                        a = inboxes[1].take(f"b{row}.{it}", 1, time.monotonic() + 60)
                        assert a.source is not None
                        a.source.read(partial(copy_into, dst, dst_ids), time.monotonic() + 60)
            except BaseException as exc:
                errors.append(exc)

        r = threading.Thread(target=receive, daemon=True)
        r.start()
        rows: list[tuple[int, bool, Timed, list[TransferRecord]]] = []
        for row, (n_blocks, sub_iters, on) in enumerate(plan):
            tracers[0].enabled = tracers[1].enabled = on  # before the sub-row's first header
            timed: Timed = {}
            for it in range(sub_iters):
                ids = torch.randperm(n_cache)[:n_blocks]
                tid = f"b{row}.{it}"
                t0 = time.monotonic_ns()
                span = tracers[0].span("send", "bench-d", tid, "enter") if on else None
                chans[0].send_blocks(tid, caches[0], ids, time.monotonic() + 60, False, span)
                timed[tid] = (t0, time.monotonic_ns())
            rows.append((n_blocks, on, timed, tracers[0].records("bench-d", "send")))
            tracers[0].clear()
        r.join(60)
        for ch in chans:
            ch.close("done")
        for ch in chans:
            ch.join(5)
    if errors:
        raise SystemExit(f"the receiving thread failed: {errors[0]!r}")
    received = tracers[1].records("bench-p", "recv")
    del store
    print("\n## Phases of one transfer, CPU stand-in: the real channel, link and inbox code of a")
    print("same-GPU send_blocks / receive, both ends in this process (threads), CUDA IPC handles,")
    print("stream and events stood in for; no device work and no KVTransport layer (enter = the")
    print("channel's send_blocks; a CPU index_select + index_copy_ is the copy); not a GPU figure")
    print(f"({iters} transfers per sub-row, trace off / on / off / on; the first {PHASE_WARMUP}")
    print(f"of each sub-row left out; µs; {marks_cost()})")
    for n_blocks in blocks:
        phase_report(n_blocks, [(on, t, r) for n, on, t, r in rows if n == n_blocks], received)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--blocks", type=int, nargs="+", help="default 1 16 256 1024 (--phases: 1 256)"
    )
    parser.add_argument(
        "--iters", type=int, help=f"per row (default 20; --phases: per sub-row, {PHASE_ITERS})"
    )
    parser.add_argument(
        "--ipc-events",
        choices=["on", "off", "both"],
        default="both",
        help="same GPU: order the copy with CUDA IPC events (on), host syncs (off), or both runs",
    )
    parser.add_argument(
        "--control", action="store_true", help="only the same-GPU control round trip, on CPU"
    )
    parser.add_argument(
        "--phases",
        action="store_true",
        help="where one same-GPU transfer's time goes (the transport's phase trace)",
    )
    args = parser.parse_args()
    if args.control:
        control(CONTROL_ROUNDS)
        return
    if args.phases:
        blocks = args.blocks or [1, 256]
        iters = args.iters
        if iters is None:
            iters = PHASE_ITERS if args.device == "cuda" else 30
        if not PHASE_WARMUP < iters <= TRACE_KEEP:
            parser.error(f"--phases: --iters must be in ({PHASE_WARMUP}, {TRACE_KEEP}]")
        if args.device == "cpu":
            cpu_phases(blocks, iters)
            return
        torch.cuda.set_device(0)
        events_modes = {"on": [True], "off": [False], "both": [True, False]}[args.ipc_events]
        for events in events_modes:
            phases(torch.device("cuda", 0), blocks, iters, events)
        return
    args.blocks = args.blocks or [1, 16, 256, 1024]
    args.iters = 20 if args.iters is None else args.iters
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
