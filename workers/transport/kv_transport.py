"""KV transport: pairwise, lazily connected channels between workers over one rendezvous store.

The controller hosts a ``TCPStore`` (:func:`start_rendezvous_store`); every worker builds one
:class:`KVTransport` that connects to it as a client. There is no global process group: the first
transfer between workers ``a < b`` (sorted ids; rank = position) creates a two-rank channel under

    kvpair/<a>/<b>/<incarnation a>.<incarnation b>.<epoch>

where each incarnation counts restarts of that worker id and the epoch is a store counter bumped
(compare-and-set, so exactly once) when the channel breaks. Gloo peers read the prefix before
every transfer, so a restarted peer or a broken channel is replaced on the next use, and both
sides always agree on the group they meet in. A same-GPU channel skips that read while its
control link (Unix sockets, link.py) is up: a peer that restarts, closes or breaks the
channel takes the link down, so the next use finds the channel broken and reads the prefix.

Paths: CPU <-> anything: gloo (CUDA tensors staged through host memory); two processes on the
same GPU (matched by UUID): CUDA IPC handles (ipc.py). NCCL for peers on different
GPUs is not built yet: they use gloo with host staging. On the same GPU ``send_blocks`` sends
no bytes: the header names blocks of the sender's cache (mapped by the peer once per channel)
and the receiver's ``recv_blocks`` copies them into its own blocks in one device pass; the
send returns once the receiver's copy finished, so it completes only while the peer receives.
Its control path is one header out and one ack back on the link, no store round trip. With
``ipc_events`` (opt-in, ``KVRELAY_IPC_EVENTS=1``, until it has run on a GPU) neither side
synchronises the host: the copy is ordered after the sender's writes, and the sender's return
after the copy, by CUDA IPC events (ipc.py); without them (the default, or a platform without
IPC events) each side synchronises its stream instead.

Both sides must call: a transfer is ``send(peer, tid, ...)`` on one side and ``recv(peer, tid,
...)`` on the other, each from any thread and in any order; the first call on a pair creates the
channel on that side and waits (within its deadline) for the other side to join. Receives are
matched by transfer id, so concurrent transfers on one pair may be awaited in any order. A
channel's reader thread takes payloads as they come (into reused host buffers); one nobody
claims stays buffered (a same-GPU ``send_blocks`` nobody receives fails at its deadline), so
send only what the peer reserved (the handoff transaction).

Threads: every call blocks its calling thread (run it off the event loop: ``asyncio.to_thread``);
each live channel owns one reader thread and, over gloo, two store connections (same GPU: two
Unix socket connections). Do not fork a process that holds a transport.
"""

from __future__ import annotations

import datetime
import json
import os
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

from kvrelay.kernels import copy_blocks, pack_blocks, unpack_blocks
from kvrelay.workers.gpu_gate import GPU_GATE
from kvrelay.workers.transport import wire
from kvrelay.workers.transport.buffers import BufferPool, Counters, PeerStats, TransportStats
from kvrelay.workers.transport.channel import Channel
from kvrelay.workers.transport.inbox import Arrival, Inbox
from kvrelay.workers.transport.ipc import IpcEvents, gpu_uuid
from kvrelay.workers.transport.link import Link, accept_link, connect_link
from kvrelay.workers.transport.trace import Tracer, TransferRecord, enabled_by_env
from kvrelay.workers.transport.wire import Header, TransferError

R = TypeVar("R")

__all__ = ["KVTransport", "PeerStats", "TransferError", "TransportStats", "start_rendezvous_store"]


def start_rendezvous_store(host: str = "127.0.0.1", port: int = 0) -> tuple[dist.TCPStore, int]:
    """Host the rendezvous store (controller side). Bind the node's routable address for
    multi-host clusters; port 0 picks a free port. Keep the returned store alive."""
    # TCPStore's own server listens on every interface whatever ``host`` says, and the store
    # has no authentication: hand it a socket already bound to ``host`` instead
    family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(1024)
        bound = int(sock.getsockname()[1])
        store = dist.TCPStore(
            host,
            bound,
            is_master=True,
            wait_for_workers=False,
            master_listen_fd=sock.fileno(),
            use_libuv=True,
        )
    except BaseException:
        sock.close()
        raise
    sock.detach()  # the store owns the descriptor now
    return store, bound


@dataclass(frozen=True, slots=True)
class _Target:
    prefix: str
    rank: int  # 0 for the smaller worker id
    peer_info: dict
    epoch_key: str
    epoch: int


@dataclass(slots=True)
class _Pair:
    lock: threading.Lock = field(default_factory=threading.Lock)  # channel creation/replacement
    inbox: Inbox = field(default_factory=Inbox)
    channel: Channel | None = None
    generation: int = 0
    # same GPU: this side's IPC events of the pair's latest channels (the live one's last),
    # kept a few channels longer: a broken channel's peer may still use its imports
    events: deque[IpcEvents] = field(default_factory=lambda: deque(maxlen=4))


class KVTransport:
    def __init__(
        self,
        worker_id: str,
        store_host: str,
        store_port: int,
        *,
        device: torch.device | str = "cpu",
        timeout_s: float = 30.0,
        bind_host: str | None = None,
        interface: str | None = None,
        checksum: bool = False,
        max_message_bytes: int = 16 << 30,
        staging_bytes: int = 1 << 30,
        on_header: Callable[[Header], None] | None = None,
        ipc_events: bool | None = None,
        trace: bool | None = None,
    ) -> None:
        """``bind_host`` / ``interface``: where gloo listens (default: loopback; multi-host: the
        node's routable address, or an interface name; ``GLOO_SOCKET_IFNAME`` is honoured when
        neither is given). ``timeout_s``: default per-transfer deadline and gloo's op timeout.
        ``staging_bytes``: idle host staging buffers kept for reuse (pack and receive targets).
        ``on_header``: called on a reader thread when a transfer's header arrived and its payload
        is about to be received (transfer-started metrics, fault-injection in tests).
        ``ipc_events``: on one GPU, order block copies with CUDA IPC events instead of a stream
        synchronisation on each side (used where the platform has them); None: only with
        ``KVRELAY_IPC_EVENTS=1`` (opt-in until the event path has run on a GPU).
        ``trace``: keep a phase trace of same-GPU block transfers (trace.py; :meth:`trace`);
        None: only with ``KVRELAY_TRANSPORT_TRACE=1``. ``self.tracer.enabled`` may be flipped
        later (benchmarks compare both)."""
        self.worker_id = wire.validate_worker_id(worker_id)
        if timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive: {timeout_s}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.timeout_s = float(timeout_s)
        self._store_addr = (store_host, int(store_port))
        self._bind_host = bind_host
        self._interface = interface
        self._checksum = checksum
        self._max_message_bytes = max_message_bytes
        self._on_header = on_header
        if ipc_events is None:
            ipc_events = os.environ.get("KVRELAY_IPC_EVENTS", "0") == "1"
        self._ipc_events = ipc_events
        self.tracer = Tracer(enabled_by_env() if trace is None else trace)
        self._lock = threading.Lock()
        self._pairs: dict[str, _Pair] = {}
        self._counters = Counters(self.worker_id)
        self._buffers = BufferPool(staging_bytes)
        self._spare_clients: list[dist.Store] = []
        self._closed = False
        self._pause = threading.Event()  # never set: an interruptible pause for polling
        self._ctl = self._new_client(self.timeout_s)  # short operations only, never a wait
        self.incarnation = int(self._ctl.add(wire.worker_incarnation_key(worker_id), 1))
        self._info = {
            "incarnation": self.incarnation,
            "device": self.device.type,
            "gpu": gpu_uuid(self.device),
            "host": socket.gethostname(),
        }
        self._ctl.set(wire.worker_info_key(worker_id), json.dumps(self._info))

    # ---- public API ------------------------------------------------------------------------
    def send(
        self, peer: str, transfer_id: str, payload: torch.Tensor, *, timeout_s: float | None = None
    ) -> int:
        """Send one tensor (any shape, contiguous or not) to ``peer``; returns the bytes sent."""
        return self._send(
            peer, transfer_id, payload.dtype, timeout_s,
            lambda channel, deadline: channel.send(transfer_id, payload, deadline, self._checksum),
        )  # fmt: skip

    def recv(
        self,
        peer: str,
        transfer_id: str,
        *,
        shape: tuple[int, ...] | None = None,
        dtype: torch.dtype | None = None,
        timeout_s: float | None = None,
    ) -> torch.Tensor:
        """Wait for ``peer``'s transfer ``transfer_id``; checks its header against ``shape`` /
        ``dtype`` when given. Returns the payload on this transport's device (caller-owned)."""

        def take(arrival: Arrival, deadline: float) -> torch.Tensor:
            if arrival.source is not None:  # blocks of the peer's cache: gather a copy
                return arrival.source.read(pack_blocks, deadline)
            assert arrival.payload is not None
            return arrival.payload.to(self.device)

        return self._recv(peer, transfer_id, shape, dtype, timeout_s, take)

    def send_blocks(
        self,
        peer: str,
        transfer_id: str,
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
        block_ids: list[int] | torch.Tensor,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """Send ``block_ids`` as one message; returns bytes. Same GPU (CUDA IPC): the peer
        copies them straight out of ``kv_cache`` and this returns once it did, so it needs the
        peer's receive running (keep the blocks unchanged until then, as for any send).
        Otherwise: pack them (one gather) and send the packed payload."""
        span = self.tracer.span("send", peer, transfer_id, "enter") if self.tracer.enabled else None
        ids = _block_ids(block_ids, kv_cache.shape[0])
        if kv_cache.is_cuda:

            def send(channel: Channel, deadline: float) -> int:
                if (
                    channel.pg is None
                    and kv_cache.is_contiguous()
                    and kv_cache.device == self.device
                ):
                    return channel.send_blocks(
                        transfer_id, kv_cache, ids, deadline, self._checksum, span
                    )
                packed = pack_blocks(kv_cache, ids)
                return channel.send(transfer_id, packed, deadline, self._checksum)

            return self._send(peer, transfer_id, kv_cache.dtype, timeout_s, send)
        if not kv_cache.is_contiguous():
            return self.send(peer, transfer_id, pack_blocks(kv_cache, ids), timeout_s=timeout_s)
        # Host cache: gather into a reused staging buffer ([n, block elems] rows, one memcpy each).
        n, block_numel = int(ids.numel()), kv_cache[0].numel()
        buf = self._buffers.take(n * block_numel * kv_cache.element_size())
        rows = buf.view(kv_cache.dtype).view(n, block_numel)
        torch.index_select(kv_cache.view(kv_cache.shape[0], -1), 0, ids, out=rows)
        try:
            packed = rows.view(n, *kv_cache.shape[1:])
            return self.send(peer, transfer_id, packed, timeout_s=timeout_s)
        finally:
            self._buffers.give(buf)

    def recv_blocks(
        self,
        peer: str,
        transfer_id: str,
        kv_cache: torch.Tensor,  # [num_blocks, L, 2, bs, Hkv, D]
        block_ids: list[int] | torch.Tensor,
        *,
        timeout_s: float | None = None,
    ) -> int:
        """Receive a transfer into ``block_ids`` of ``kv_cache`` (one scatter, or on one GPU one
        copy from the sender's blocks); the header must match ``len(block_ids)`` blocks of the
        cache's shape and dtype."""
        ids = _block_ids(block_ids, kv_cache.shape[0])
        shape = (int(ids.numel()), *kv_cache.shape[1:])

        def take(arrival: Arrival, deadline: float) -> int:
            if arrival.source is not None:
                arrival.source.read(
                    lambda cache, src, dst: copy_blocks(cache, src, kv_cache, dst),
                    deadline,
                    dst_ids=ids if ids.device == kv_cache.device else ids.cpu(),
                )
            else:
                assert arrival.payload is not None
                unpack_blocks(kv_cache, ids, arrival.payload)
                if arrival.buffer is not None:
                    self._buffers.give(arrival.buffer)
            return arrival.header.nbytes

        return self._recv(peer, transfer_id, shape, kv_cache.dtype, timeout_s, take)

    def _send(
        self,
        peer: str,
        transfer_id: str,
        dtype: torch.dtype,
        timeout_s: float | None,
        send: Callable[[Channel, float], int],
    ) -> int:
        wire.validate_transfer_id(transfer_id)
        if not wire.dtype_supported(dtype):
            raise ValueError(f"unsupported dtype {dtype}")
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._counters.count(peer, sent=True, error=TransferError) as bump:
            channel, _ = self._channel(peer, deadline)
            nbytes = send(channel, deadline)
            bump(nbytes)
        return nbytes

    def _recv(
        self,
        peer: str,
        transfer_id: str,
        shape: tuple[int, ...] | None,
        dtype: torch.dtype | None,
        timeout_s: float | None,
        take: Callable[[Arrival, float], R],
    ) -> R:
        """Wait for the arrival, check its header, ``take`` it (copy the payload out) and count
        its bytes once that succeeded."""
        wire.validate_transfer_id(transfer_id)
        entered = time.monotonic_ns() if self.tracer.enabled else 0
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        with self._counters.count(peer, sent=False, error=TransferError) as bump:
            arrival = self._arrival(peer, transfer_id, deadline)
            if entered and arrival.source is not None and arrival.source.trace is not None:
                arrival.source.trace.entered_ns = entered
            got = arrival.header
            if (shape is not None and got.shape != tuple(shape)) or (
                dtype is not None and got.dtype != dtype
            ):
                if arrival.buffer is not None:
                    self._buffers.give(arrival.buffer)
                if arrival.source is not None:
                    arrival.source.release(None)
                raise TransferError(
                    f"transfer {transfer_id!r}: got {got.dtype}{list(got.shape)}, "
                    f"expected {dtype}{list(shape or ())}"
                )
            result = take(arrival, deadline)
            bump(got.nbytes)
        return result

    def _arrival(self, peer: str, transfer_id: str, deadline: float) -> Arrival:
        """Wait for ``transfer_id`` on the pair's channel (made or remade first). One that has
        already arrived is taken even when its channel closed since: a same-GPU peer may send a
        payload and close its link before we ask (also if that races with remaking it)."""
        with self._lock:
            pair = None if self._closed else self._pairs.get(peer)
        ready = None if pair is None else pair.inbox.pop(transfer_id)
        if ready is not None:
            return ready
        try:
            channel, pair = self._channel(peer, deadline)
        except TransferError:
            ready = None if pair is None else pair.inbox.pop(transfer_id)
            if ready is None:
                raise
            return ready
        return pair.inbox.take(transfer_id, channel.generation, deadline)

    def stats(self) -> TransportStats:
        return self._counters.snapshot()

    def path(self, peer: str) -> str | None:
        """The live channel's data path to ``peer``: "gloo", "cuda-ipc", or None (none yet)."""
        with self._lock:
            pair = self._pairs.get(peer)
        channel = pair.channel if pair is not None else None
        if channel is None or channel.broken is not None:
            return None
        return "cuda-ipc" if channel.pg is None else "gloo"

    def trace(self, peer: str, side: str | None = None) -> list[TransferRecord]:
        """The kept phase records of same-GPU block transfers with ``peer`` (trace.py): "send",
        "recv", or both (sends first); empty unless tracing was on."""
        return self.tracer.records(peer, side)

    def ipc_events(self, peer: str) -> bool:
        """Whether the live channel to ``peer`` orders same-GPU copies with CUDA IPC events
        (False: host synchronisations, another path, or no channel yet)."""
        with self._lock:
            pair = self._pairs.get(peer)
        channel = pair.channel if pair is not None else None
        return channel is not None and channel.broken is None and channel.events is not None

    def close(self) -> None:
        """Stop every channel (readers end, groups abort). Idempotent."""
        with self._lock:
            self._closed = True
            self._pause.set()
            channels = [p.channel for p in self._pairs.values() if p.channel is not None]
        for ch in channels:
            ch.close()
        for ch in channels:
            ch.join(timeout=2.0)

    def __enter__(self) -> KVTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- channels ------------------------------------------------------------------------------
    def _channel(self, peer: str, deadline: float) -> tuple[Channel, _Pair]:
        wire.validate_worker_id(peer)
        if peer == self.worker_id:
            raise ValueError("a worker cannot transfer to itself")
        with self._lock:
            if self._closed:
                raise TransferError("transport closed")
            pair = self._pairs.setdefault(peer, _Pair())
        with pair.lock:
            while True:
                current = pair.channel
                if current is not None and current.link is not None and not current.broken:
                    return current, pair  # a live link: a restarted or broken peer closes it
                target = self._target(peer, deadline, live=current is not None)
                if current is not None and current.prefix == target.prefix and not current.broken:
                    return current, pair
                if current is not None:
                    current.close("replaced by a newer channel")
                    pair.channel = None
                # Meet the peer at this prefix first (within our deadline): group creation is a
                # collective, and the peer may be a newer incarnation than the info we read.
                self._ctl.set(wire.hello_key(target.prefix, target.rank), "1")
                if self._await_hello(peer, target, deadline):
                    pair.generation += 1
                    pair.channel = self._open(peer, target, pair, deadline)
                    return pair.channel, pair

    def _target(self, peer: str, deadline: float, *, live: bool = False) -> _Target:
        """The prefix both sides must use now: incarnations from the workers' info, epoch.
        ``live``: a channel to ``peer`` exists, so both keys exist (they are never deleted) and
        one read fetches them."""
        a, b = sorted((self.worker_id, peer))
        epoch_key = wire.pair_epoch_key(a, b)
        if live:
            raw_info, raw_epoch = self._ctl.multi_get([wire.worker_info_key(peer), epoch_key])
        else:
            raw_info = self._wait_get(wire.worker_info_key(peer), deadline)
            raw_epoch = self._ctl.compare_set(epoch_key, "", "0")
        peer_info = json.loads(raw_info)
        epoch = int(raw_epoch)
        incs = {self.worker_id: self.incarnation, peer: int(peer_info["incarnation"])}
        prefix = wire.pair_prefix(a, b, incs[a], incs[b], epoch)
        return _Target(prefix, int(self.worker_id != a), peer_info, epoch_key, epoch)

    def _await_hello(self, peer: str, target: _Target, deadline: float) -> bool:
        """Poll (the store has no wait-for-any) for the peer's hello at ``target``; False when
        the target moved meanwhile (peer restarted, epoch bumped), so the caller retries."""
        key = wire.hello_key(target.prefix, 1 - target.rank)
        pause, last_check = 0.001, time.monotonic()
        while not self._ctl.check([key]):
            if self._closed:
                raise TransferError("transport closed")
            now = time.monotonic()
            if now >= deadline:
                raise TransferError(f"peer {peer!r} did not join {target.prefix} in time")
            if now - last_check > 0.2:
                last_check = now
                if self._target(peer, deadline).prefix != target.prefix:
                    return False
            self._pause.wait(min(pause, deadline - now))
            pause = min(pause * 2, 0.05)
        return True

    def _open(self, peer: str, target: _Target, pair: _Pair, deadline: float) -> Channel:
        same_gpu = self._info["gpu"] is not None and self._info["gpu"] == target.peer_info.get(
            "gpu"
        )
        epoch_key, epoch = target.epoch_key, target.epoch

        def bump_epoch() -> None:  # both sides may call it; the compare-and-set bumps once
            self._ctl.compare_set(epoch_key, str(epoch), str(epoch + 1))

        events = None
        if same_gpu and self._ipc_events:
            with GPU_GATE.work():
                events = IpcEvents.create(self.device)  # None: the platform has none
            if events is not None:
                pair.events.append(events)
        link = self._link(target, deadline, bump_epoch) if same_gpu else None
        pg = None if same_gpu else self._gloo_group(target.prefix, target.rank)
        return Channel(
            prefix=target.prefix,
            rank=target.rank,
            generation=pair.generation,
            pg=pg,
            link=link,
            ctl=self._ctl,
            reader_store=None if same_gpu else self._new_client(_FOREVER_S),
            inbox=pair.inbox,
            device=self.device,
            max_message_bytes=self._max_message_bytes,
            buffers=self._buffers,
            on_break=bump_epoch,
            on_header=self._on_header,
            events=events,
            tracer=self.tracer,
            peer=peer,
        )

    def _link(self, target: _Target, deadline: float, bump_epoch: Callable[[], None]) -> Link:
        """The same-GPU channel's control link, connected through the store. On failure the
        epoch moves on, so both sides retry at a fresh prefix (no stale address to meet at)."""
        key = wire.link_key(target.prefix)
        try:
            if target.rank == 0:
                return accept_link(lambda address: self._ctl.set(key, address), deadline)
            return connect_link(self._wait_get(key, deadline), deadline)
        except (OSError, ValueError, TransferError) as exc:
            bump_epoch()
            raise TransferError(f"could not connect pair {target.prefix}: {exc}") from exc

    def _gloo_group(self, prefix: str, rank: int) -> dist.ProcessGroupGloo:
        opts = dist.ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        iface = self._interface
        host = self._bind_host
        if iface is None and host is None:
            host = "127.0.0.1"  # GLOO_SOCKET_IFNAME, when set, overrides loopback below
            env_iface = _env_ifname()
            if env_iface:
                iface, host = env_iface, None
        if iface is not None:
            opts._devices = [dist.ProcessGroupGloo.create_device(interface=iface)]
        else:
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=host or "")]
        opts._timeout = datetime.timedelta(seconds=self.timeout_s)
        opts._threads = 2
        group_store = dist.PrefixStore(f"{prefix}/gloo", self._new_client(self.timeout_s))
        try:
            return dist.ProcessGroupGloo(group_store, rank, 2, opts)
        except Exception as exc:
            raise TransferError(f"could not connect pair {prefix}: {exc}") from exc

    # ---- store helpers ---------------------------------------------------------------------------
    def _new_client(self, timeout_s: float) -> dist.Store:
        host, port = self._store_addr
        return dist.TCPStore(
            host, port, is_master=False, timeout=datetime.timedelta(seconds=timeout_s)
        )

    def _wait_get(self, key: str, deadline: float) -> bytes:
        """Blocking wait for ``key`` on a client of its own (a TCPStore client serves one call
        at a time: a wait on the shared one would stall every other thread)."""
        if self._ctl.check([key]):
            return bytes(self._ctl.get(key))
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TransferError(f"deadline passed waiting for {key}")
        with self._lock:
            client = self._spare_clients.pop() if self._spare_clients else None
        client = client or self._new_client(self.timeout_s)
        try:
            client.wait([key], datetime.timedelta(seconds=remaining))
            return bytes(client.get(key))
        except dist.DistStoreError as exc:
            raise TransferError(f"deadline passed waiting for {key}") from exc
        finally:
            with self._lock:
                self._spare_clients.append(client)


_FOREVER_S = 7 * 24 * 3600.0  # a reader waits for the next header as long as its channel lives


def _env_ifname() -> str | None:
    value = os.environ.get("GLOO_SOCKET_IFNAME", "").split(",")[0].strip()
    return value or None


def _block_ids(block_ids: list[int] | torch.Tensor, num_blocks: int) -> torch.Tensor:
    ids = torch.as_tensor(block_ids, dtype=torch.long).reshape(-1)
    if ids.numel() == 0:
        raise ValueError("no block ids")
    if int(ids.min()) < 0 or int(ids.max()) >= num_blocks:
        raise ValueError(f"block ids out of range [0, {num_blocks})")
    return ids
