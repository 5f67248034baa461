"""Metadata poller against a local aiohttp server whose answer the test switches."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from kvrelay.cluster.spot.metadata_poller import (
    MetadataPoller,
    MetadataPollerConfig,
    parse_instance_action,
    parse_preempted,
)
from kvrelay.cluster.spot.notices import NoticeKind, PreemptionNotice, queue_sink

WAIT_S = 10.0


@dataclass
class Endpoint:
    status: int = 404
    body: str = ""
    need_header: tuple[str, str] | None = None
    token: str | None = None  # IMDSv2: GETs must carry it
    seen: list[dict[str, str]] = field(default_factory=list)
    answered: asyncio.Event = field(default_factory=asyncio.Event)


@contextlib.asynccontextmanager
async def serve() -> AsyncIterator[tuple[str, Endpoint]]:
    ep = Endpoint()

    async def get(request: web.Request) -> web.Response:
        ep.seen.append(dict(request.headers))
        ep.answered.set()
        if ep.need_header and request.headers.get(ep.need_header[0]) != ep.need_header[1]:
            return web.Response(status=403, text="missing header")
        if ep.token and request.headers.get("X-aws-ec2-metadata-token") != ep.token:
            return web.Response(status=401, text="bad token")
        return web.Response(status=ep.status, text=ep.body)

    async def token(request: web.Request) -> web.Response:
        assert request.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "60"
        return web.Response(text=ep.token or "")

    app = web.Application()
    app.router.add_get("/meta", get)
    app.router.add_put("/latest/api/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}", ep
    finally:
        await runner.cleanup()


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def test_instance_action_fires_once_and_survives_errors() -> None:
    async def body() -> None:
        async with serve() as (base, ep):
            got: list[PreemptionNotice] = []
            cfg = MetadataPollerConfig(url=f"{base}/meta", target="node-7", timeout_s=2.0)
            p = MetadataPoller(cfg, got.append)
            try:
                assert await p.poll_once() is None and p.errors == 0  # 404: nothing scheduled
                ep.status, ep.body = 500, "oops"
                assert await p.poll_once() is None and p.errors == 1
                ep.status, ep.body = 200, "{not json"
                assert await p.poll_once() is None and p.errors == 2
                ep.status, ep.body = 200, '{"action": "terminate", "time": "2030-01-02T03:04:05Z"}'
                n = await p.poll_once()
                assert n is not None and got == [n]
                assert (n.target, n.kind, n.source, n.node) == (
                    "node-7",
                    NoticeKind.NODE,
                    "metadata",
                    "node-7",
                )
                assert n.deadline_s == 1893553445.0 and "terminate" in n.reason
                assert await p.poll_once() is None and len(got) == 1  # once
                ep.status = 404
                assert await p.poll_once() is None
                ep.status = 200  # a new reclaim after a clear fires again
                assert await p.poll_once() is not None and len(got) == 2
            finally:
                await p.stop()

    run(body())


def test_preempted_style_with_header_and_background_loop() -> None:
    async def body() -> None:
        async with serve() as (base, ep):
            ep.need_header = ("Metadata-Flavor", "Google")
            ep.status, ep.body = 200, "FALSE"
            q: asyncio.Queue[PreemptionNotice] = asyncio.Queue()
            cfg = MetadataPollerConfig(
                url=f"{base}/meta",
                target="w3",
                kind=NoticeKind.WORKER,
                parser="preempted",
                interval_s=0.02,
                grace_s=25.0,
                headers={"Metadata-Flavor": "Google"},
            )
            p = MetadataPoller(cfg, queue_sink(asyncio.get_running_loop(), q))
            p.start()
            try:
                await asyncio.wait_for(ep.answered.wait(), WAIT_S)
                t0 = time.time()
                ep.body = "TRUE\n"
                n = await asyncio.wait_for(q.get(), WAIT_S)
                assert (n.target, n.kind, n.node) == ("w3", NoticeKind.WORKER, "")
                assert t0 + 25 <= n.deadline_s <= time.time() + 25
                polls = p.polls
                while p.polls < polls + 3:  # a few more polls of TRUE: no second notice
                    ep.answered.clear()
                    await asyncio.wait_for(ep.answered.wait(), WAIT_S)
                assert q.empty() and p.errors == 0
            finally:
                await asyncio.wait_for(p.stop(), WAIT_S)
            assert p._task is not None and p._task.done()

    run(body())


def test_imdsv2_token_and_refresh() -> None:
    async def body() -> None:
        async with serve() as (base, ep):
            ep.token = "tok-1"
            cfg = MetadataPollerConfig(
                url=f"{base}/meta", target="n", token_url=f"{base}/latest/api/token", token_ttl_s=60
            )
            p = MetadataPoller(cfg, lambda n: None)
            try:
                assert await p.poll_once() is None and p.errors == 0
                assert ep.seen[-1]["X-aws-ec2-metadata-token"] == "tok-1"
                ep.token = "tok-2"  # the session token expired
                assert await p.poll_once() is None and p.errors == 1  # 401
                assert await p.poll_once() is None and p.errors == 1
                assert ep.seen[-1]["X-aws-ec2-metadata-token"] == "tok-2"
            finally:
                await p.stop()

    run(body())


def test_unreachable_endpoint_is_an_error_not_a_crash() -> None:
    async def body() -> None:
        cfg = MetadataPollerConfig(url="http://127.0.0.1:9/meta", target="n", timeout_s=1.0)
        p = MetadataPoller(cfg, lambda n: None)
        try:
            assert await p.poll_once() is None and p.errors == 1
        finally:
            await p.stop()

    run(body())


def test_parsers_and_config_validation() -> None:
    assert parse_preempted(200, "false", 0, 5) is None
    r = parse_preempted(200, "TRUE", 100.0, 5)
    assert r is not None and r.deadline_s == 105.0
    for bad in ((200, "maybe"), (503, "TRUE")):
        with pytest.raises(ValueError):
            parse_preempted(bad[0], bad[1], 0, 5)
    r = parse_instance_action(200, '{"action": "stop"}', 50.0)
    assert r is not None and r.deadline_s == 50.0
    for body in ('{"action": "dance"}', "[]", '{"action": "terminate", "time": "soon"}'):
        with pytest.raises(ValueError):
            parse_instance_action(200, body, 0)
    for kw in (
        dict(url="ftp://x"),
        dict(interval_s=0),
        dict(parser="xml"),
        dict(target=""),
        dict(timeout_s=float("nan")),
    ):
        args: dict[str, object] = dict(url="http://x", target="t")
        args.update(kw)
        with pytest.raises(ValueError):
            MetadataPollerConfig(**args)  # type: ignore[arg-type]
