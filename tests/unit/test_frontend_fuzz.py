"""Property tests: random and malformed requests to both APIs, including raw bytes that are not
valid protobuf and bodies that are not JSON. An independent oracle (the rules as documented in
generation.proto and the OpenAI error contract) predicts each request's status; the server
never crashes or hangs (every call has a deadline), and no KV block is left in use."""

from __future__ import annotations

import json
import math
import re
import uuid
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from kvrelay.proto.kvrelay.v1 import generation_pb2 as gpb
from kvrelay_testing.frontend import EchoBackend, FrontendThread, wait_blocks_free

OK, INVALID, NOT_FOUND = (
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
)
RID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ROLES = {"system", "user", "assistant", "tool", "developer"}
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


class Server:
    def __init__(self, srv: FrontendThread) -> None:
        self.srv = srv
        self.channel = grpc.insecure_channel(f"127.0.0.1:{srv.grpc_port}")
        # a generic method: identity serializers, so we can send any bytes
        self.generate = self.channel.unary_stream("/kvrelay.v1.Generation/Generate")
        model = srv.backend.models()[0]
        self.model, self.vocab, self.ctx = model.id, model.vocab_size, model.max_context
        self.tok = srv.backend.tokenizer(model.id)

    def call(self, data: bytes) -> grpc.StatusCode:
        try:
            for _ in self.generate(data, timeout=20):
                pass
        except grpc.RpcError as err:
            assert err.code() != grpc.StatusCode.DEADLINE_EXCEEDED, "server hung"
            return err.code()
        return OK

    def no_leak(self) -> None:
        assert self.srv.call(wait_blocks_free(self.srv.backend)) == 0


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with FrontendThread(EchoBackend(step_delay_s=0.0, max_context=256)) as srv:
        s = Server(srv)
        yield s
        s.channel.close()


# -- the oracle ---------------------------------------------------------------------------------
def _bad_float(v: float | None, lo: float, hi: float, lo_open: bool) -> bool:
    if v is None:
        return False
    return not (math.isfinite(v) and (v > lo if lo_open else v >= lo) and v <= hi)


def expected_grpc(s: Server, req: gpb.GenerateRequest) -> grpc.StatusCode:
    if req.request_id and not RID.match(req.request_id):
        return INVALID
    if req.model not in ("", s.model):
        return NOT_FOUND
    sp = req.sampling
    opt = {
        f: getattr(sp, f) if sp.HasField(f) else None
        for f in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_tokens")
    }
    bad = (
        _bad_float(opt["temperature"], 0, math.inf, False)
        or _bad_float(opt["top_p"], 0, 1, True)
        or _bad_float(opt["min_p"], 0, 1, False)
        or _bad_float(opt["repetition_penalty"], 0, math.inf, True)
        or (opt["top_k"] is not None and opt["top_k"] < 0)
        or (opt["max_tokens"] is not None and opt["max_tokens"] < 1)
        or len(sp.stop) > 16
        or any(not x or len(x) > 256 for x in sp.stop)
        or len(sp.stop_token_ids) > 64
        or any(not 0 <= t < s.vocab for t in sp.stop_token_ids)
        or len(req.tenant_id) > 128
    )
    kind = req.WhichOneof("prompt")
    if kind is None or bad:
        return INVALID
    if kind == "text":
        if not req.text:
            return INVALID
        n = len(s.tok.encode(req.text))
    elif kind == "token_ids":
        ids = req.token_ids.ids
        if not ids or any(not 0 <= t < s.vocab for t in ids):
            return INVALID
        n = len(ids)
    else:
        msgs = req.chat.messages
        if not msgs or any(m.role not in ROLES for m in msgs):
            return INVALID
        n = len(s.tok.apply_chat_template([{"role": m.role, "content": m.content} for m in msgs]))
    room = s.ctx - n
    if room < 1 or (opt["max_tokens"] is not None and opt["max_tokens"] > room):
        return INVALID
    return OK


# -- gRPC ---------------------------------------------------------------------------------------
floats = st.floats(allow_nan=True, allow_infinity=True)


@st.composite
def grpc_requests(draw: st.DrawFn) -> gpb.GenerateRequest:
    clean = draw(st.booleans())  # half the examples are valid in every field

    def pick(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        return draw(good if clean else st.one_of(good, bad))

    req = gpb.GenerateRequest(
        model=pick(st.sampled_from(["", "MODEL"]), st.just("bogus")),
        priority=draw(st.integers(-(2**31), 2**31 - 1)),
        tenant_id=pick(st.sampled_from(["", "acme"]), st.just("t" * 200)),
        request_id=pick(
            st.sampled_from(["", "UUID"]), st.text(max_size=12).filter(lambda x: not RID.match(x))
        ),
    )
    kind = pick(st.sampled_from(["text", "ids", "chat"]), st.just("none"))
    if kind == "text":
        req.text = pick(st.text(min_size=1, max_size=40), st.just(""))
    elif kind == "ids":
        req.token_ids.ids.extend(
            pick(
                st.lists(st.integers(0, 255), min_size=1, max_size=30),
                st.lists(st.integers(-2, 300), max_size=30),
            )
        )
    elif kind == "chat":
        req.chat.SetInParent()
        roles = pick(st.sampled_from(["user", "system", "assistant"]), st.just("wizard"))
        for content in draw(st.lists(st.text(max_size=20), min_size=1 if clean else 0, max_size=4)):
            req.chat.messages.add(role=roles, content=content)
    sp = req.sampling
    for name, good, bad in (
        ("temperature", st.floats(0, 2), floats),
        ("top_p", st.floats(0.01, 1), floats),
        ("min_p", st.floats(0, 1), floats),
        ("repetition_penalty", st.floats(0.5, 2), floats),
        ("top_k", st.integers(0, 50), st.integers(-(2**63), 2**63 - 1)),
        ("seed", st.integers(-(2**63), 2**63 - 1), st.nothing()),
        ("max_tokens", st.integers(1, 12), st.sampled_from([-3, 0, 10**9])),
    ):
        value = pick(st.one_of(st.none(), good), bad)
        if value is not None:
            setattr(sp, name, value)
    sp.stop.extend(
        pick(
            st.lists(st.text(min_size=1, max_size=4), max_size=3),
            st.lists(st.text(max_size=4), max_size=18),
        )
    )
    sp.stop_token_ids.extend(
        pick(st.lists(st.integers(0, 255), max_size=4), st.lists(st.integers(-2, 300), max_size=66))
    )
    sp.ignore_eos = draw(st.booleans())
    if kind == "chat" and not sp.HasField("max_tokens"):
        sp.max_tokens = 8  # keep chat short: its default is the rest of the context
    return req


@SETTINGS
@given(req=grpc_requests())
def test_grpc_random_requests_get_documented_codes(
    server: Server, req: gpb.GenerateRequest
) -> None:
    if req.model == "MODEL":
        req.model = server.model
    if req.request_id == "UUID":
        req.request_id = uuid.uuid4().hex
    expected = expected_grpc(server, req)
    event(f"grpc {expected.name}")
    assert server.call(req.SerializeToString()) == expected
    server.no_leak()


@SETTINGS
@given(
    data=st.one_of(
        st.binary(max_size=200), grpc_requests().map(lambda r: r.SerializeToString()[:-1] + b"\xff")
    )
)
def test_grpc_raw_bytes(server: Server, data: bytes) -> None:
    try:
        parsed = gpb.GenerateRequest.FromString(data)
    except DecodeError:
        expected = INVALID
    else:
        expected = expected_grpc(server, parsed)
    event(f"raw {expected.name}")
    assert server.call(data) == expected
    server.no_leak()


# -- HTTP ---------------------------------------------------------------------------------------
# Each field is drawn as (value, verdict): "ok", "type" (refused while parsing the body: 400
# before the model is looked up) or "range" (400 after the model is found).
Field = tuple[st.SearchStrategy[tuple[Any, str]], st.SearchStrategy[tuple[Any, str]]]


def field(ok: st.SearchStrategy[Any], type_bad: list[Any], range_bad: list[Any]) -> Field:
    """(strategy for valid values, strategy for any value)."""
    good = ok.map(lambda v: (v, "ok"))
    options = [good]
    if type_bad:
        options.append(st.sampled_from(type_bad).map(lambda v: (v, "type")))
    if range_bad:
        options.append(st.sampled_from(range_bad).map(lambda v: (v, "range")))
    return good, st.one_of(*options)


COMMON = {
    "temperature": field(st.floats(0, 2), ["hot", True], [-1.0, math.nan]),
    "top_p": field(st.floats(0.01, 1), ["x"], [0.0, 1.5]),
    "max_tokens": field(st.integers(1, 12), [1.5, "3"], [0, -1, 10**9]),
    "stop": field(
        st.one_of(
            st.text(min_size=1, max_size=3), st.lists(st.text(min_size=1, max_size=3), max_size=3)
        ),
        [[1], 5],
        [[""], ["a"] * 20],
    ),
    "seed": field(st.integers(0, 2**62), ["s"], [2**64]),
    "n": field(st.just(1), [2, "1"], []),
    "stream": field(st.booleans(), ["yes"], []),
    "model": field(st.just("MODEL"), [5], ["bogus"]),
}
PROMPT = field(
    st.one_of(
        st.text(min_size=1, max_size=30), st.lists(st.integers(0, 255), min_size=1, max_size=10)
    ),
    [5, [1.5], ["a", "b"], None],
    ["", [], [-1]],
)
MESSAGES = field(
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system"]), "content": st.text(max_size=20)}
        ),
        min_size=1,
        max_size=3,
    ),
    ["hi", [{"content": "x"}], [{"role": "user", "content": 5}], None],
    [[], [{"role": "wizard", "content": "x"}]],
)


@st.composite
def http_bodies(draw: st.DrawFn) -> tuple[str, dict[str, Any], int]:
    chat = draw(st.booleans())
    clean = draw(st.booleans())  # half the examples are valid in every field
    strategies = dict(COMMON, **({"messages": MESSAGES} if chat else {"prompt": PROMPT}))
    parts: dict[str, tuple[Any, str] | None] = {}
    for name, (good, anything) in strategies.items():
        required = name in ("model", "messages", "prompt")
        if clean:
            parts[name] = draw(good if required else st.one_of(st.none(), good))
        else:
            parts[name] = draw(st.one_of(st.none(), anything))
    body = {k: v[0] for k, v in parts.items() if v is not None}
    verdicts = {k: v[1] for k, v in parts.items() if v is not None}
    for required in ("model", "messages" if chat else "prompt"):
        if required not in body:
            verdicts[required] = "type"  # refused while parsing
    if chat and "max_tokens" not in body:
        body["max_tokens"] = 8  # keep chat short: its default is the rest of the context
    if body.get("stream") is True and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    if "type" in verdicts.values():
        status = 400
    elif body.get("model") == "bogus":
        status = 404
    elif "range" in verdicts.values():
        status = 400
    else:
        status = 200
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, status


def post(s: Server, path: str, data: bytes) -> tuple[int, bytes]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", s.srv.http_port, timeout=20)
    try:
        conn.request("POST", path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_body(status: int, data: bytes, streamed: bool) -> None:
    if status != 200:
        err = json.loads(data)["error"]
        assert isinstance(err["message"], str) and err["message"] and "type" in err
        return
    if streamed:
        events = [e for e in data.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e[len(b"data: ") :])
    else:
        out = json.loads(data)
        assert out["choices"][0]["finish_reason"] in ("stop", "length")


@SETTINGS
@given(case=http_bodies())
def test_http_random_bodies_get_documented_status(
    server: Server, case: tuple[str, dict[str, Any], int]
) -> None:
    path, body, expected = case
    if body.get("model") == "MODEL":
        body["model"] = server.model
    event(f"http {expected}")
    status, data = post(server, path, json.dumps(body).encode())
    assert status == expected, (body, data)
    check_body(status, data, body.get("stream") is True)
    server.no_leak()


@SETTINGS
@given(data=st.one_of(st.binary(max_size=120), st.text(max_size=60).map(str.encode)))
def test_http_raw_bytes(server: Server, data: bytes) -> None:
    status, body = post(server, "/v1/completions", data)
    try:
        parsed = json.loads(data)
    except ValueError:
        parsed = None
    event(f"http raw {status}")
    if not isinstance(parsed, dict):
        assert status == 400
    else:
        assert status in (200, 400, 404)
    check_body(status, body, False)
    server.no_leak()


def test_server_still_serves_after_fuzzing(server: Server) -> None:
    req = gpb.GenerateRequest(model=server.model, text="still alive")
    req.sampling.max_tokens = 3
    assert server.call(req.SerializeToString()) == OK
    server.no_leak()
