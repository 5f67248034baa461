"""Request drivers for the load generator: one streamed request in, one RequestResult out.

* HTTP: OpenAI ``/v1/chat/completions`` (or ``/v1/completions``) with ``stream: true`` and
  ``stream_options.include_usage``; the SSE stream is read line by line, a token-bearing chunk
  stamps the time (first one = TTFT, later ones = inter-token gaps), the final usage chunk gives
  the server's token counts (the synthetic prompt's real length under its tokenizer).
* gRPC: ``kvrelay.client.AsyncClient`` (imported lazily), streaming ``Generate``.

Both only ever talk to loopback targets: this is a benchmark tool, not a load-testing service.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from kvrelay.benchmarks.loadgen_report import RequestResult
from kvrelay.benchmarks.loadgen_workload import Arrival

LOOPBACK = {"127.0.0.1", "localhost", "::1"}

Send = Callable[[Arrival, str, float], Awaitable[RequestResult]]  # (arrival, prompt, scheduled)


def require_loopback(host: str) -> None:
    if host not in LOOPBACK:
        raise ValueError(f"refusing non-loopback target {host!r}; use 127.0.0.1 / localhost")


class _Stamps:
    """Arrival times of token-bearing chunks, relative to the send time."""

    def __init__(self) -> None:
        self.sent = time.perf_counter()
        self.times: list[float] = []

    def token(self) -> None:
        self.times.append(time.perf_counter() - self.sent)

    def result(
        self,
        a: Arrival,
        scheduled: float,
        sent_s: float,
        prompt_tokens: int,
        output_tokens: int | None,
        error: str = "",
    ) -> RequestResult:
        t = self.times
        return RequestResult(
            tenant=a.tenant,
            scheduled_s=scheduled,
            sent_s=sent_s,
            ttft_s=t[0] if t else None,
            gaps_s=tuple(b - x for x, b in itertools.pairwise(t)),
            e2e_s=time.perf_counter() - self.sent,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens if output_tokens is not None else len(t),
            error=error,
        )


async def _sse_events(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            return
        yield json.loads(data)


def http_driver(
    session: aiohttp.ClientSession,
    base_url: str,
    model: str,
    *,
    chat: bool = True,
    request_timeout_s: float = 120.0,
    t0: Callable[[], float],
) -> Send:
    parts = urlsplit(base_url)
    require_loopback(parts.hostname or "")
    url = base_url.rstrip("/") + ("/v1/chat/completions" if chat else "/v1/completions")

    async def send(a: Arrival, prompt: str, scheduled: float) -> RequestResult:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": a.output_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
            "ignore_eos": True,  # lengths come from the workload, not from the model
            "temperature": 0.0,
            "user": a.tenant,
        }
        if chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        sent_s = t0()
        st = _Stamps()
        usage: dict[str, int] = {}

        async def stream() -> str:
            """Read the SSE stream into ``st`` and ``usage``; '' or an error text."""
            async with session.post(url, json=body) as resp:
                if resp.status != 200:
                    return f"http {resp.status}: {(await resp.text())[:200]}"
                async for ev in _sse_events(resp):
                    if ev.get("usage"):
                        usage.update(ev["usage"])
                    for ch in ev.get("choices") or ():
                        piece = (ch.get("delta") or {}).get("content") if chat else ch.get("text")
                        if piece:
                            st.token()
            return ""

        try:
            error = await asyncio.wait_for(stream(), request_timeout_s)
        except asyncio.TimeoutError:
            error = "timeout"
        except (aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as e:
            error = f"transport: {e}"
        return st.result(
            a,
            scheduled,
            sent_s,
            usage.get("prompt_tokens", a.prompt_tokens),
            usage.get("completion_tokens") if not error else None,
            error,
        )

    return send


def grpc_driver(
    client: Any, model: str, *, request_timeout_s: float = 120.0, t0: Callable[[], float]
) -> Send:
    """``client``: a ``kvrelay.client.AsyncClient`` (the caller opens and closes it)."""

    async def send(a: Arrival, prompt: str, scheduled: float) -> RequestResult:
        sent_s = t0()
        st = _Stamps()
        usage: list[Any] = []

        async def stream() -> None:
            chunks = client.generate(
                prompt,
                stream=True,
                model=model,
                max_tokens=a.output_tokens,
                ignore_eos=True,
                temperature=0.0,
                tenant=a.tenant,
            )
            if inspect.isawaitable(chunks):
                chunks = await chunks
            async for chunk in chunks:
                if chunk.token_ids:
                    st.token()
                if chunk.usage is not None:
                    usage.append(chunk.usage)

        error = ""
        try:
            await asyncio.wait_for(stream(), request_timeout_s)
        except asyncio.TimeoutError:
            error = "timeout"
        except Exception as e:  # the SDK raises its own error types; record, do not crash
            error = f"grpc: {type(e).__name__}: {e}"
        u = usage[-1] if usage and not error else None
        return st.result(
            a,
            scheduled,
            sent_s,
            u.prompt_tokens if u else a.prompt_tokens,
            u.completion_tokens if u else None,
            error,
        )

    return send


def open_grpc_client(target: str) -> Any:
    host = target.rsplit(":", 1)[0].strip("[]")
    require_loopback(host)
    from kvrelay.client import AsyncClient  # lazy: the HTTP path needs no gRPC stack

    return AsyncClient(target)
