"""Bounded load: 200 concurrent streams (half gRPC, half OpenAI HTTP) against limits far lower.
Every stream completes in full or is refused with RESOURCE_EXHAUSTED / 429 + a retry hint;
none hangs (each has a deadline), none fails otherwise, nothing leaks."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from kvrelay.client import AsyncClient, ResourceExhaustedError, RetryPolicy
from kvrelay.cluster.api.limits import FrontendLimits
from kvrelay_testing.frontend import EchoBackend, FrontendThread, wait_blocks_free

STREAMS = 200
MAX_TOKENS = 24
LIMITS = FrontendLimits(max_streams=24, max_queue=24, queue_timeout_s=30, retry_after_s=0.25)


async def grpc_stream(client: AsyncClient, i: int) -> str:
    try:
        chunks = [
            c
            async for c in client.generate_stream(
                f"stream {i}", max_tokens=MAX_TOKENS, ignore_eos=True, timeout=40
            )
        ]
    except ResourceExhaustedError as err:
        assert err.retry_after == 0.25
        return "refused"
    last = chunks[-1]
    assert last.finish_reason == "length" and last.usage is not None
    assert last.usage.completion_tokens == MAX_TOKENS == sum(len(c.token_ids) for c in chunks)
    return "ok"


async def http_stream(session: aiohttp.ClientSession, url: str, model: str, i: int) -> str:
    body = {
        "model": model,
        "prompt": f"stream {i}",
        "max_tokens": MAX_TOKENS,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    async with session.post(url, json=body) as resp:
        if resp.status == 429:
            assert resp.headers["Retry-After"] == "1"
            assert (await resp.json())["error"]["type"] == "rate_limit_error"
            return "refused"
        assert resp.status == 200, await resp.text()
        events = [line async for line in resp.content if line.strip()]
    assert events[-1] == b"data: [DONE]\n"
    usage = json.loads(events[-2][len(b"data: ") :])["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS
    return "ok"


def test_200_streams_complete_or_are_refused() -> None:
    backend = EchoBackend(step_delay_s=0.002)
    with FrontendThread(backend, limits=LIMITS) as srv:

        async def main() -> list[str]:
            url = f"http://127.0.0.1:{srv.http_port}/v1/completions"
            timeout = aiohttp.ClientTimeout(total=40)
            async with (
                AsyncClient(
                    f"127.0.0.1:{srv.grpc_port}", retry=RetryPolicy(max_attempts=1)
                ) as client,
                aiohttp.ClientSession(timeout=timeout) as session,
            ):
                model = (await client.models())[0].id
                jobs = [
                    grpc_stream(client, i) if i % 2 else http_stream(session, url, model, i)
                    for i in range(STREAMS)
                ]
                return await asyncio.wait_for(asyncio.gather(*jobs), 50)

        outcomes = asyncio.run(main())
        ok, refused = outcomes.count("ok"), outcomes.count("refused")
        assert ok + refused == STREAMS
        assert ok >= LIMITS.max_streams + LIMITS.max_queue  # the admitted and the queued finish
        assert refused > 0  # the limits were really hit
        if hasattr(srv.backend, "peak_running"):
            assert srv.backend.peak_running <= LIMITS.max_streams
        core = srv.handle.core
        assert srv.call(wait_blocks_free(srv.backend)) == 0
        assert core.in_flight == 0 and core.admission.running == 0
        core.admission.check_integrity()
