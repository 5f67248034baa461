"""Request validation, once, at the edge: shared by the gRPC and the OpenAI HTTP frontends.

Each frontend parses its wire format into a ``RawGenerate`` (HTTP checks JSON types first, with
openai_schema's pydantic body models); ``build_request`` checks every field, tokenizes, checks the
prompt against the model's context and returns the trusted ``GenerateRequest`` the backend gets. Everything it
refuses raises ``ApiError`` (INVALID_ARGUMENT, or NOT_FOUND for an unknown model) whose message
names the field and the numbers.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from kvrelay.cluster.api.backend import ClusterBackend, GenerateRequest, ModelInfo
from kvrelay.cluster.api.errors import ApiError, ErrorCode, invalid
from kvrelay.workers.types import SamplingParams

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Prompts longer than this (~500 tokens, ~0.6 ms) are tokenized in a worker thread, which the
# tokenizer lets run beside the event loop (Tokenizer.encode releases the GIL).
_INLINE_TOKENIZE_CHARS = 2048


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    max_stop_strings: int = 16
    max_stop_chars: int = 256
    max_stop_token_ids: int = 64
    max_prompt_chars: int = 1_000_000
    max_messages: int = 1024
    max_tenant_chars: int = 128


@dataclass(frozen=True, slots=True)
class RawGenerate:
    """A request as parsed from the wire, before any range check. Exactly one of ``text``,
    ``token_ids``, ``messages`` must be set; None means "not given" (defaults apply)."""

    model: str = ""
    text: str | None = None
    token_ids: Sequence[int] | None = None
    messages: Sequence[tuple[str, str]] | None = None  # (role, content)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    max_tokens: int | None = None
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    priority: int = 0
    tenant: str = ""
    request_id: str = ""  # empty: the caller assigns one
    default_max_tokens: int | None = 16  # when max_tokens is None; None = rest of the context


def resolve_model(models: Sequence[ModelInfo], name: str) -> ModelInfo:
    if not models:
        raise ApiError(ErrorCode.UNAVAILABLE, "no model is being served")
    if not name:
        return models[0]
    for info in models:
        if info.id == name:
            return info
    available = ", ".join(m.id for m in models)
    raise ApiError(
        ErrorCode.NOT_FOUND,
        f"model {name!r} does not exist; available: {available}",
        param="model",
    )


def check_request_id(request_id: str) -> str:
    if not _REQUEST_ID.match(request_id):
        raise invalid(
            "request_id must be 1-128 characters from [A-Za-z0-9._:-]", param="request_id"
        )
    return request_id


def _finite(name: str, value: float | None, lo: float, hi: float, *, lo_open: bool) -> None:
    if value is None:
        return
    ok = math.isfinite(value) and (value > lo if lo_open else value >= lo) and value <= hi
    if not ok:
        bracket = "(" if lo_open else "["
        hi_text = "inf)" if math.isinf(hi) else f"{hi:g}]"
        raise invalid(f"{name} must be finite and in {bracket}{lo:g}, {hi_text}; got {value}", name)


def _int_range(name: str, value: int | None, lo: int, hi: int) -> None:
    if value is not None and not lo <= value <= hi:
        raise invalid(f"{name} must be in [{lo}, {hi}]; got {value}", name)


def _token_ids(name: str, ids: Sequence[int], vocab_size: int) -> tuple[int, ...]:
    for i, tok in enumerate(ids):
        if not 0 <= tok < vocab_size:
            raise invalid(f"{name}[{i}] = {tok} is outside the vocabulary [0, {vocab_size})", name)
    return tuple(ids)


def check_sampling_fields(raw: RawGenerate, model: ModelInfo, limits: ValidationLimits) -> None:
    """Range checks that need no tokenizer. Raises ApiError(INVALID_ARGUMENT)."""
    _finite("temperature", raw.temperature, 0.0, math.inf, lo_open=False)
    _finite("top_p", raw.top_p, 0.0, 1.0, lo_open=True)
    _finite("min_p", raw.min_p, 0.0, 1.0, lo_open=False)
    _finite("repetition_penalty", raw.repetition_penalty, 0.0, math.inf, lo_open=True)
    _int_range("top_k", raw.top_k, 0, INT64_MAX)
    _int_range("seed", raw.seed, INT64_MIN, INT64_MAX)
    _int_range("max_tokens", raw.max_tokens, 1, INT64_MAX)
    _int_range("priority", raw.priority, INT32_MIN, INT32_MAX)
    if len(raw.tenant) > limits.max_tenant_chars:
        raise invalid(f"tenant id longer than {limits.max_tenant_chars} characters", "tenant")
    if len(raw.stop) > limits.max_stop_strings:
        raise invalid(f"too many stop strings: {len(raw.stop)} > {limits.max_stop_strings}", "stop")
    for s in raw.stop:
        if not s or len(s) > limits.max_stop_chars:
            raise invalid(f"each stop string must be 1-{limits.max_stop_chars} characters", "stop")
    if len(raw.stop_token_ids) > limits.max_stop_token_ids:
        raise invalid(
            f"too many stop_token_ids: {len(raw.stop_token_ids)} > {limits.max_stop_token_ids}",
            "stop_token_ids",
        )
    _token_ids("stop_token_ids", raw.stop_token_ids, model.vocab_size)


def _unicode(name: str, text: str) -> None:
    """JSON may carry lone surrogates ("\\ud800"): valid JSON, not text any tokenizer can take."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise invalid(
            f"{name} is not valid Unicode text: lone surrogate at character {exc.start}", name
        ) from None


def check_text_fields(raw: RawGenerate) -> None:
    if raw.text is not None:
        _unicode("prompt", raw.text)
    for _, content in raw.messages or ():
        _unicode("messages", content)
    for stop in raw.stop:
        _unicode("stop", stop)
    _unicode("tenant", raw.tenant)


def check_prompt_shape(raw: RawGenerate, limits: ValidationLimits) -> None:
    given = [x is not None for x in (raw.text, raw.token_ids, raw.messages)]
    if sum(given) != 1:
        raise invalid("give exactly one of: prompt text, prompt token ids, chat messages", "prompt")
    if raw.text is not None:
        if not raw.text:
            raise invalid("prompt is empty", "prompt")
        if len(raw.text) > limits.max_prompt_chars:
            raise invalid(
                f"prompt is {len(raw.text)} characters; the limit is {limits.max_prompt_chars}",
                "prompt",
            )
    if raw.token_ids is not None and not raw.token_ids:
        raise invalid("prompt token ids are empty", "prompt")
    if raw.messages is not None:
        if not raw.messages:
            raise invalid("messages are empty", "messages")
        if len(raw.messages) > limits.max_messages:
            raise invalid(f"more than {limits.max_messages} messages", "messages")
        total = 0
        for i, (role, content) in enumerate(raw.messages):
            if role not in CHAT_ROLES:
                raise invalid(
                    f"messages[{i}].role {role!r} is not one of {sorted(CHAT_ROLES)}", "messages"
                )
            total += len(content)
        if total > limits.max_prompt_chars:
            raise invalid(
                f"messages hold {total} characters; the limit is {limits.max_prompt_chars}",
                "messages",
            )


async def build_request(
    raw: RawGenerate,
    backend: ClusterBackend,
    limits: ValidationLimits,
    request_id: str,
) -> GenerateRequest:
    """Validate ``raw`` completely and tokenize it; raises ApiError on the first problem."""
    model = resolve_model(backend.models(), raw.model)
    check_prompt_shape(raw, limits)
    check_text_fields(raw)
    check_sampling_fields(raw, model, limits)
    prompt = await _tokenize(raw, backend, model)
    room = model.max_context - len(prompt)
    if room < 1:
        raise invalid(
            f"prompt is {len(prompt)} tokens; model {model.id!r} holds at most "
            f"{model.max_context} tokens (prompt + output)",
            "prompt",
        )
    max_tokens = raw.max_tokens
    if max_tokens is None:
        max_tokens = room if raw.default_max_tokens is None else min(raw.default_max_tokens, room)
    elif max_tokens > room:
        raise invalid(
            f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) = "
            f"{len(prompt) + max_tokens} exceeds model {model.id!r}'s context of "
            f"{model.max_context} tokens",
            "max_tokens",
        )
    sampling = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if raw.temperature is None else float(raw.temperature),
        top_k=0 if raw.top_k is None else min(raw.top_k, model.vocab_size),
        top_p=1.0 if raw.top_p is None else float(raw.top_p),
        min_p=0.0 if raw.min_p is None else float(raw.min_p),
        repetition_penalty=1.0 if raw.repetition_penalty is None else raw.repetition_penalty,
        seed=raw.seed,
        stop=tuple(raw.stop),
        stop_token_ids=tuple(raw.stop_token_ids),
        ignore_eos=raw.ignore_eos,
    )
    return GenerateRequest(
        request_id=request_id,
        model=model.id,
        prompt_token_ids=prompt,
        sampling=sampling,
        priority=raw.priority,
        tenant=raw.tenant,
    )


async def _tokenize(raw: RawGenerate, backend: ClusterBackend, model: ModelInfo) -> tuple[int, ...]:
    if raw.token_ids is not None:
        return _token_ids("prompt", raw.token_ids, model.vocab_size)
    tokenizer = backend.tokenizer(model.id)
    if raw.text is not None:
        if len(raw.text) > _INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(_ids, tokenizer.encode, raw.text)
        return _ids(tokenizer.encode, raw.text)
    assert raw.messages is not None  # check_prompt_shape ran
    messages = [{"role": r, "content": c} for r, c in raw.messages]
    try:
        return await asyncio.to_thread(_ids, tokenizer.apply_chat_template, messages)
    except (ValueError, TypeError, KeyError) as exc:  # template rejects the conversation
        raise invalid(f"chat template rejected the messages: {exc}", "messages") from exc


def _ids(encode: Callable[..., Sequence[int]], *args: Any) -> tuple[int, ...]:
    """``encode(*args)``'s ids as a tuple of ints (in the thread that tokenized, for a long
    prompt: 8k ids take ~0.4 ms to convert); none is INVALID_ARGUMENT."""
    ids = tuple(int(t) for t in encode(*args))
    if not ids:
        raise invalid("prompt tokenizes to no tokens", "prompt")
    return ids
