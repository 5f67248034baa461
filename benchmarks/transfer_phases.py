"""Where one same-GPU KV transfer's time goes, phase by phase (issue 16: what to cut).

    python benchmarks/transfer_phases.py --device cuda   # one GPU: the CUDA IPC path, with IPC
                                                         # events, then with host syncs
    python benchmarks/transfer_phases.py                 # CPU: the same table, both ends in one
                                                         # process, CUDA IPC stood in for

The transfers are transfer_bench.py's (its geometry, caches and counters), traced by the
transport (workers/transport/trace.py).

Rows of 1 and 256 blocks (``--blocks``), each run as four
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
import itertools
import statistics
import threading
import time
from collections.abc import Iterator
from functools import partial
from typing import Any

import torch
import torch.multiprocessing as mp

from kvrelay.benchmarks.transfer_bench import BLOCK_BYTES, GEOMETRY, cache_blocks, control_client
from kvrelay.workers.transport.kv_transport import KVTransport, start_rendezvous_store
from kvrelay.workers.transport.link import accept_link, connect_link
from kvrelay.workers.transport.trace import (
    RECV_PHASES,
    SEND_PHASES,
    TRACE_KEEP,
    Tracer,
    TransferRecord,
    join,
)

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


def _no_copy(cache: torch.Tensor, ids: torch.Tensor) -> None:
    pass


def cpu_phases(blocks: list[int], iters: int, copy: bool = True) -> None:
    """``--phases`` without a GPU: the sender's and the receiver's channel in this process
    (threads), joined by a real control link; CUDA IPC stood in for (:func:`cpu_stand_in`).
    ``copy`` False: the receiver copies nothing (``--no-copy``), so no host copy between two
    headers evicts the caches (90 MB at 256 blocks, paid by every step that runs after it)."""
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
                        fn = partial(copy_into, dst, dst_ids) if copy else _no_copy
                        a.source.read(fn, time.monotonic() + 60)
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
    what = "a CPU index_select + index_copy_ is the copy" if copy else "no copy: --no-copy"
    print(f"channel's send_blocks; {what}); not a GPU figure")
    print(f"({iters} transfers per sub-row, trace off / on / off / on; the first {PHASE_WARMUP}")
    print(f"of each sub-row left out; µs; {marks_cost()})")
    for n_blocks in blocks:
        phase_report(n_blocks, [(on, t, r) for n, on, t, r in rows if n == n_blocks], received)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 256])
    parser.add_argument("--iters", type=int, help=f"per sub-row (default {PHASE_ITERS}; CPU 30)")
    parser.add_argument(
        "--ipc-events",
        choices=["on", "off", "both"],
        default="both",
        help="same GPU: order the copy with CUDA IPC events (on), host syncs (off), or both runs",
    )
    parser.add_argument(
        "--no-copy",
        action="store_true",
        help="CPU: the receiver copies nothing (what is left is the protocol's own host work)",
    )
    args = parser.parse_args()
    iters = args.iters
    if iters is None:
        iters = PHASE_ITERS if args.device == "cuda" else 30
    if not PHASE_WARMUP < iters <= TRACE_KEEP:
        parser.error(f"--iters must be in ({PHASE_WARMUP}, {TRACE_KEEP}]")
    if args.device == "cpu":
        cpu_phases(args.blocks, iters, copy=not args.no_copy)
        return
    torch.cuda.set_device(0)
    for events in {"on": [True], "off": [False], "both": [True, False]}[args.ipc_events]:
        phases(torch.device("cuda", 0), args.blocks, iters, events)


if __name__ == "__main__":
    main()
