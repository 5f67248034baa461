"""OpenAI's HTTP API, the pure part: JSON bodies (pydantic models) -> ``RawGenerate`` and responses -> the exact
shapes the ``openai`` client parses (completions, chat completions, their stream chunks).

Beyond OpenAI's fields we take vLLM's common extras: top_k, min_p, repetition_penalty,
stop_token_ids, ignore_eos, priority. ``user`` becomes the tenant id. Features we do not serve
(n > 1, logprobs, echo, best_of > 1, tools, logit_bias, penalties) are refused with 400 rather
than silently ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Strict,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from kvrelay.cluster.api.core import Usage
from kvrelay.cluster.api.errors import ApiError, invalid
from kvrelay.cluster.api.validation import RawGenerate
from kvrelay.workers.types import FinishReason

_FINISH = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


def finish_name(reason: FinishReason | None) -> str | None:
    return None if reason is None else _FINISH[reason]


# -- request bodies: pydantic models, validated once at the edge ------------------------------
# JSON null means "not given" for every field; unknown fields are ignored (as OpenAI's SDK sends
# some we do not read). Types are strict: bool is never a number, "1" never an integer.


def _refuse(message: str, param: str) -> PydanticCustomError:
    """A refusal raised inside a validator; ``_api_error`` turns it back into an ApiError."""
    return PydanticCustomError("kvrelay", "{message}", {"message": message, "param": param})


def _integral_float(v: object) -> object:
    # JSON writers may send 5.0 for 5; beyond 2**53 a float is not an exact integer
    if isinstance(v, float) and v.is_integer() and abs(v) < 2**53:
        return int(v)
    return v


_Int = Annotated[int, BeforeValidator(_integral_float), Strict()]
_Float = Annotated[float, Strict()]
_Bool = Annotated[bool, Strict()]
_Str = Annotated[str, Strict()]

# A wrong type is reported as "<field> must be <kind>"; the kind of each typed field:
_KIND = {
    "n": "an integer", "best_of": "an integer", "top_k": "an integer", "seed": "an integer",
    "max_tokens": "an integer", "max_completion_tokens": "an integer", "priority": "an integer",
    "temperature": "a number", "top_p": "a number", "min_p": "a number",
    "repetition_penalty": "a number", "presence_penalty": "a number",
    "frequency_penalty": "a number",
    "echo": "a boolean", "ignore_eos": "a boolean", "stream": "a boolean",
    "model": "a string", "user": "a string",
}  # fmt: skip
_LIST_KIND = {
    "stop": "a string or a list of strings",
    "stop_token_ids": "a list of integers",
    "stream_options": "an object",
}
# Which field's error a client sees when several are wrong (the order the fields are checked in)
_ORDER = (
    "prompt", "messages", "n", "best_of", "logprobs", "top_logprobs", "echo", "tools",
    "functions", "logit_bias", "presence_penalty", "frequency_penalty", "suffix", "model",
    "temperature", "top_p", "top_k", "min_p", "repetition_penalty", "seed", "max_tokens",
    "max_completion_tokens", "stop", "stop_token_ids", "ignore_eos", "priority", "user",
    "stream", "stream_options",
)  # fmt: skip


def _api_error(exc: ValidationError) -> ApiError:
    """The first failure, in ``_ORDER``, as the OpenAI-shaped INVALID_ARGUMENT."""
    errors = sorted(exc.errors(), key=lambda e: _ORDER.index(str(e["loc"][0])))
    err = errors[0]
    loc, field = err["loc"], str(err["loc"][0])
    if err["type"] == "kvrelay":
        ctx = err.get("ctx") or {}
        message, param = str(ctx["message"]), str(ctx["param"])
        if field == "messages" and len(loc) > 1:
            message = f"messages[{loc[1]}]{message}"
        return invalid(message, param)
    if field == "messages":
        if len(loc) == 1:
            return invalid("messages must be a list of {role, content} objects", "messages")
        return invalid(f"messages[{loc[1]}] must be an object with a string role", "messages")
    if field in _KIND:
        got = type(err["input"]).__name__
        return invalid(f"{field} must be {_KIND[field]}; got {got}", field)
    return invalid(f"{field} must be {_LIST_KIND[field]}", field)


class _StreamBody(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    stream: _Bool | None = None
    stream_options: dict[str, Any] | None = None

    @field_validator("stream_options", mode="before")
    @classmethod
    def _object(cls, v: object) -> object:
        if v is not None and not isinstance(v, dict):
            raise _refuse("stream_options must be an object", "stream_options")
        return v

    @field_validator("stream_options")
    @classmethod
    def _with_stream(cls, v: dict[str, Any] | None, info: ValidationInfo) -> dict[str, Any] | None:
        if v is None:
            return v
        if not info.data.get("stream"):
            raise _refuse("stream_options is only allowed with stream = true", "stream_options")
        usage = v.get("include_usage")
        if usage is not None and not isinstance(usage, bool):
            got = type(usage).__name__
            raise _refuse(f"include_usage must be a boolean; got {got}", "include_usage")
        return v

    def stream_mode(self) -> tuple[bool, bool]:
        """(stream, include_usage)."""
        opts = self.stream_options or {}
        return bool(self.stream), bool(opts.get("include_usage"))


def _not(neutral: tuple[object, ...], message: str, param: str) -> BeforeValidator:
    """A field we do not serve: only its neutral values pass (compared with ==, so 0 is False)."""

    def check(v: object) -> object:
        if v not in neutral:
            raise _refuse(message, param)
        return v

    return BeforeValidator(check)


def _not_one(name: str) -> AfterValidator:
    """n and best_of: only 1 is served."""

    def check(v: int | None) -> int | None:
        if v is not None and v != 1:
            raise _refuse(f"only {name} = 1 is supported", name)
        return v

    return AfterValidator(check)


class _OpenAIBody(_StreamBody):
    """The fields completions and chat completions share (OpenAI's plus vLLM's extras)."""

    # refused rather than silently ignored
    n: Annotated[_Int | None, _not_one("n")] = None
    best_of: Annotated[_Int | None, _not_one("best_of")] = None
    logprobs: Annotated[Any, _not((None, False), "logprobs are not supported", "logprobs")] = None
    top_logprobs: Annotated[Any, _not((None,), "logprobs are not supported", "logprobs")] = None
    echo: _Bool | None = None
    tools: Annotated[Any, _not((None, []), "tools are not supported", "tools")] = None
    functions: Annotated[Any, _not((None, []), "tools are not supported", "tools")] = None
    logit_bias: Annotated[Any, _not((None, {}), "logit_bias is not supported", "logit_bias")] = None
    presence_penalty: _Float | None = None
    frequency_penalty: _Float | None = None
    suffix: Annotated[Any, _not((None,), "suffix is not supported", "suffix")] = None
    # served
    model: _Str | None = None
    temperature: _Float | None = None
    top_p: _Float | None = None
    top_k: _Int | None = None
    min_p: _Float | None = None
    repetition_penalty: _Float | None = None
    seed: _Int | None = None
    max_tokens: _Int | None = None
    stop: _Str | list[_Str] | None = None
    stop_token_ids: list[Annotated[int, Strict()]] | None = None
    ignore_eos: _Bool | None = None
    priority: _Int | None = None
    user: _Str | None = None

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v: bool | None) -> bool | None:
        if v:
            raise _refuse("echo is not supported", "echo")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v: float | None, info: ValidationInfo) -> float | None:
        if v not in (None, 0.0):
            name = str(info.field_name)
            raise _refuse(f"{name} is not supported (use repetition_penalty)", name)
        return v

    @model_validator(mode="before")
    @classmethod
    def _absent_is_null(cls, data: object) -> object:
        # validators run on given fields only: an absent required field is given as null
        if isinstance(data, dict):
            return {"model": None, **cls._required_null(), **data}
        return data

    @classmethod
    def _required_null(cls) -> dict[str, None]:
        return {}

    @field_validator("model", mode="before")
    @classmethod
    def _model_required(cls, v: object) -> object:
        if v is None:
            raise _refuse("model is required", "model")
        return v

    def _common(self, max_tokens: int | None) -> dict[str, Any]:
        stop = () if self.stop is None else self.stop
        return {
            "model": self.model or "",
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
            "max_tokens": max_tokens,
            "stop": (stop,) if isinstance(stop, str) else tuple(stop),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": bool(self.ignore_eos),
            "priority": self.priority or 0,
            "tenant": self.user or "",
        }

    @classmethod
    def parse(cls, body: Mapping[str, object]) -> Self:
        """The validated body; the first wrong field (in ``_ORDER``) raises ApiError."""
        try:
            return cls.model_validate(dict(body))
        except ValidationError as exc:
            raise _api_error(exc) from None

    def raw(self) -> RawGenerate:
        """The request for validation.build_request (range checks against the model)."""
        raise NotImplementedError


def _prompt(prompt: object) -> str | tuple[int, ...]:
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        return tuple(prompt)
    if prompt is None:
        raise _refuse("prompt is required", "prompt")
    if isinstance(prompt, list) and all(isinstance(p, (str, list)) for p in prompt):
        raise _refuse("only one prompt per request is supported", "prompt")
    raise _refuse("prompt must be a string or a list of token ids", "prompt")


class CompletionBody(_OpenAIBody):
    """POST /v1/completions."""

    prompt: Annotated[str | tuple[int, ...], BeforeValidator(_prompt)] = ""

    @classmethod
    def _required_null(cls) -> dict[str, None]:
        return {"prompt": None}

    def raw(self) -> RawGenerate:
        text, ids = (self.prompt, None) if isinstance(self.prompt, str) else (None, self.prompt)
        return RawGenerate(
            text=text, token_ids=ids, default_max_tokens=16, **self._common(self.max_tokens)
        )


def _content(content: object) -> str:
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
                raise _refuse(".content: only text parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)
    raise _refuse(".content must be a string or a list of parts", "messages")


class _Message(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    role: _Str
    content: Annotated[str, BeforeValidator(_content)] = ""


class ChatBody(_OpenAIBody):
    """POST /v1/chat/completions."""

    messages: list[_Message]
    max_completion_tokens: _Int | None = None

    @model_validator(mode="before")
    @classmethod
    def _newer_max_field(cls, data: object) -> object:
        # max_completion_tokens, when given, replaces max_tokens (which is then not read)
        if isinstance(data, dict) and data.get("max_completion_tokens") is not None:
            return {k: v for k, v in data.items() if k != "max_tokens"}
        return data

    def raw(self) -> RawGenerate:
        limit = self.max_completion_tokens
        return RawGenerate(
            messages=tuple((m.role, m.content) for m in self.messages),
            default_max_tokens=None,
            **self._common(self.max_tokens if limit is None else limit),
        )


def stream_options(body: Mapping[str, object]) -> tuple[bool, bool]:
    """(stream, include_usage)."""
    try:
        return _StreamBody.model_validate(dict(body)).stream_mode()
    except ValidationError as exc:
        raise _api_error(exc) from None


def parse_completion(body: Mapping[str, object]) -> RawGenerate:
    return CompletionBody.parse(body).raw()


def parse_chat(body: Mapping[str, object]) -> RawGenerate:
    return ChatBody.parse(body).raw()


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
