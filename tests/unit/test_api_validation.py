"""Edge validation (cluster/api/validation.py) and the OpenAI body parser (api/openai_schema.py)."""

from __future__ import annotations

import asyncio
import math

import pytest

from kvrelay.cluster.api.errors import ApiError, ErrorCode
from kvrelay.cluster.api.openai_schema import (
    ChatBody,
    CompletionBody,
    parse_chat,
    parse_completion,
    stream_options,
)
from kvrelay.cluster.api.validation import RawGenerate, ValidationLimits, build_request
from kvrelay_testing.frontend import EchoBackend

LIMITS = ValidationLimits(max_stop_strings=2, max_prompt_chars=10_000)


def build(raw: RawGenerate, max_context: int = 64):
    backend = EchoBackend(max_context=max_context)
    return asyncio.run(build_request(raw, backend, LIMITS, "r1"))


def error(raw: RawGenerate, max_context: int = 64) -> ApiError:
    with pytest.raises(ApiError) as info:
        build(raw, max_context)
    return info.value


def test_valid_request_gets_defaults_and_tokens() -> None:
    req = build(RawGenerate(model="echo", text="hello"))
    assert req.request_id == "r1" and req.model == "echo"
    assert req.prompt_token_ids == tuple(b"hello")
    sp = req.sampling
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.top_k, sp.min_p) == (16, 1.0, 1.0, 0, 0.0)
    assert sp.repetition_penalty == 1.0 and sp.seed is None


def test_chat_defaults_to_rest_of_context() -> None:
    req = build(RawGenerate(messages=(("user", "hi"),), default_max_tokens=None))
    assert req.sampling.max_tokens == 64 - len(req.prompt_token_ids)
    assert bytes(req.prompt_token_ids).startswith(b"<|user|>hi")


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (RawGenerate(text="x", temperature=-0.1), "temperature"),
        (RawGenerate(text="x", temperature=math.nan), "temperature"),
        (RawGenerate(text="x", temperature=math.inf), "temperature"),
        (RawGenerate(text="x", top_p=0.0), "top_p"),
        (RawGenerate(text="x", top_p=1.5), "top_p"),
        (RawGenerate(text="x", top_k=-1), "top_k"),
        (RawGenerate(text="x", min_p=1.01), "min_p"),
        (RawGenerate(text="x", repetition_penalty=0.0), "repetition_penalty"),
        (RawGenerate(text="x", max_tokens=0), "max_tokens"),
        (RawGenerate(text="x", seed=2**63), "seed"),
        (RawGenerate(text="x", priority=2**31), "priority"),
        (RawGenerate(text=""), "prompt is empty"),
        (RawGenerate(token_ids=()), "token ids are empty"),
        (RawGenerate(token_ids=(1, 999)), "prompt[1] = 999"),
        (RawGenerate(token_ids=(-1,)), "prompt[0] = -1"),
        (RawGenerate(messages=()), "messages are empty"),
        (RawGenerate(messages=(("wizard", "x"),)), "role"),
        (RawGenerate(), "exactly one"),
        (RawGenerate(text="x", token_ids=(1,)), "exactly one"),
        (RawGenerate(text="x", stop=("a", "b", "c")), "too many stop strings: 3 > 2"),
        (RawGenerate(text="x", stop=("",)), "stop string"),
        (RawGenerate(text="x", stop_token_ids=(260,)), "stop_token_ids[0]"),
        (RawGenerate(text="x" * 10_001), "10001 characters"),
        (RawGenerate(text="x", tenant="t" * 200), "tenant"),
    ],
)
def test_bad_fields_are_invalid_argument(raw: RawGenerate, needle: str) -> None:
    err = error(raw)
    assert err.code is ErrorCode.INVALID_ARGUMENT
    assert needle in err.message, err.message


def test_context_overflow_says_the_numbers() -> None:
    err = error(RawGenerate(text="x" * 10, max_tokens=60), max_context=64)
    assert err.code is ErrorCode.INVALID_ARGUMENT and err.param == "max_tokens"
    assert "10 tokens" in err.message and "60" in err.message and "64" in err.message
    err = error(RawGenerate(text="x" * 64), max_context=64)
    assert "64 tokens" in err.message and err.param == "prompt"
    # exactly full is fine, and a default max_tokens is clipped to the room left
    assert build(RawGenerate(text="x" * 10, max_tokens=54)).sampling.max_tokens == 54
    assert build(RawGenerate(text="x" * 60)).sampling.max_tokens == 4


def test_unknown_model_is_not_found_and_lists_models() -> None:
    err = error(RawGenerate(model="gpt-9", text="x"))
    assert err.code is ErrorCode.NOT_FOUND and "gpt-9" in err.message and "echo" in err.message


def test_top_k_clamped_to_vocab() -> None:
    assert build(RawGenerate(text="x", top_k=10**9)).sampling.top_k == 260


def test_request_id_format_checked() -> None:
    from kvrelay.cluster.api.validation import check_request_id

    assert check_request_id("abc-1.2:3_x") == "abc-1.2:3_x"
    for bad in ("", "a b", "x" * 129, "é"):
        with pytest.raises(ApiError):
            check_request_id(bad)


# -- OpenAI bodies ------------------------------------------------------------------------------
def test_completion_body_parses_openai_and_vllm_fields() -> None:
    raw = parse_completion(
        {
            "model": "echo",
            "prompt": ["hi"],
            "max_tokens": 5,
            "temperature": 0,
            "stop": "x",
            "seed": 7,
            "top_k": 3,
            "user": "alice",
            "n": 1,
            "logprobs": None,
            "echo": False,
        }
    )
    assert (raw.text, raw.max_tokens, raw.temperature, raw.stop, raw.seed) == (
        "hi",
        5,
        0.0,
        ("x",),
        7,
    )
    assert raw.top_k == 3 and raw.tenant == "alice" and raw.default_max_tokens == 16
    assert parse_completion({"model": "m", "prompt": [1, 2]}).token_ids == (1, 2)
    assert parse_completion({"model": "m", "prompt": [[1, 2]]}).token_ids == (1, 2)


def test_chat_body_parses_text_parts_and_max_completion_tokens() -> None:
    raw = parse_chat(
        {
            "model": "m",
            "max_completion_tokens": 9,
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                }
            ],
        }
    )
    assert raw.messages == (("user", "ab"),) and raw.max_tokens == 9
    assert raw.default_max_tokens is None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"prompt": "x"}, "model is required"),
        ({"model": "m"}, "prompt is required"),
        ({"model": "m", "prompt": ["a", "b"]}, "one prompt"),
        ({"model": "m", "prompt": 5}, "prompt must be"),
        ({"model": "m", "prompt": "x", "temperature": "hot"}, "temperature must be a number"),
        ({"model": "m", "prompt": "x", "temperature": True}, "temperature must be a number"),
        ({"model": "m", "prompt": "x", "max_tokens": 1.5}, "max_tokens must be an integer"),
        ({"model": "m", "prompt": "x", "n": 2}, "n = 1"),
        ({"model": "m", "prompt": "x", "logprobs": 2}, "logprobs"),
        ({"model": "m", "prompt": "x", "stop": [1]}, "stop must be"),
        ({"model": "m", "prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),
        ({"model": 3, "prompt": "x"}, "model must be a string"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream must be a boolean"),
    ],
)
def test_bad_completion_bodies(body: dict[str, object], needle: str) -> None:
    with pytest.raises(ApiError) as info:
        parse_completion(body)
        stream_options(body)
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and needle in info.value.message


@pytest.mark.parametrize(
    "messages",
    [
        None,
        "hi",
        [1],
        [{"content": "x"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "image_url"}]}],
    ],
)
def test_bad_chat_messages(messages: object) -> None:
    with pytest.raises(ApiError) as info:
        parse_chat({"model": "m", "messages": messages})
    assert info.value.code is ErrorCode.INVALID_ARGUMENT and info.value.param == "messages"


def test_stream_options() -> None:
    assert stream_options({"stream": True, "stream_options": {"include_usage": True}}) == (
        True,
        True,
    )
    assert stream_options({}) == (False, False)
    with pytest.raises(ApiError):
        stream_options({"stream_options": {"include_usage": True}})


def _refusal(parse: object, body: dict[str, object]) -> tuple[str, str | None]:
    with pytest.raises(ApiError) as info:
        parse(body)  # type: ignore[operator]
    assert info.value.code is ErrorCode.INVALID_ARGUMENT
    return info.value.message, info.value.param


def test_first_wrong_field_in_check_order_is_reported() -> None:
    # pydantic collects every failure; the client sees the one the fields are checked first for:
    # the prompt / messages, then refused features, then model, then the sampling fields, stream
    body: dict[str, object] = {"model": 3, "prompt": "x", "temperature": "hot", "n": 2}
    assert _refusal(CompletionBody.parse, body) == ("only n = 1 is supported", "n")
    del body["n"]
    assert _refusal(CompletionBody.parse, body) == ("model must be a string; got int", "model")
    body.update(model="m", stream="yes", prompt=None)
    assert _refusal(CompletionBody.parse, body) == ("prompt is required", "prompt")
    body.update(prompt="x")
    assert _refusal(CompletionBody.parse, body)[1] == "temperature"
    chat = {"model": "m", "messages": [{"role": "user", "content": 5}, {"role": 1}], "seed": "s"}
    assert _refusal(ChatBody.parse, chat) == (
        "messages[0].content must be a string or a list of parts",
        "messages",
    )
    assert _refusal(ChatBody.parse, {"messages": []}) == ("model is required", "model")


def test_body_models_edge_cases() -> None:
    msgs = [{"role": "user", "content": "hi"}]
    # max_completion_tokens replaces max_tokens, which is then not read (even a bad one)
    body = {"model": "m", "messages": msgs, "max_completion_tokens": 4.0, "max_tokens": "x"}
    chat = ChatBody.parse(body)
    assert chat.raw().max_tokens == 4
    assert (
        _refusal(ChatBody.parse, {"model": "m", "messages": msgs, "max_completion_tokens": "x"})[1]
        == "max_completion_tokens"
    )
    # stream fields are validated with the rest, last; unknown fields are ignored
    body = {
        "model": "m",
        "messages": msgs,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    chat = ChatBody.parse(
        {**body, "unknown": {"a": 1}, "logprobs": 0, "tools": [], "logit_bias": {}}
    )
    assert chat.stream_mode() == (True, True)
    assert _refusal(
        ChatBody.parse,
        {"model": "m", "messages": msgs, "stream": True, "stream_options": {"include_usage": 1}},
    ) == ("include_usage must be a boolean; got int", "include_usage")
    # an empty stop string is kept (build_request judges it); stop_token_ids take no floats
    assert parse_completion({"model": "m", "prompt": "x", "stop": ""}).stop == ("",)
    assert _refusal(parse_completion, {"model": "m", "prompt": "x", "stop_token_ids": [1.0]}) == (
        "stop_token_ids must be a list of integers",
        "stop_token_ids",
    )
    # integral floats are integers below 2**53 only; bool is never a number
    assert parse_completion({"model": "m", "prompt": "x", "seed": 7.0}).seed == 7
    assert _refusal(parse_completion, {"model": "m", "prompt": "x", "seed": 2.0**60})[1] == "seed"
    assert _refusal(parse_completion, {"model": "m", "prompt": "x", "top_p": False})[1] == "top_p"


def test_number_too_large_for_a_float_is_a_400() -> None:
    # json.loads gives an int of any size; the old parser's float() overflowed into a 500
    message, param = _refusal(parse_completion, {"model": "m", "prompt": "x", "top_p": 10**400})
    assert param == "top_p" and "must be a number" in message
