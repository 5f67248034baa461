"""Build a ``tokenizers.Tokenizer`` (and its tokenizer_config) from a GGUF file's metadata.

GGUF carries no tokenizer.json, only llama.cpp's description: ``tokenizer.ggml.model`` (``gpt2`` =
byte-level BPE), ``.pre`` (which split regex the merges were learned with), ``.tokens``,
``.merges`` (or ``.scores``), ``.token_type`` (3 = control -> special token, 4 = user-defined ->
added token) and the special ids. Byte-level BPE (``gpt2``) and sentencepiece BPE (``llama``)
are rebuilt the way transformers' GGUF loader rebuilds them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from kvrelay.workers.model.config import ModelLoadError

_CONTROL, _USER_DEFINED = 3, 4
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}


def byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map (byte-level BPE spells tokens with it)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _pre_tokenizer(pre: str | None) -> pre_tokenizers.PreTokenizer:
    if pre == "smollm":
        # llama.cpp's smollm pre-tokenizer = SmolLM2's tokenizer.json: digits split one by one,
        # then GPT-2's regex
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    split = _SPLITS.get(pre or "")
    if split is None:  # "gpt2", "default" and unknown: GPT-2's regex
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _byte_level(meta: Mapping[str, Any], tokens: list[str]) -> tuple[Tokenizer, set[str]]:
    """GPT-2 style byte-level BPE; returns the tokenizer and the alphabet tokens are spelled in."""
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        raise ModelLoadError("GGUF metadata lacks tokenizer.ggml.merges")
    spelling = byte_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        # a token written in plain text (not the byte alphabet) is respelled byte by byte
        key = token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode())
        vocab.setdefault(key, index)
    pairs: list[tuple[str, str]] = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelLoadError(f"malformed GGUF merge {merge!r}")
        pairs.append((parts[0], parts[1]))
    backend = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=pairs,
            continuing_subword_prefix="",
            end_of_word_suffix="",
            fuse_unk=False,
        )
    )
    backend.pre_tokenizer = _pre_tokenizer(meta.get("tokenizer.ggml.pre"))
    backend.decoder = decoders.ByteLevel()
    return backend, alphabet


def _merges_from_scores(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """Merges a sentencepiece vocabulary implies: every split of a token into two tokens,
    best-scored first (transformers' ``generate_merges``, which its GGUF loader uses)."""
    vocab = {token: index for index, token in enumerate(tokens)}
    found: list[tuple[str, str, float]] = []
    for token, score in zip(tokens, scores, strict=True):
        local = [
            (token[:i], token[i:], score)
            for i in range(1, len(token))
            if token[:i] in vocab and token[i:] in vocab
        ]
        found += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def _sentencepiece(meta: Mapping[str, Any], tokens: list[str]) -> Tokenizer:
    """Llama 2 / TinyLlama style: BPE with byte fallback over "▁"-spelled text, as
    transformers' LlamaTokenizer builds it (prefix space on the first section only)."""
    merges = meta.get("tokenizer.ggml.merges")
    if merges is not None:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise ModelLoadError("GGUF sentencepiece vocabulary lacks merges and scores")
        pairs = _merges_from_scores(tokens, [float(x) for x in scores])
    vocab = {token: index for index, token in reversed(list(enumerate(tokens)))}
    backend = Tokenizer(
        models.BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True, dropout=None)
    )
    backend.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first", split=False
    )
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("\u2581", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(content=" ", left=1),
        ]
    )
    return backend


def build_gguf_tokenizer(meta: Mapping[str, Any]) -> tuple[Tokenizer, dict[str, Any]]:
    """(tokenizer, tokenizer_config.json dict) from GGUF metadata (key -> contents())."""
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise ModelLoadError("GGUF metadata lacks tokenizer.ggml.tokens")
    if kind == "gpt2":
        backend, alphabet = _byte_level(meta, tokens)
        # a control token outside the byte alphabet is a llama.cpp mislabel (transformers
        # skips it rather than growing the vocabulary)
        spelled_ok = lambda tok: set(tok) <= alphabet  # noqa: E731
        add_bos_default = False
    elif kind == "llama":
        backend = _sentencepiece(meta, tokens)
        spelled_ok = lambda tok: True  # noqa: E731
        add_bos_default = True  # llama.cpp adds BOS to a sentencepiece vocab unless told not to
    else:
        raise ModelLoadError(
            f"unsupported GGUF tokenizer model {kind!r}: byte-level BPE ('gpt2') or "
            "sentencepiece BPE ('llama')"
        )
    types = meta.get("tokenizer.ggml.token_type") or []
    backend.add_special_tokens(
        [
            AddedToken(tok, normalized=False, special=True)
            for tok, kind_ in zip(tokens, types, strict=False)
            if kind_ == _CONTROL and spelled_ok(tok)
        ]
    )
    vocab = backend.get_vocab()
    backend.add_tokens(
        [
            AddedToken(tok, normalized=False, special=False)
            for tok, kind_ in zip(tokens, types, strict=False)
            if kind_ == _USER_DEFINED and tok in vocab
        ]
    )

    add_bos = meta.get("tokenizer.ggml.add_bos_token", add_bos_default)
    config: dict[str, Any] = {"add_bos_token": bool(add_bos)}
    for name, key in (
        ("bos_token", "bos_token_id"),
        ("eos_token", "eos_token_id"),
        ("unk_token", "unknown_token_id"),
        ("pad_token", "padding_token_id"),
    ):
        token_id = meta.get(f"tokenizer.ggml.{key}")
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            config[name] = tokens[token_id]
    template = meta.get("tokenizer.chat_template")
    if isinstance(template, str):
        config["chat_template"] = template
    return backend, config
