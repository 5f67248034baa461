"""The HTTP listener's limits on real sockets (echo backend, no cluster): a cap on open
connections, a keep-alive connection that stays usable for a second request, and a slow head
on a kept-alive connection closed on time."""

from __future__ import annotations

import socket
import time

from kvrelay.cluster.api.http_guard import HttpLimits
from kvrelay_testing.frontend import EchoBackend, FrontendThread

CAP = 4


def _health(s: socket.socket) -> bytes:
    s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    return s.recv(4096)


def test_connections_beyond_the_cap_are_closed_and_slots_come_back() -> None:
    limits = HttpLimits(header_timeout_s=30, max_connections=CAP)
    with FrontendThread(EchoBackend(), http_limits=limits) as srv:
        held = [socket.create_connection(("127.0.0.1", srv.http_port), timeout=10)
                for _ in range(CAP)]
        try:
            for s in held:  # kept alive: every one answers, twice
                assert _health(s).startswith(b"HTTP/1.1 200")
                assert _health(s).startswith(b"HTTP/1.1 200")
            extra = socket.create_connection(("127.0.0.1", srv.http_port), timeout=10)
            with extra:
                try:
                    reply = _health(extra)
                except ConnectionResetError:
                    reply = b""
                assert reply == b"", reply[:100]  # refused: closed without an answer
        finally:
            for s in held:
                s.close()
        deadline = time.monotonic() + 10
        while True:  # the closed connections give their slots back
            with socket.create_connection(("127.0.0.1", srv.http_port), timeout=10) as s:
                try:
                    if _health(s).startswith(b"HTTP/1.1 200"):
                        break
                except ConnectionResetError:
                    pass
            assert time.monotonic() < deadline, "slots never came back"
            time.sleep(0.05)


def test_slow_head_of_a_later_request_on_a_kept_alive_connection_is_closed() -> None:
    head_s = 1.0
    limits = HttpLimits(header_timeout_s=head_s, keepalive_timeout_s=60)
    with FrontendThread(EchoBackend(), http_limits=limits) as srv:
        with socket.create_connection(("127.0.0.1", srv.http_port), timeout=30) as s:
            assert _health(s).startswith(b"HTTP/1.1 200")
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # this head never ends
            t0 = time.monotonic()
            try:
                rest = s.recv(4096)
            except ConnectionResetError:
                rest = b""
            took = time.monotonic() - t0
        assert rest == b"", rest[:100]
        # closed by the header timeout, not by the 60 s keep-alive one (nor the 30 s recv)
        assert head_s * 0.8 <= took < head_s + 10, took
