"""KV transport over real gloo between real processes.

Each test hosts the rendezvous store in the pytest process and forks peer processes (fork, not
spawn: importing torch takes seconds here); a peer builds its own transport and store clients,
runs one scenario and sends back a dict of results over a pipe. Payloads have the default model's block geometry (SmolLM2-135M: 30 layers, 3 KV heads,
head_dim 64, block 16, fp32: 737,280 bytes per block).
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection

import pytest
import torch

from kvrelay.workers.transport.kv_transport import (
    KVTransport,
    TransferError,
    start_rendezvous_store,
)

GEOMETRY = (30, 2, 16, 3, 64)  # [L, 2, bs, Hkv, D]
BLOCK_BYTES = 30 * 2 * 16 * 3 * 64 * 4
PEER_TIMEOUT = 40


def make_cache(seed: int, num_blocks: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((num_blocks, *GEOMETRY), generator=gen)


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def payload(seed: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


class Peer:
    """A forked peer process running ``peer_main(scenario, port, *args)``."""

    def __init__(self, scenario: str, port: int, *args: object) -> None:
        gc.collect()  # garbage from earlier tests dies here, where its threads exist
        ctx = mp.get_context("fork")
        self.conn, child_conn = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=_peer_entry, args=(child_conn, scenario, port, args))
        self.proc.start()
        child_conn.close()

    def result(self) -> dict:
        assert self.conn.poll(PEER_TIMEOUT), "peer gave no result in time"
        status, value = self.conn.recv()
        self.proc.join(PEER_TIMEOUT)
        assert status == "ok", value
        return value

    def exitcode(self) -> int | None:
        self.proc.join(PEER_TIMEOUT)
        return self.proc.exitcode

    def kill(self) -> None:
        assert self.proc.pid is not None
        os.kill(self.proc.pid, signal.SIGKILL)


def _peer_entry(conn: Connection, scenario: str, port: int, args: tuple) -> None:
    # Never finalise objects inherited from the parent (a process group's destructor would
    # join threads that do not exist in this child).
    gc.freeze()
    gc.disable()
    torch.set_num_threads(1)
    try:
        conn.send(("ok", peer_main(scenario, port, [str(a) for a in args])))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def peer_stats(t: KVTransport) -> dict:
    return {
        p: {"sent": s.bytes_sent, "received": s.bytes_received, "failures": s.failures}
        for p, s in t.stats().peers.items()
    }


# ---- tests (pytest process: store host, and peer "p" where it takes part) ------------------------
def test_packed_blocks_bit_identical_and_counters_agree() -> None:
    store, port = start_rendezvous_store()
    child = Peer("receive_blocks", port)
    with KVTransport("p", "127.0.0.1", port, timeout_s=20) as p:
        cache = make_cache(seed=7, num_blocks=40)
        src_ids = [3, 17, 0, 39, 8, 9, 10, 11, 25, 26, 27, 1, 2, 30, 31, 5]
        assert p.send_blocks("d", "req-1", cache, src_ids) == 16 * BLOCK_BYTES
        p.send_blocks("d", "req-2", cache, [4, 6])  # the peer expects 3 blocks: refused there
        got = child.result()
        stats = p.stats().peers["d"]
    assert got["equal"] is True
    assert got["mismatch_error"] and got["deadline_error"]
    assert got["deadline_elapsed"] < 1.5
    assert got["stats"]["p"]["received"] == 16 * BLOCK_BYTES
    assert stats.bytes_sent == 18 * BLOCK_BYTES and stats.transfers_sent == 2
    assert got["stats"]["p"]["failures"] == 2
    del store


def test_three_peers_exchange_concurrently_over_one_store() -> None:
    store, port = start_rendezvous_store()
    peers = [Peer("mesh", port, i) for i in range(3)]
    got = [peer.result() for peer in peers]
    for i, g in enumerate(got):
        assert g["ok"] == 4, g  # two payloads from each of two peers, all intact
        for j in range(3):
            if i != j:  # what i sent to j is what j received from i
                assert g["stats"][f"w{j}"]["sent"] == got[j]["stats"][f"w{i}"]["received"] > 0
    del store


def test_concurrent_transfers_on_one_pair_arrive_intact() -> None:
    store, port = start_rendezvous_store()
    child = Peer("receive_many", port, 8)
    with KVTransport("p", "127.0.0.1", port, timeout_s=20) as p:
        errors: list[BaseException] = []

        def send(k: int) -> None:
            try:
                p.send("d", f"t{k}", payload(k, 1000 * (k + 1)))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=send, args=(k,)) for k in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(PEER_TIMEOUT)
        got = child.result()
    assert not errors
    assert got["intact"] == list(range(8))
    assert got["stats"]["p"]["received"] == sum(4000 * (k + 1) for k in range(8))
    del store


def test_peer_killed_mid_transfer_raises_within_deadline_then_a_fresh_peer_works() -> None:
    store, port = start_rendezvous_store()
    big = payload(1, 32 << 20)  # 128 MiB: still in flight when the peer dies
    sender = Peer("send_big", port)  # starts now, waits for "q" (part b) within its deadline
    # (a) the receiver kills itself as the payload starts: our send fails fast.
    victim = Peer("die_on_header", port)
    with KVTransport("p", "127.0.0.1", port, timeout_s=20) as p:
        t0 = time.monotonic()
        try:
            p.send("d", "doomed", big, timeout_s=10)
            raise AssertionError("send to a dead peer succeeded")
        except TransferError:
            assert time.monotonic() - t0 < 8
        assert victim.exitcode() == -signal.SIGKILL
        # a restarted "d" (new incarnation, same id) gets a fresh channel
        fresh = Peer("receive_one", port, 1000)
        p.send("d", "after", payload(5, 1000))
        assert fresh.result()["equal"] is True
        assert p.stats().peers["d"].failures == 1
    # (b) the sender is killed as its payload starts: our receive fails fast.
    started = threading.Event()

    def kill_sender(_header: object) -> None:
        sender.kill()
        started.set()

    with KVTransport("q", "127.0.0.1", port, timeout_s=20, on_header=kill_sender) as q:
        t0 = time.monotonic()
        try:
            q.recv("s", "big", timeout_s=15)
            raise AssertionError("received from a dead peer")
        except TransferError:
            assert started.is_set() and time.monotonic() - t0 < 12
        assert sender.exitcode() == -signal.SIGKILL
        assert q.stats().peers["s"].failures == 1
    del store


def test_bad_input_is_refused_clearly_and_an_absent_peer_times_out() -> None:
    store, port = start_rendezvous_store()
    with KVTransport("p", "127.0.0.1", port, timeout_s=5) as p:
        cache = torch.zeros((4, *GEOMETRY))
        for bad in ("", "a/b", " x", "x" * 200):
            with pytest.raises(ValueError):
                p.send(bad, "t", torch.zeros(1))
        with pytest.raises(ValueError):
            p.send("p", "t", torch.zeros(1))  # itself
        with pytest.raises(ValueError):
            p.send("q", "", torch.zeros(1))
        with pytest.raises(ValueError):
            p.send_blocks("q", "t", cache, [0, 4])
        with pytest.raises(ValueError):
            p.send("q", "t", torch.zeros(1, dtype=torch.complex64))
        t0 = time.monotonic()
        with pytest.raises(TransferError):
            p.recv("never-started", "t", timeout_s=0.3)
        assert time.monotonic() - t0 < 2
        assert p.stats().peers["never-started"].failures == 1
    with pytest.raises(ValueError):
        KVTransport("bad/id", "127.0.0.1", port)
    del store


# ---- peers ----------------------------------------------------------------------------------------
def peer_main(scenario: str, port: int, args: list[str]) -> dict:
    if scenario == "receive_blocks":
        with KVTransport("d", "127.0.0.1", port, timeout_s=20) as d:
            cache = torch.zeros((24, *GEOMETRY))
            dst = list(range(23, 7, -1))
            d.recv_blocks("p", "req-1", cache, dst)
            want = make_cache(seed=7, num_blocks=40)[
                [3, 17, 0, 39, 8, 9, 10, 11, 25, 26, 27, 1, 2, 30, 31, 5]
            ]
            equal = torch.equal(bits(cache[dst]), bits(want))
            try:
                d.recv_blocks("p", "req-2", cache, [0, 1, 2])
                mismatch = False
            except TransferError:
                mismatch = True
            t0 = time.monotonic()
            try:
                d.recv("p", "never-sent", timeout_s=0.5)
                deadline = False
            except TransferError:
                deadline = True
            elapsed = time.monotonic() - t0
            return {
                "equal": equal,
                "mismatch_error": mismatch,
                "deadline_error": deadline,
                "deadline_elapsed": elapsed,
                "stats": peer_stats(d),
            }
    if scenario == "mesh":
        me = int(args[0])
        with KVTransport(f"w{me}", "127.0.0.1", port, timeout_s=20) as w:
            ok: list[int] = []

            def send(j: int, k: int) -> None:
                w.send(f"w{j}", f"m{k}", payload(100 * me + 10 * j + k, 50000))

            def recv(j: int, k: int) -> None:
                if torch.equal(w.recv(f"w{j}", f"m{k}"), payload(100 * j + 10 * me + k, 50000)):
                    ok.append(j)

            threads = [
                threading.Thread(target=fn, args=(j, k))
                for j in range(3)
                if j != me
                for k in range(2)
                for fn in (send, recv)
            ]
            for t in threads:
                t.start()
            for t in threads:
                t.join(PEER_TIMEOUT)
            return {"ok": len(ok), "stats": peer_stats(w)}
    if scenario == "receive_many":
        n = int(args[0])
        with KVTransport("d", "127.0.0.1", port, timeout_s=20) as d:
            intact: list[int] = []

            def recv(k: int) -> None:
                if torch.equal(
                    d.recv("p", f"t{k}", shape=(1000 * (k + 1),)), payload(k, 1000 * (k + 1))
                ):
                    intact.append(k)

            threads = [threading.Thread(target=recv, args=(k,)) for k in reversed(range(n))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(PEER_TIMEOUT)
            return {"intact": sorted(intact), "stats": peer_stats(d)}
    if scenario == "die_on_header":
        with KVTransport(
            "d",
            "127.0.0.1",
            port,
            timeout_s=20,
            on_header=lambda h: os.kill(os.getpid(), signal.SIGKILL),
        ) as d:
            d.recv("p", "doomed", timeout_s=20)
            return {}
    if scenario == "receive_one":
        with KVTransport("d", "127.0.0.1", port, timeout_s=20) as d:
            return {"equal": torch.equal(d.recv("p", "after"), payload(5, int(args[0])))}
    if scenario == "send_big":
        with KVTransport("s", "127.0.0.1", port, timeout_s=40) as s:
            s.send("q", "big", payload(1, 32 << 20))
            return {}
    raise SystemExit(f"unknown scenario {scenario}")
