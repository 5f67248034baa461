"""The model's tokenizer: a ``tokenizers.Tokenizer`` plus what transformers layers on top of it
(BOS policy, special-token strings, the chat template rendered with jinja2 the way
``transformers`` renders it), read from a Hugging Face folder. GGUF files are first exported to
such a folder (workers/model/loader_gguf.py), so there is one code path.

Satisfies ``kvrelay.cluster.api.backend.TokenizerLike``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
import tokenizers

from kvrelay.workers.model.config import ModelConfig, ModelLoadError
from kvrelay.workers.model.tokenizer_gguf import byte_alphabet

_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, **kw: Any) -> str:
    # transformers overrides jinja's tojson, which HTML-escapes
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, **kw)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def compile_chat_template(source: str) -> jinja2.Template:
    """Same environment as transformers: sandboxed, trim/lstrip blocks, loop controls."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelLoadError(f"chat template does not compile: {exc}") from None


class Tokenizer:
    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str],  # bos_token / eos_token / ... -> its text
        add_bos_token: bool,
        eos_token_ids: Sequence[int],
        chat_template: str | None,
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens)
        self.add_bos_token = add_bos_token
        bos = special_tokens.get("bos_token")
        self.bos_token_id = backend.token_to_id(bos) if bos is not None else None
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(eos_token_ids))
        self.chat_template = chat_template
        self._template = compile_chat_template(chat_template) if chat_template else None

    @property
    def vocab_size(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # ``encode_batch`` releases the GIL while it tokenizes, ``encode`` holds it (~1.2 us a
        # token: an 8k-token prompt stalls every other thread ~10 ms, the serving frontends'
        # event loop among them, which delays every stream's tokens); the cost is the same
        (enc,) = self.backend.encode_batch([text], add_special_tokens=add_special_tokens)
        ids: list[int] = enc.ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and ids[:1] != [bos]:
            ids.insert(0, bos)  # tokenizer_config asks for BOS, the tokenizer.json does not add it
        return ids

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return str(self.backend.decode(list(token_ids), skip_special_tokens=skip_special_tokens))

    @functools.cached_property
    def byte_pieces(self) -> tuple[bytes, ...] | None:
        """``decode``'s bytes of each id (see ``byte_pieces``), built on first use (~0.2 s)."""
        return byte_pieces(self.backend, skip_special_tokens=True)

    def render_chat(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template")
        try:
            return self._template.render(
                messages=[dict(m) for m in messages],
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.TemplateError as exc:
            raise ValueError(f"chat template rejected the messages: {exc}") from None

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[int]:
        # the template writes its own BOS where the model wants one, as in transformers
        return self.encode(self.render_chat(messages, add_generation_prompt), False)

    @classmethod
    def from_dir(cls, folder: str | Path, config: ModelConfig) -> Tokenizer:
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja, generation_config.json)."""
        folder = Path(folder)
        path = folder / "tokenizer.json"
        if not path.is_file():
            raise ModelLoadError(f"{folder} has no tokenizer.json")
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exception subclasses
            raise ModelLoadError(f"cannot read {path}: {exc}") from None
        tok_config = _read_json(folder / "tokenizer_config.json")
        special = _special_tokens(tok_config, _read_json(folder / "special_tokens_map.json"))
        for name, token_id in (("bos_token", config.bos_token_id), ("eos_token", _first(config))):
            if name not in special and token_id is not None:
                text = backend.id_to_token(token_id)
                if text is not None:
                    special[name] = text
        eos_ids = list(config.eos_token_ids)
        generation = _read_json(folder / "generation_config.json").get("eos_token_id")
        if isinstance(generation, list):
            eos_ids += [int(g) for g in generation]
        elif generation is not None:
            eos_ids.append(int(generation))
        if "eos_token" in special:
            special_eos = backend.token_to_id(special["eos_token"])
            if special_eos is not None:
                eos_ids.append(special_eos)
        return cls(
            backend,
            special_tokens=special,
            add_bos_token=bool(tok_config.get("add_bos_token", False)),
            eos_token_ids=[i for i in eos_ids if isinstance(i, int)],
            chat_template=_chat_template(folder, tok_config),
        )


def byte_pieces(
    backend: tokenizers.Tokenizer, skip_special_tokens: bool
) -> tuple[bytes, ...] | None:
    """Each id's bytes, such that ``backend.decode(ids, skip_special_tokens)`` is
    ``b"".join(pieces[i] for i in ids).decode("utf-8", "replace")`` for every ids; None where
    decode is not that.

    A byte-level decoder (GPT-2's, alone) maps each token's characters back to bytes, joins them
    and decodes the lot as UTF-8 with U+FFFD for what is invalid (Rust's ``from_utf8_lossy``,
    which replaces maximal invalid subparts as Python's "replace" does); added tokens are their
    text, skipped special ones nothing. So a piece is the id's decode where that is valid text
    (checked: no U+FFFD), else its spelling's bytes (a token that ends or starts inside a
    character), checked to decode as the id's decode does.
    """
    if type(backend.decoder) is not tokenizers.decoders.ByteLevel:
        return None
    n = backend.get_vocab_size(with_added_tokens=True)
    texts = backend.decode_batch([[i] for i in range(n)], skip_special_tokens=skip_special_tokens)
    byte_of = {c: b for b, c in byte_alphabet().items()}
    pieces = []
    for i, text in enumerate(texts):
        if "\ufffd" not in text:
            pieces.append(text.encode())
            continue
        spelling = backend.id_to_token(i) or ""
        if not set(spelling) <= byte_of.keys():
            return None  # a token outside the byte alphabet that is not valid text alone
        piece = bytes(byte_of[c] for c in spelling)
        if piece.decode("utf-8", "replace") != text:
            return None
        pieces.append(piece)
    return tuple(pieces)


def _first(config: ModelConfig) -> int | None:
    return config.eos_token_ids[0] if config.eos_token_ids else None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise ModelLoadError(f"{path} must hold a JSON object")
    return data


def _special_tokens(*configs: Mapping[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for cfg in configs:
        for name in _SPECIAL_NAMES:
            value = cfg.get(name)
            if isinstance(value, Mapping):  # AddedToken serialised as {"content": ...}
                value = value.get("content")
            if isinstance(value, str) and name not in out:
                out[name] = value
    return out


def _chat_template(folder: Path, tok_config: Mapping[str, Any]) -> str | None:
    jinja_file = folder / "chat_template.jinja"  # transformers >= 4.50 writes it here
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None
