"""The OpenAI-compatible HTTP frontend, driven by the official ``openai`` package (and raw HTTP
for what the package hides): chat and completions, streamed and not, include_usage, error
shapes, /health, /metrics, and a client that hangs up mid-stream."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import openai
import pytest

from kvrelay.client import Client, InternalError
from kvrelay_testing.frontend import (
    EchoBackend,
    FrontendThread,
    wait_blocks_free,
    wait_blocks_held,
)


@pytest.fixture(scope="module")
def srv() -> Iterator[FrontendThread]:
    backend = EchoBackend(step_delay_s=0.002)
    with FrontendThread(backend, metrics_handler=lambda: b"kvrelay_up 1\n") as server:
        yield server


@pytest.fixture()
def oai(srv: FrontendThread) -> Iterator[openai.OpenAI]:
    client = openai.OpenAI(
        base_url=f"http://127.0.0.1:{srv.http_port}/v1", api_key="unused", max_retries=0, timeout=20
    )
    yield client
    client.close()
    assert srv.call(wait_blocks_free(srv.backend)) == 0, "KV blocks leaked"


@pytest.fixture(scope="module")
def model(srv: FrontendThread) -> str:
    with Client(f"127.0.0.1:{srv.grpc_port}") as c:
        return c.models()[0].id


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]


def test_models(oai: openai.OpenAI, model: str) -> None:
    ids = [m.id for m in oai.models.list().data]
    assert ids[0] == model


def test_chat_non_streamed_equals_sdk(oai: openai.OpenAI, srv: FrontendThread, model: str) -> None:
    resp = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert resp.object == "chat.completion" and resp.id.startswith("chatcmpl-")
    assert resp.model == model and len(resp.choices) == 1
    choice = resp.choices[0]
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.completion_tokens <= 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    with Client(f"127.0.0.1:{srv.grpc_port}") as c:
        sdk = c.chat(MESSAGES, model=model, max_tokens=12, temperature=0)
    assert sdk.text == choice.message.content  # greedy: both APIs give the same output
    assert sdk.usage.prompt_tokens == resp.usage.prompt_tokens


def test_chat_streamed_with_usage(oai: openai.OpenAI, model: str) -> None:
    full = oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(
        oai.chat.completions.create(
            model=model,
            messages=MESSAGES,
            max_tokens=10,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == full.choices[0].finish_reason and set(finishes[:-1]) == {None}
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert last.usage.completion_tokens == full.usage.completion_tokens  # type: ignore[union-attr]
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(oai: openai.OpenAI, srv: FrontendThread, model: str) -> None:
    resp = oai.completions.create(
        model=model, prompt="Once upon a time", max_tokens=8, temperature=0
    )
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert resp.choices[0].finish_reason in ("stop", "length")
    assert resp.usage is not None and resp.usage.completion_tokens <= 8
    with Client(f"127.0.0.1:{srv.grpc_port}") as c:
        assert (
            c.generate("Once upon a time", model=model, max_tokens=8, temperature=0).text
            == resp.choices[0].text
        )
    chunks = list(
        oai.completions.create(
            model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
    )
    assert "".join(c.choices[0].text for c in chunks) == resp.choices[0].text
    assert chunks[-1].choices[0].finish_reason == resp.choices[0].finish_reason
    assert all(c.usage is None for c in chunks)  # no include_usage: no usage chunk
    with_usage = list(
        oai.completions.create(
            model=model,
            prompt="Once upon a time",
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert with_usage[-1].choices == [] and with_usage[-1].usage is not None
    assert with_usage[-1].usage.completion_tokens == resp.usage.completion_tokens
    # token-id prompts (OpenAI allows them) give the same
    ids = oai.completions.create(model=model, prompt=[[1, 2, 3]], max_tokens=3, temperature=0)
    assert ids.usage is not None and ids.usage.prompt_tokens == 3


def test_errors_use_openai_shape(oai: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        oai.completions.create(model=model, prompt="x", temperature=-1)
    body = bad.value.body
    assert isinstance(body, dict) and "temperature" in body["message"]
    assert body["type"] == "invalid_request_error" and body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="context"):
        oai.completions.create(model=model, prompt="x", max_tokens=10**9)
    with pytest.raises(openai.BadRequestError, match="n = 1"):
        oai.completions.create(model=model, prompt="x", n=2)


def _raw(
    srv: FrontendThread,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("body", [b"{not json", b"\xff\xfe", b"[1,2]", b"null", b""])
def test_malformed_bodies_get_400(srv: FrontendThread, body: bytes) -> None:
    status, _, data = _raw(srv, "POST", "/v1/chat/completions", body)
    assert status == 400
    err = json.loads(data)["error"]
    assert err["type"] == "invalid_request_error" and err["message"]


def test_health_and_metrics_hook(srv: FrontendThread) -> None:
    status, _, data = _raw(srv, "GET", "/health")
    assert status == 200 and json.loads(data)["status"] == "ok"
    status, _, data = _raw(srv, "GET", "/metrics")
    assert status == 200 and data == b"kvrelay_up 1\n"


def test_client_hangup_mid_stream_frees_blocks(srv: FrontendThread, model: str) -> None:
    body = json.dumps(
        {"model": model, "prompt": "hang up", "max_tokens": 400, "ignore_eos": True, "stream": True}
    ).encode()
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=10)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    first = resp.readline()
    assert first.startswith(b"data: {")
    assert srv.call(wait_blocks_held(srv.backend)) > 0
    conn.sock.close()  # hang up without reading the rest
    conn.close()
    assert srv.call(wait_blocks_free(srv.backend)) == 0


class BrokenBackend(EchoBackend):
    """Fails after its first token, like a worker that dies with no one to take over."""

    async def _generate(self, request):  # type: ignore[no-untyped-def,override]
        async for event in super()._generate(request):
            yield event
            raise RuntimeError("worker lost")


def test_backend_failure_is_reported_not_hung() -> None:
    backend = BrokenBackend()
    with FrontendThread(backend) as srv:
        status, _, data = _raw(
            srv, "POST", "/v1/completions", b'{"model": "echo", "prompt": "x", "max_tokens": 5}'
        )
        assert status == 500 and json.loads(data)["error"]["type"] == "server_error"
        status, _, data = _raw(
            srv,
            "POST",
            "/v1/completions",
            b'{"model": "echo", "prompt": "x", "max_tokens": 5, "stream": true}',
        )
        assert status == 200
        events = [e for e in data.split(b"\n\n") if e]
        assert json.loads(events[-1][len(b"data: ") :])["error"]["message"] == "internal error"
        with Client(f"127.0.0.1:{srv.grpc_port}", timeout=10) as c, pytest.raises(InternalError):
            c.generate("x", max_tokens=5)
        assert srv.call(wait_blocks_free(srv.backend)) == 0


def test_each_request_carries_its_arrival_on_the_wall_clock(
    oai: openai.OpenAI, srv: FrontendThread, model: str
) -> None:
    """Both frontends stamp the request with the wall-clock time it reached them
    (``GenerateRequest.arrival_s``): the workers order and time it by that, wherever it runs."""
    before = time.time()
    oai.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, temperature=0)
    with Client(f"127.0.0.1:{srv.grpc_port}") as c:
        c.chat(MESSAGES, model=model, max_tokens=2, temperature=0)
    after = time.time()
    via_http, via_grpc = srv.backend.admitted[-2:]
    assert before <= via_http.arrival_s <= via_grpc.arrival_s <= after
