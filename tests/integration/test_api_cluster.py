"""The public API (issue 4) against a real cluster: a local 1P+1D Ray cluster on the default model
(CPU) serving its own gRPC and OpenAI HTTP frontends from this (the driver) process, with API keys, TLS
(a self-signed certificate made here: every call below is a TLS round trip) and low stream/queue
limits. Driven by the SDK, the official ``openai`` package, raw gRPC/HTTP bytes and hypothesis. Leak checks read the workers' own pools (``Cluster.integrity()``: used blocks,
live requests and reservations on every worker) and the controller's request table."""

from __future__ import annotations

import asyncio
import http.client
import json
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import grpc
import openai
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam

from kvrelay.client import (
    AsyncClient,
    Client,
    PermissionDeniedError,
    ResourceExhaustedError,
    RetryPolicy,
    UnauthenticatedError,
    UnavailableError,
)
from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.proto.kvrelay.v1 import generation_pb2 as gpb
from kvrelay.workers.model.source import load_tokenizer
from kvrelay_testing.live_api import (
    ADMIN_KEY,
    USER_KEY,
    Live,
    assert_keys_never_logged,
    assert_no_leak,
    grpc_call,
    held,
    http_post,
    https,
    oai_client,
    sdk,
    settle,
    trusting,
)

MAX_STREAMS, MAX_QUEUE, RETRY_AFTER_S = 16, 32, 1.0  # RETRY_AFTER_S: FrontendLimits' default
LONG = 400  # tokens: a stream still decoding when the test acts on it (~80 ms/token here)
SHORT = 4  # fuzzed max_tokens in 1..12 are cut to this (the error classes do not change)
FUZZ = settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
RAW_FUZZ = settings(FUZZ, max_examples=10)  # 15 + 10 = 25 examples per API


@pytest.fixture(scope="module")
def tls_files(self_signed_cert: tuple[Path, Path]) -> tuple[Path, Path]:
    return self_signed_cert


@pytest.fixture(scope="module")
def live(tls_files: tuple[Path, Path]) -> Iterator[Live]:
    import ray

    owns_ray = not ray.is_initialized()
    cfg = ServeConfig(
        tls_cert=str(tls_files[0]),
        tls_key=str(tls_files[1]),
        grpc_port=0,
        http_port=0,
        threads_per_worker=1,
        api_keys=(USER_KEY,),
        admin_keys=(ADMIN_KEY,),
        max_concurrent_streams=MAX_STREAMS,
        max_queue_depth=MAX_QUEUE,
    )
    try:
        cluster = Cluster.start(cfg)
    except BaseException:
        if owns_ray and ray.is_initialized():
            ray.shutdown()
        raise
    try:
        config, tok, model_id = load_tokenizer(None)
        workers = cluster.workers()
        assert sorted(workers.values()) == ["decode", "prefill"]
        yield Live(
            cluster,
            workers,
            f"localhost:{cluster.ports['grpc_port']}",
            int(cluster.ports["http_port"]),
            tls_files[0],
            model_id,
            config.vocab_size,
            config.max_context,
            tok,
        )
    finally:
        cluster.shutdown()


# -- the official openai package against the SDK -------------------------------------------------
QUESTION: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "What is the capital of France?"}
]
PROMPT = "The three primary colors are"


def test_openai_package_equals_the_grpc_sdk(live: Live, load_test_file: Any) -> None:
    oai = oai_client(live)
    with oai, sdk(live) as c:
        assert [m.id for m in oai.models.list().data] == [live.model] == [m.id for m in c.models()]
        ref_chat = c.chat(QUESTION, max_tokens=12, temperature=0)
        assert "Paris" in ref_chat.text  # the real model, not an echo
        chat = oai.chat.completions.create(
            model=live.model, messages=QUESTION, max_tokens=12, temperature=0
        )
        assert chat.choices[0].message.content == ref_chat.text
        assert chat.choices[0].finish_reason == ref_chat.finish_reason
        assert chat.usage is not None
        assert (chat.usage.prompt_tokens, chat.usage.completion_tokens) == (
            ref_chat.usage.prompt_tokens,
            ref_chat.usage.completion_tokens,
        )
        chunks = list(
            oai.chat.completions.create(
                model=live.model,
                messages=QUESTION,
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == (
            ref_chat.text
        )
        assert chunks[-1].choices == [] and chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == ref_chat.usage.completion_tokens

        ref = c.generate(PROMPT, max_tokens=12, temperature=0)
        assert ref.finish_reason == "length" and len(ref.token_ids) == 12
        done = oai.completions.create(model=live.model, prompt=PROMPT, max_tokens=12, temperature=0)
        assert done.choices[0].text == ref.text and done.choices[0].finish_reason == "length"
        streamed = list(
            oai.completions.create(
                model=live.model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True
            )
        )
        assert "".join(ch.choices[0].text for ch in streamed) == ref.text
        ids = list(live.tok.encode(PROMPT))  # a token-id prompt gives the same
        by_ids = oai.completions.create(
            model=live.model, prompt=[ids], max_tokens=12, temperature=0
        )
        assert (
            by_ids.choices[0].text
            == ref.text
            == c.generate(token_ids=ids, max_tokens=12, temperature=0).text
        )
        # the echo suite's error-shape checks hold on the real cluster too
        load_test_file("tests/unit/test_frontend_openai.py").test_errors_use_openai_shape(
            oai, live.model
        )
    assert_no_leak(live)


# -- hypothesis: random and malformed requests to both APIs --------------------------------------
@pytest.fixture(scope="module")
def fuzz(load_test_file: Callable[[str], ModuleType]) -> ModuleType:
    """The echo suite's strategies and its independent oracle of the documented codes."""
    return load_test_file("tests/unit/test_frontend_fuzz.py")


def short_grpc(req: gpb.GenerateRequest) -> gpb.GenerateRequest:
    sp = req.sampling
    if sp.HasField("max_tokens") and 1 <= sp.max_tokens <= 12:
        sp.max_tokens = min(sp.max_tokens, SHORT)
    return req


def test_fuzz_grpc_requests(live: Live, fuzz: ModuleType) -> None:
    seen: set[grpc.StatusCode] = set()

    @FUZZ
    @given(req=fuzz.grpc_requests().map(short_grpc))
    def check(req: gpb.GenerateRequest) -> None:
        if req.model == "MODEL":
            req.model = live.model
        if req.request_id == "UUID":
            req.request_id = uuid.uuid4().hex
        expected = fuzz.expected_grpc(live, req)
        event(f"grpc {expected.name}")
        assert grpc_call(live, req.SerializeToString()) == expected
        assert_no_leak(live)
        seen.add(expected)

    check()
    assert grpc.StatusCode.OK in seen and len(seen) > 1, seen  # both kinds really ran


def test_fuzz_grpc_raw_bytes(live: Live, fuzz: ModuleType) -> None:
    truncated = fuzz.grpc_requests().map(lambda r: short_grpc(r).SerializeToString()[:-1] + b"\xff")

    @RAW_FUZZ
    @given(data=st.one_of(st.binary(max_size=200), truncated))
    def check(data: bytes) -> None:
        try:
            expected = fuzz.expected_grpc(live, gpb.GenerateRequest.FromString(data))
        except DecodeError:
            expected = grpc.StatusCode.INVALID_ARGUMENT
        event(f"raw {expected.name}")
        assert grpc_call(live, data) == expected
        assert_no_leak(live)

    check()


def test_fuzz_http_bodies(live: Live, fuzz: ModuleType) -> None:
    seen: set[int] = set()

    @FUZZ
    @given(case=fuzz.http_bodies())
    def check(case: tuple[str, dict[str, Any], int]) -> None:
        path, body, expected = case
        if body.get("model") == "MODEL":
            body["model"] = live.model
        mt = body.get("max_tokens")
        if type(mt) is int and 1 <= mt <= 12:
            body["max_tokens"] = min(mt, SHORT)
        event(f"http {expected}")
        status, data = http_post(live, path, json.dumps(body).encode())
        assert status == expected, (body, data)
        fuzz.check_body(status, data, body.get("stream") is True)
        assert_no_leak(live)
        seen.add(status)

    check()
    assert 200 in seen and len(seen) > 1, seen  # both kinds really ran


def test_fuzz_http_raw_bytes(live: Live, fuzz: ModuleType) -> None:
    @RAW_FUZZ
    @given(data=st.one_of(st.binary(max_size=120), st.text(max_size=60).map(str.encode)))
    def check(data: bytes) -> None:
        status, body = http_post(live, "/v1/completions", data)
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = None
        event(f"http raw {status}")
        assert status in ((200, 400, 404) if isinstance(parsed, dict) else (400,)), body
        fuzz.check_body(status, body, False)
        assert_no_leak(live)

    check()


# -- cancellation and disconnects free blocks on every worker ------------------------------------
def test_cancel_mid_decode_frees_blocks_everywhere(live: Live) -> None:
    with sdk(live) as c:
        stream = c.generate(PROMPT * 8, max_tokens=LONG, ignore_eos=True, stream=True)
        rid = next(stream).request_id
        got = 0
        while got < 3:  # tokens streaming: the request decodes on the decode worker
            got += len(next(stream).token_ids)
        figures = settle(live, held)
        assert held(figures), figures
        assert c.cancel(rid) is True
        rest = list(stream)
        assert rest[-1].finish_reason == "abort"
        assert got + sum(len(ch.token_ids) for ch in rest) < LONG
        assert_no_leak(live)
        assert c.cancel(rid) is False  # gone everywhere


def test_cancel_during_prefill_frees_blocks_everywhere(live: Live) -> None:
    with sdk(live) as c:
        stream = c.generate("word " * 4000, max_tokens=LONG, ignore_eos=True, stream=True)
        rid = next(stream).request_id
        pid = next(w for w, role in live.workers.items() if role == "prefill")
        # 4000 prompt tokens: 8 chunks of 512, seconds of prefill on this CPU
        figures = settle(live, lambda f: f[pid]["requests"] > 0 and f[pid]["used"] > 0)
        assert figures[pid]["requests"] > 0, f"the prefill worker never held it: {figures}"
        assert c.cancel(rid) is True
        rest = list(stream)
        assert rest[-1].finish_reason == "abort"
        assert sum(len(ch.token_ids) for ch in rest) < LONG
    assert_no_leak(live)


def test_grpc_disconnect_frees_blocks_everywhere(live: Live) -> None:
    with sdk(live) as c:
        stream = c.generate(PROMPT * 8, max_tokens=LONG, ignore_eos=True, stream=True)
        next(stream)
        next(stream)
        assert held(settle(live, held))
        stream.close()  # the SDK cancels the call: the server sees the client go away
    assert_no_leak(live)


def test_http_disconnect_mid_stream_frees_blocks_everywhere(live: Live) -> None:
    body = {
        "model": live.model,
        "prompt": PROMPT * 8,
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
    }
    conn = https(live)
    conn.request(
        "POST",
        "/v1/completions",
        body=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {USER_KEY}"},
    )
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type") == "text/event-stream"
    assert resp.readline().startswith(b"data: {")
    assert held(settle(live, held))
    assert conn.sock is not None
    conn.sock.close()  # hang up without reading the rest
    conn.close()
    assert_no_leak(live)


# -- API keys on both APIs ------------------------------------------------------------------------
def test_keys_on_both_apis(live: Live) -> None:
    for key in (None, "wrong", ADMIN_KEY + "x"):
        with sdk(live, key, timeout=20) as c:
            calls: list[Callable[[], object]] = [
                lambda: c.generate("hi", max_tokens=2),
                c.models,
                c.cluster_status,
                lambda: c.cancel("some-id"),
                lambda: c.drain("no-such-worker"),
            ]
            for call in calls:
                with pytest.raises(UnauthenticatedError):
                    call()
    with sdk(live, USER_KEY, timeout=20) as c:
        assert c.generate("hi", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
        for call in (
            c.cluster_status,
            lambda: c.drain("no-such-worker"),
            lambda: c.notify_preemption("no-such-worker", 5.0),
        ):
            with pytest.raises(PermissionDeniedError):
                call()
    with sdk(live, ADMIN_KEY, timeout=20) as c:
        status = c.cluster_status()
        assert {w.worker_id: w.role for w in status.workers} == live.workers
        assert all(w.healthy and "gpu" in w.kv_blocks for w in status.workers)
        assert c.drain("no-such-worker") is False  # reached the controller; nothing drained
        assert c.generate("hi", max_tokens=2, ignore_eos=True).usage.completion_tokens == 2
    for key in ("wrong", ADMIN_KEY[:-1]):
        with oai_client(live, key) as bad:
            with pytest.raises(openai.AuthenticationError) as info:
                bad.completions.create(model=live.model, prompt="hi", max_tokens=2)
            assert info.value.status_code == 401 and key not in str(info.value.body)
            with pytest.raises(openai.AuthenticationError):
                bad.chat.completions.create(model=live.model, messages=QUESTION, max_tokens=2)
            with pytest.raises(openai.AuthenticationError):
                bad.models.list()
    conn = https(live, timeout=20)
    try:
        conn.request("POST", "/v1/completions", body=b'{"prompt": "hi"}')  # no key at all
        resp = conn.getresponse()
        assert resp.status == 401
        assert json.loads(resp.read())["error"]["type"] == "authentication_error"
        conn.request("GET", "/health")  # probes need no key
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["status"] == "ok"
    finally:
        conn.close()
    for key in (USER_KEY, ADMIN_KEY):
        with oai_client(live, key) as good:
            out = good.completions.create(
                model=live.model, prompt="hi", max_tokens=2, extra_body={"ignore_eos": True}
            )
            assert out.usage is not None and out.usage.completion_tokens == 2
    # TLS: plaintext to the TLS ports, or a client that does not trust the certificate, fails
    with Client(live.grpc_target, api_key=USER_KEY, timeout=5) as plain:
        with pytest.raises(UnavailableError):
            plain.models()
    with oai_client(live, trust=False) as untrusting:
        with pytest.raises(openai.APIConnectionError):
            untrusting.models.list()
    plain_http = http.client.HTTPConnection("localhost", live.http_port, timeout=20)
    try:
        plain_http.request("GET", "/health")  # plain HTTP to the TLS port
        with pytest.raises((http.client.HTTPException, ConnectionError)):
            plain_http.getresponse().read()
    finally:
        plain_http.close()
    assert_no_leak(live)
    assert_keys_never_logged()


# -- repeated rounds: nothing of a round stays behind on the served path ---------------------------
# 24 tokens a stream: the heap bound below is then 768 objects; rounds 2-4 grew the heaps by
# ~75 (controller) and ~35 (driver) objects here, and a leak of one object per token still
# breaks it (one of 24 per request too, where 48 tokens needed 48)
ROUNDS, ROUND_TOKENS = 4, 24


def gc_objects() -> int:
    """Live objects after a collection."""
    import gc

    gc.collect()
    return len(gc.get_objects())


def controller_gc_objects(cluster: Cluster) -> int:
    """``gc_objects()`` in the controller actor. The call is pickled by value: this module
    imports kvrelay_testing, which the cluster's processes do not have on their path."""
    import ray
    from ray import cloudpickle

    module = sys.modules[__name__]
    cloudpickle.register_pickle_by_value(module)
    try:
        return int(ray.get(cluster.controller.__ray_call__.remote(lambda _: gc_objects())))
    finally:
        cloudpickle.unregister_pickle_by_value(module)


def test_rounds_of_streams_leave_nothing_behind(live: Live) -> None:
    """Rounds of MAX_STREAMS concurrent gRPC streams (serve_ratio's load, small): after each,
    the workers' pools, the controller's request table and event path (pumps, outbox items,
    deliveries held back) and the driver's frontends and backend hold nothing, and from the
    second round on neither the controller's nor the driver's heap grows with the tokens
    streamed (a leak of anything per token, or per request, that slows later rounds)."""

    cluster = live.cluster
    frontends = cluster.frontends
    assert frontends is not None

    async def round_() -> list[int]:
        async with AsyncClient(live.grpc_target, api_key=USER_KEY, root_cert=live.cert) as c:

            async def one(i: int) -> int:
                got = 0
                async for ch in c.generate_stream(
                    f"Round stream {i}:", max_tokens=ROUND_TOKENS, ignore_eos=True, timeout=150
                ):
                    got += len(ch.token_ids)
                return got

            return await asyncio.gather(*(one(i) for i in range(MAX_STREAMS)))

    heaps = []
    for _ in range(ROUNDS):
        assert asyncio.run(round_()) == [ROUND_TOKENS] * MAX_STREAMS
        assert_no_leak(live)
        state = cluster.check_state()
        assert state["flights"] == state["assigned"] == 0, state
        assert state["pumps"] == state["outbox_items"] == state["early_deliveries"] == 0, state
        assert frontends.streams() == frontends.backend_streams() == 0
        heaps.append((controller_gc_objects(cluster), gc_objects()))
    tokens = (ROUNDS - 2) * MAX_STREAMS * ROUND_TOKENS  # streamed after the second round
    (ctl0, drv0), (ctl1, drv1) = heaps[1], heaps[-1]
    assert ctl1 - ctl0 < tokens and drv1 - drv0 < tokens, heaps


# -- bounded load: 200 concurrent streams, mixed gRPC + SSE ---------------------------------------
STREAMS, LOAD_TOKENS = 200, 8


async def load_grpc(client: AsyncClient, i: int) -> str:
    try:
        chunks = [
            ch
            async for ch in client.generate_stream(
                f"Stream {i}:", max_tokens=LOAD_TOKENS, ignore_eos=True, timeout=150
            )
        ]
    except ResourceExhaustedError as err:
        assert err.retry_after == RETRY_AFTER_S
        return "refused"
    last = chunks[-1]
    assert last.finish_reason == "length" and last.usage is not None
    assert last.usage.completion_tokens == LOAD_TOKENS == sum(len(ch.token_ids) for ch in chunks)
    return "ok"


async def load_sse(session: aiohttp.ClientSession, url: str, model: str, i: int) -> str:
    body = {
        "model": model,
        "prompt": f"Stream {i}:",
        "max_tokens": LOAD_TOKENS,
        "stream": True,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    async with session.post(url, json=body) as resp:
        if resp.status == 429:
            assert resp.headers["Retry-After"] == str(int(RETRY_AFTER_S))
            assert (await resp.json())["error"]["type"] == "rate_limit_error"
            return "refused"
        assert resp.status == 200, await resp.text()
        events = [line async for line in resp.content if line.strip()]
    assert events[-1] == b"data: [DONE]\n", events[-3:]
    assert json.loads(events[-2][len(b"data: ") :])["usage"]["completion_tokens"] == LOAD_TOKENS
    return "ok"


def test_200_concurrent_streams_complete_or_are_refused(live: Live) -> None:
    async def main() -> list[str]:
        url = f"https://localhost:{live.http_port}/v1/completions"
        async with (
            AsyncClient(
                live.grpc_target,
                api_key=USER_KEY,
                root_cert=live.cert,
                retry=RetryPolicy(max_attempts=1),
            ) as client,
            aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=150),
                headers={"Authorization": f"Bearer {USER_KEY}"},
                connector=aiohttp.TCPConnector(limit=0, ssl=trusting(live)),
            ) as session,
        ):
            jobs = [
                load_grpc(client, i) if i % 2 else load_sse(session, url, live.model, i)
                for i in range(STREAMS)
            ]
            return await asyncio.wait_for(asyncio.gather(*jobs), 170)  # none may hang

    outcomes = asyncio.run(main())
    ok, refused = outcomes.count("ok"), outcomes.count("refused")
    assert ok + refused == STREAMS
    assert ok >= MAX_STREAMS + MAX_QUEUE  # the admitted and the queued all finish
    assert refused > 0  # the limits were really hit
    assert_no_leak(live)
    with sdk(live) as c:  # and it still serves
        assert c.generate(PROMPT, max_tokens=3, ignore_eos=True).usage.completion_tokens == 3
    assert_no_leak(live)
