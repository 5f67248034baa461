"""KV transport on a GPU machine, without Ray: two processes on one GPU hand off KV blocks.

The pytest process is one side; a peer process (this file run as a script: it must not be
forked after CUDA is initialised) is the other and reports what it saw as one JSON line. On one
GPU ``send_blocks`` goes through CUDA IPC with no copy on the sender: the receiver copies the
named blocks straight out of the sender's cache, and the send returns once it did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvrelay.workers.transport import wire
from kvrelay.workers.transport.kv_transport import (
    KVTransport,
    TransferError,
    start_rendezvous_store,
)

GEOMETRY = (30, 2, 16, 3, 64)  # SmolLM2-135M: [L, 2, bs, Hkv, D]
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4
SRC_IDS = [5, 0, 63, 17, 18, 19, 40, 2, 3, 4, 50, 51, 52, 53, 9, 33]
DST_IDS = list(range(31, 15, -1))
# later transfers: a smaller one and a larger one (on the gloo path: reuses and grows buffers)
MORE = [("req-2", [1, 2, 3, 60], [0, 1, 2, 3]), ("req-3", list(range(10, 42)), list(range(32)))]
BIG_CACHE = 300  # blocks on each side of the 1 / 16 / 256-block test
ROUNDS = 24  # back-to-back transfers, alternating directions
PEER_TIMEOUT = 180


def source_cache(device: str, blocks: int = 64, seed: int = 11) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((blocks, *GEOMETRY), generator=gen).to(device)


def perm(n: int, k: int, seed: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist()


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().cpu().view(torch.int32)


def run_peer(scenario: str, port: int, *args: object) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, __file__, scenario, str(port), *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def peer_result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=PEER_TIMEOUT)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


@pytest.mark.gpu
@pytest.mark.parametrize("sender_device", ["cuda", "cpu"])
def test_handoff_to_a_process_on_the_same_gpu_is_bit_identical(sender_device: str) -> None:
    """cuda -> cuda on one GPU goes through CUDA IPC; cpu -> cuda through gloo staging."""
    store, port = start_rendezvous_store()
    peer = run_peer("receive", port)
    with KVTransport("p", "127.0.0.1", port, device=sender_device, timeout_s=60) as p:
        cache = source_cache(sender_device)
        assert p.send_blocks("d", "req-1", cache, SRC_IDS) == len(SRC_IDS) * BLOCK_BYTES
        assert p.path("d") == ("cuda-ipc" if sender_device == "cuda" else "gloo")
        for tid, src, _ in MORE:
            p.send_blocks("d", tid, cache, src)
        got = peer_result(peer)
        sent = p.stats().peers["d"].bytes_sent
    assert got["equal"] == [True, True, True]
    assert got["received"] == sent == (16 + 4 + 32) * BLOCK_BYTES
    del store


@pytest.mark.gpu
@pytest.mark.parametrize("n_blocks", [1, 16, 256])
def test_same_gpu_blocks_arrive_bit_identical_and_nothing_else_changes(n_blocks: int) -> None:
    store, port = start_rendezvous_store()
    peer = run_peer("receive_n", port, n_blocks)
    with KVTransport("p", "127.0.0.1", port, device="cuda", timeout_s=60) as p:
        cache = source_cache("cuda", BIG_CACHE)
        sent = p.send_blocks("d", "big", cache, perm(BIG_CACHE, n_blocks, seed=1))
        assert p.path("d") == "cuda-ipc"
        got = peer_result(peer)
        # the sender's cache is untouched by the transfer
        assert torch.equal(bits(cache), bits(source_cache("cpu", BIG_CACHE)))
    assert got == {"equal": True, "others_zero": True, "received": n_blocks * BLOCK_BYTES}
    assert sent == n_blocks * BLOCK_BYTES
    del store


@pytest.mark.gpu
def test_back_to_back_transfers_in_both_directions_carry_the_blocks_as_they_were_sent() -> None:
    """Each side writes round-specific values into its source blocks, sends, and scribbles over
    them the moment send_blocks returns: a receiver that acked before its copy finished, or a
    sender that returned early, would show the scribble."""
    store, port = start_rendezvous_store()
    peer = run_peer("alternate", port)
    with KVTransport("a", "127.0.0.1", port, device="cuda", timeout_s=60) as a:
        paths: list[str | None] = []
        ok = alternate(a, "b", me=0, paths=paths)
        assert paths == ["cuda-ipc"] * (ROUNDS - 1)  # one channel, never broken, all rounds
        stats = a.stats().peers["b"]
        got = peer_result(peer)
    assert ok == got["ok"] == [True] * (ROUNDS // 2)
    assert stats.transfers_sent == stats.transfers_received == ROUNDS // 2
    assert stats.bytes_sent == got["bytes_received"] and stats.failures == 0
    del store


@pytest.mark.gpu
@pytest.mark.parametrize("modes", ["events", "sync", "mixed"])
def test_back_to_back_transfers_with_the_writes_or_the_copy_still_in_flight(modes: str) -> None:
    """Without host syncs the device alone orders the copy after the sender's writes and the
    sender's return after the copy: every round one side delays its GPU work, and nothing a
    test does here synchronises a stream. Rounds 0, 1 mod 4: the sender queues a sleep before
    writing its blocks, so they are still being written when send_blocks is called (a receiver
    that copied without waiting for the sender's ready event gets the previous round's
    scribble). Rounds 2, 3 mod 4: the receiver queues a sleep before receiving, so its copy
    runs late (a sender that returned before the receiver's done event completed has its
    scribble copied). ``mixed``: this side with IPC events, the peer without (they interoperate)."""
    store, port = start_rendezvous_store()
    peer_events = modes == "events"
    peer = run_peer("alternate_in_flight", port, int(peer_events))
    with KVTransport(
        "a", "127.0.0.1", port, device="cuda", timeout_s=60, ipc_events=modes != "sync"
    ) as a:
        modes_seen: list[bool] = []
        ok = alternate_in_flight(a, "b", me=0, events=modes_seen)
        stats = a.stats().peers["b"]
        got = peer_result(peer)
    assert ok == got["ok"] == [True] * (ROUNDS // 2)
    assert modes_seen == [modes != "sync"] * (ROUNDS - 1)  # one channel, never broken
    assert got["events"] == [peer_events] * (ROUNDS - 1)
    assert stats.transfers_sent == stats.transfers_received == ROUNDS // 2
    assert stats.bytes_sent == got["bytes_received"] and stats.failures == 0
    assert (
        stats.bytes_received
        == got["bytes_sent"]
        == sum(len(round_plan(k)[1]) * BLOCK_BYTES for k in range(ROUNDS) if k % 2 == 1)
    )
    del store


@pytest.mark.gpu
def test_a_receiver_that_dies_mid_transfer_fails_the_send_within_its_deadline() -> None:
    store, port = start_rendezvous_store()
    victim = run_peer("die_on_header", port)
    with KVTransport("p", "127.0.0.1", port, device="cuda", timeout_s=30) as p:
        cache = source_cache("cuda")
        p.send_blocks("d", "warm", cache, SRC_IDS)  # the peer is up, the channel open
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            p.send_blocks("d", "doomed", cache, SRC_IDS, timeout_s=3)
        assert time.monotonic() - t0 < 3 + 2
        victim.communicate(timeout=PEER_TIMEOUT)
        assert victim.returncode == -signal.SIGKILL
        assert p.stats().peers["d"].failures == 1
        # a restarted "d" (new incarnation, same id) gets a fresh channel and the right bits
        fresh = run_peer("receive", port)
        p.send_blocks("d", "req-1", cache, SRC_IDS)
        for tid, src, _ in MORE:
            p.send_blocks("d", tid, cache, src)
        assert peer_result(fresh)["equal"] == [True, True, True]
    del store


@pytest.mark.gpu
def test_a_sender_that_dies_before_sending_fails_the_receive_at_its_deadline() -> None:
    store, port = start_rendezvous_store()
    sender = run_peer("send_then_hang", port)
    with KVTransport("q", "127.0.0.1", port, device="cuda", timeout_s=30) as q:
        cache = torch.zeros((64, *GEOMETRY), device="cuda")
        q.recv_blocks("s", "first", cache, DST_IDS)  # the channel and the mapping exist
        assert torch.equal(bits(cache[DST_IDS]), bits(source_cache("cpu")[SRC_IDS]))
        sender.kill()
        sender.communicate(timeout=PEER_TIMEOUT)
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            q.recv_blocks("s", "never", cache, DST_IDS, timeout_s=3)
        assert 2.5 < time.monotonic() - t0 < 3 + 2
        assert q.stats().peers["s"].failures == 1
        # a restarted sender works (once it registered: a receive reads the peer's incarnation
        # when it starts and waits on that channel)
        again = run_peer("send_then_hang", port)
        wait_for_incarnation(store, "s", 2)
        cache.zero_()
        q.recv_blocks("s", "first", cache, DST_IDS)
        assert torch.equal(bits(cache[DST_IDS]), bits(source_cache("cpu")[SRC_IDS]))
        again.kill()
        again.communicate(timeout=PEER_TIMEOUT)
    del store


@pytest.mark.gpu
def test_a_sender_killed_as_its_header_arrives_gives_an_error_or_the_complete_blocks() -> None:
    """The header goes out after the sender's blocks are complete; the receiver (a process of
    its own: its CUDA context is at stake) kills the sender on the header. Whatever CUDA does
    with a dead exporter's memory, the receive ends within its deadline with a TransferError or
    the right bits, and the receiver process survives."""
    store, port = start_rendezvous_store()
    sender = run_peer("send_then_hang", port)
    receiver = run_peer("receive_from_killed", port, sender.pid)
    got = peer_result(receiver)
    sender.communicate(timeout=PEER_TIMEOUT)
    assert sender.returncode == -signal.SIGKILL and got["killed"]
    assert got["elapsed"] < 30 + 2
    assert got["error"] or got["equal"], got
    del store


@pytest.mark.gpu
def test_a_payload_sent_just_before_the_peer_closed_is_still_received() -> None:
    """A same-GPU channel breaks as soon as the peer closes its control link; a staged payload
    it sent before (delivered here on its CONFIRM) is still received afterwards."""
    store, port = start_rendezvous_store()
    peer = run_peer("send_and_close", port)
    with KVTransport("p", "127.0.0.1", port, device="cuda", timeout_s=60) as p:
        p.send_blocks("d", "warm", source_cache("cuda"), SRC_IDS)  # the channel is up
        assert peer_result(peer) == {"sent": True}  # d sent "late", then closed and exited
        got = p.recv("d", "late", timeout_s=10)
    assert torch.equal(got.cpu(), torch.arange(10.0))
    del store


def wait_for_incarnation(store: object, worker: str, n: int) -> None:
    deadline = time.monotonic() + PEER_TIMEOUT
    key = wire.worker_info_key(worker)
    while json.loads(store.get(key))["incarnation"] < n:  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, f"{worker} did not restart"
        threading.Event().wait(0.05)


# ---- both sides ------------------------------------------------------------------------------
def round_plan(k: int) -> tuple[int, list[int], list[int]]:
    """Round k: who sends (0 or 1), source ids, destination ids (1..32 blocks)."""
    n = 1 + (7 * k) % 32
    return k % 2, perm(64, n, seed=100 + k), perm(64, n, seed=200 + k)


def alternate(
    t: KVTransport, other: str, me: int, paths: list[str | None] | None = None
) -> list[bool]:
    """``paths``: gets the channel's path after each of this side's transfers (the peer may
    close as soon as the last one is done, which ends the channel)."""
    base = {0: source_cache("cpu", seed=20), 1: source_cache("cpu", seed=21)}
    cache = base[me].to("cuda", copy=True)
    inbox = torch.zeros((64, *GEOMETRY), device="cuda")
    ok = []
    for k in range(ROUNDS):
        sender, src, dst = round_plan(k)
        if sender == me:
            cache[src] = base[me][src].cuda() + k
            t.send_blocks(other, f"r{k}", cache, src)
            cache[src] = -1.0  # the peer must have finished reading
        else:
            t.recv_blocks(other, f"r{k}", inbox, dst)
            ok.append(torch.equal(bits(inbox[dst]), bits(base[1 - me][src] + k)))
        if paths is not None and k < ROUNDS - 1:
            paths.append(t.path(other))
    return ok


SLEEP_CYCLES = 20_000_000  # torch.cuda._sleep: ~10 ms of one GPU thread at ~2 GHz


def alternate_in_flight(t: KVTransport, other: str, me: int, events: list[bool]) -> list[bool]:
    """As :func:`alternate`, but every write is device work queued without a host sync, and
    one side's work is delayed on the device each round (the test's docstring). ``events``:
    whether the channel used IPC events after each of this side's transfers but the last."""
    base = {0: source_cache("cuda", seed=20), 1: source_cache("cuda", seed=21)}
    cache = base[me].clone()
    inbox = torch.zeros((64, *GEOMETRY), device="cuda")
    ok = []
    for k in range(ROUNDS):
        sender, src, dst = round_plan(k)
        if sender == me:
            src_ids = torch.tensor(src, device="cuda")  # (uploaded before the sleep)
            values = base[me].index_select(0, src_ids) + k
            if k % 4 < 2:
                torch.cuda._sleep(SLEEP_CYCLES)  # the blocks are written after send_blocks
            cache.index_copy_(0, src_ids, values)
            t.send_blocks(other, f"r{k}", cache, src)
            cache.index_fill_(0, src_ids, -1.0)  # runs at once unless the peer's copy is late
        else:
            if k % 4 >= 2:
                torch.cuda._sleep(SLEEP_CYCLES)  # our copy runs ~10 ms after the header
            t.recv_blocks(other, f"r{k}", inbox, dst)
            want = source_cache("cpu", seed=20 + 1 - me)[src] + k
            ok.append(torch.equal(bits(inbox[dst]), bits(want)))
        if k < ROUNDS - 1:
            events.append(t.ipc_events(other))
    return ok


def _peer(scenario: str, port: int, args: list[str]) -> dict:
    if scenario == "receive":
        with KVTransport("d", "127.0.0.1", port, device="cuda", timeout_s=60) as d:
            source = source_cache("cpu")
            equal = []
            for tid, src, dst in [("req-1", SRC_IDS, DST_IDS), *MORE]:
                cache = torch.zeros((32, *GEOMETRY), device="cuda")
                d.recv_blocks("p", tid, cache, dst)
                torch.cuda.synchronize()
                equal.append(torch.equal(bits(cache[dst]), bits(source[src])))
            return {"equal": equal, "received": d.stats().peers["p"].bytes_received}
    if scenario == "receive_n":
        n = int(args[0])
        with KVTransport("d", "127.0.0.1", port, device="cuda", timeout_s=60) as d:
            cache = torch.zeros((BIG_CACHE, *GEOMETRY), device="cuda")
            dst = perm(BIG_CACHE, n, seed=2)
            d.recv_blocks("p", "big", cache, dst)
            want = source_cache("cpu", BIG_CACHE)[perm(BIG_CACHE, n, seed=1)]
            others = sorted(set(range(BIG_CACHE)) - set(dst))
            return {
                "equal": torch.equal(bits(cache[dst]), bits(want)),
                "others_zero": bool((cache[others] == 0).all()),
                "received": d.stats().peers["p"].bytes_received,
            }
    if scenario == "alternate":
        with KVTransport("b", "127.0.0.1", port, device="cuda", timeout_s=60) as b:
            ok = alternate(b, "a", me=1)
            return {"ok": ok, "bytes_received": b.stats().peers["a"].bytes_received}
    if scenario == "alternate_in_flight":
        with KVTransport(
            "b", "127.0.0.1", port, device="cuda", timeout_s=60, ipc_events=args[0] == "1"
        ) as b:
            seen: list[bool] = []
            ok = alternate_in_flight(b, "a", me=1, events=seen)
            stats = b.stats().peers["a"]
            return {
                "ok": ok,
                "events": seen,
                "bytes_received": stats.bytes_received,
                "bytes_sent": stats.bytes_sent,
            }
    if scenario == "die_on_header":
        with KVTransport(
            "d",
            "127.0.0.1",
            port,
            device="cuda",
            timeout_s=30,
            on_header=lambda h: h.transfer_id == "doomed" and os.kill(os.getpid(), signal.SIGKILL),
        ) as d:
            cache = torch.zeros((32, *GEOMETRY), device="cuda")
            d.recv_blocks("p", "warm", cache, DST_IDS)
            d.recv_blocks("p", "doomed", cache, DST_IDS)
            return {}
    if scenario == "send_and_close":
        with KVTransport("d", "127.0.0.1", port, device="cuda", timeout_s=60) as d:
            cache = torch.zeros((32, *GEOMETRY), device="cuda")
            d.recv_blocks("p", "warm", cache, DST_IDS)
            d.send("p", "late", torch.arange(10.0, device="cuda"))
        return {"sent": True}
    if scenario == "send_then_hang":
        with KVTransport("s", "127.0.0.1", port, device="cuda", timeout_s=60) as s:
            s.send_blocks("q", "first", source_cache("cuda"), SRC_IDS)
            threading.Event().wait()  # killed by the test
            return {}
    if scenario == "receive_from_killed":
        victim = int(args[0])
        killed: list[int] = []

        def kill(_header: object) -> None:
            os.kill(victim, signal.SIGKILL)
            killed.append(victim)
            stat = Path(f"/proc/{victim}/stat")
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and stat.exists() and " Z " not in stat.read_text():
                threading.Event().wait(0.01)  # until the kernel tore the process down

        with KVTransport("q", "127.0.0.1", port, device="cuda", timeout_s=30, on_header=kill) as q:
            cache = torch.zeros((64, *GEOMETRY), device="cuda")
            t0 = time.monotonic()
            try:
                q.recv_blocks("s", "first", cache, DST_IDS, timeout_s=30)
                error = False
            except TransferError:
                error = True
            elapsed = time.monotonic() - t0
            equal = torch.equal(bits(cache[DST_IDS]), bits(source_cache("cpu")[SRC_IDS]))
            torch.cuda.synchronize()  # the context survived
            return {
                "killed": killed == [victim],
                "error": error,
                "equal": equal,
                "elapsed": elapsed,
            }
    raise SystemExit(f"unknown scenario {scenario}")


if __name__ == "__main__":
    print(json.dumps(_peer(sys.argv[1], int(sys.argv[2]), sys.argv[3:])), flush=True)
