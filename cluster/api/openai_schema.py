"""OpenAI's HTTP API, the pure part: JSON bodies -> ``RawGenerate`` and responses -> the exact
shapes the ``openai`` client parses (completions, chat completions, their stream chunks).

Beyond OpenAI's fields we take vLLM's common extras: top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, priority. ``user`` becomes the tenant id. Features we do not serve
(n > 1, logprobs, echo, best_of > 1, tools, logit_bias, penalties) are refused with 400 rather
than silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvrelay.cluster.api.core import Usage
from kvrelay.cluster.api.errors import invalid
from kvrelay.cluster.api.json_body import JsonFields
from kvrelay.cluster.api.validation import RawGenerate
from kvrelay.workers.types import FinishReason

_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


def finish_name(reason: FinishReason | None) -> str | None:
    return None if reason is None else _FINISH[reason]


def _refuse_unsupported(f: JsonFields) -> None:
    n = f.integer("n")
    if n is not None and n != 1:
        raise invalid("only n = 1 is supported", "n")
    best_of = f.integer("best_of")
    if best_of is not None and best_of != 1:
        raise invalid("only best_of = 1 is supported", "best_of")
    if f.raw("logprobs") not in (None, False) or f.raw("top_logprobs") is not None:
        raise invalid("logprobs are not supported", "logprobs")
    if f.boolean("echo"):
        raise invalid("echo is not supported", "echo")
    if f.raw("tools") not in (None, []) or f.raw("functions") not in (None, []):
        raise invalid("tools are not supported", "tools")
    if f.raw("logit_bias") not in (None, {}):
        raise invalid("logit_bias is not supported", "logit_bias")
    for name in ("presence_penalty", "frequency_penalty"):
        if f.number(name) not in (None, 0.0):
            raise invalid(f"{name} is not supported (use repetition_penalty)", name)
    if f.raw("suffix") is not None:
        raise invalid("suffix is not supported", "suffix")


def stream_options(body: Mapping[str, object]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    f = JsonFields(body)
    stream = f.boolean("stream")
    opts = f.raw("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise invalid("stream_options must be an object", "stream_options")
    if not stream:
        raise invalid("stream_options is only allowed with stream = true", "stream_options")
    return stream, JsonFields(opts).boolean("include_usage")


def _common(f: JsonFields, max_tokens_field: str) -> dict[str, Any]:
    _refuse_unsupported(f)
    if not f.has("model"):
        raise invalid("model is required", "model")
    return {
        "model": f.string("model"),
        "temperature": f.number("temperature"),
        "top_p": f.number("top_p"),
        "top_k": f.integer("top_k"),
        "min_p": f.number("min_p"),
        "repetition_penalty": f.number("repetition_penalty"),
        "seed": f.integer("seed"),
        "max_tokens": f.integer(max_tokens_field),
        "stop": tuple(f.str_or_str_list("stop")),
        "stop_token_ids": tuple(f.int_list("stop_token_ids") or ()),
        "ignore_eos": f.boolean("ignore_eos"),
        "priority": f.integer("priority") or 0,
        "tenant": f.string("user"),
    }


def parse_completion(body: Mapping[str, object]) -> RawGenerate:
    f = JsonFields(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    text: str | None = None
    ids: tuple[int, ...] | None = None
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        ids = tuple(prompt)
    elif prompt is None:
        raise invalid("prompt is required", "prompt")
    elif isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise invalid("only one prompt per request is supported", "prompt")
    else:
        raise invalid("prompt must be a string or a list of token ids", "prompt")
    return RawGenerate(text=text, token_ids=ids, default_max_tokens=16, **_common(f, "max_tokens"))


def _content(i: int, content: object) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (
                isinstance(part, dict)
                and part.get("type") == "text"
                and isinstance(part.get("text"), str)
            ):
                raise invalid(f"messages[{i}].content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"messages[{i}].content must be a string or a list of parts", "messages")


def parse_chat(body: Mapping[str, object]) -> RawGenerate:
    f = JsonFields(body)
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise invalid("messages must be a list of {role, content} objects", "messages")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise invalid(f"messages[{i}] must be an object with a string role", "messages")
        parsed.append((m["role"], _content(i, m.get("content"))))
    field = "max_completion_tokens" if f.has("max_completion_tokens") else "max_tokens"
    return RawGenerate(messages=tuple(parsed), default_max_tokens=None, **_common(f, field))


def usage_json(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_tokens},
    }


def completion_json(
    rid: str, created: int, model: str, text: str, finish: FinishReason | None, usage: Usage
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_name(finish)}
        ],
        "usage": usage_json(usage),
    }


def chat_json(
    rid: str, created: int, model: str, text: str, finish: FinishReason | None, usage: Usage
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_name(finish),
            }
        ],
        "usage": usage_json(usage),
    }


def completion_chunk(
    rid: str,
    created: int,
    model: str,
    text: str,
    finish: FinishReason | None,
    include_usage: bool,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_name(finish)}
        ],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def chat_chunk(
    rid: str,
    created: int,
    model: str,
    delta: dict[str, str],
    finish: FinishReason | None,
    include_usage: bool,
) -> dict[str, Any]:
    chunk: dict[str, Any] = {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [
            {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_name(finish)}
        ],
    }
    if include_usage:
        chunk["usage"] = None
    return chunk


def usage_chunk(rid: str, created: int, model: str, obj: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": rid,
        "object": obj,
        "created": created,
        "model": model,
        "choices": [],
        "usage": usage_json(usage),
    }
