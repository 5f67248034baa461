"""The default model (SmolLM2-135M-Instruct GGUF) against transformers' own GGUF loader:
tokenizer encode/decode, chat template, and logits (the slow one, ~30 s, once in the suite)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from kvrelay.workers.model.loader import load_model
from kvrelay.workers.model.output import RequestText
from kvrelay.workers.model.source import load_tokenizer
from kvrelay.workers.types import FinishReason, SamplingParams, TokenEvent


@pytest.fixture(scope="module")
def hf_gguf_tokenizer(default_gguf_path: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_gguf_path.parent, gguf_file=default_gguf_path.name)


@pytest.fixture(scope="module")
def default_loaded(default_gguf_export: Path) -> Any:
    return load_model(None)


TEXTS = [
    "Hello world",
    "  leading spaces,\ttabs\n\nand newlines ",
    "Zürich naïve café — 日本語 😀 ∑",
    "def f(x):\n    return x**2 + 12345  # code\n",
    "<|im_start|>user\nhi<|im_end|><|endoftext|>",
    "year 2024, pi=3.14159, I'm sure they'll've",
]


@pytest.mark.parametrize("text", TEXTS)
def test_default_tokenizer_matches_transformers(
    text: str, default_loaded: Any, hf_gguf_tokenizer: Any
) -> None:
    ours = default_loaded.tokenizer
    ids = ours.encode(text)
    assert ids == hf_gguf_tokenizer.encode(text)
    for skip in (True, False):
        assert ours.decode(ids, skip) == hf_gguf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_default_tokenizer_streams_text_from_byte_pieces(
    default_gguf_export: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The served path's detokenizer decodes SmolLM2's byte pieces, no decode call a token: its
    text is the full decode's (special tokens skipped) for real text and for random ids (split
    characters, byte tokens that never complete one, special tokens)."""
    _, tok, _ = load_tokenizer(default_gguf_export)
    pieces = tok.byte_pieces
    assert pieces is not None and len(pieces) == tok.vocab_size
    gen = torch.Generator().manual_seed(0)
    streams = [tok.encode(text, add_special_tokens=False) for text in TEXTS]
    streams += [torch.randint(0, tok.vocab_size, (64,), generator=gen).tolist() for _ in range(50)]
    streams.append([i for i in range(tok.vocab_size) if b"\xff" in pieces[i] or i < 20])
    prompt = tok.encode("Zürich 日")
    decoded: list[int] = []
    monkeypatch.setattr(tok, "decode", lambda ids: decoded.append(len(ids)) or "")
    for ids in streams:
        text = RequestText(tok, SamplingParams(max_tokens=len(ids)), prompt)
        for n, t in enumerate(ids, 1):
            reason = FinishReason.LENGTH if n == len(ids) else None
            text.process(TokenEvent("r", (t,), finish_reason=reason))
        assert text.text == tok.backend.decode(ids, skip_special_tokens=True)
    assert decoded == []  # the byte path: no decode call at all


def test_default_chat_template_matches_transformers(
    default_loaded: Any, hf_gguf_tokenizer: Any
) -> None:
    chats = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "Merci ✓"},
        ],
    ]
    tok = default_loaded.tokenizer
    for chat in chats:
        for gen in (True, False):
            text = hf_gguf_tokenizer.apply_chat_template(
                chat, add_generation_prompt=gen, tokenize=False
            )
            assert tok.render_chat(chat, add_generation_prompt=gen) == text
            ids = hf_gguf_tokenizer.apply_chat_template(chat, add_generation_prompt=gen)[
                "input_ids"
            ]
            assert tok.apply_chat_template(chat, add_generation_prompt=gen) == list(ids)
    assert tok.eos_token_ids == (2,)  # <|im_end|> ends an assistant turn


@pytest.mark.slow
def test_default_gguf_logits_match_transformers(
    default_loaded: Any, default_gguf_path: Path, run_paged: Any, assert_close_rel: Any
) -> None:
    from transformers import AutoModelForCausalLM

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    ids = default_loaded.tokenizer.apply_chat_template(chat)
    ids += default_loaded.tokenizer.encode("The capital of France is Paris.")
    start = time.perf_counter()
    hf = AutoModelForCausalLM.from_pretrained(
        default_gguf_path.parent, gguf_file=default_gguf_path.name
    ).eval()
    print(f"transformers GGUF load: {time.perf_counter() - start:.1f} s")
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    ours = run_paged(default_loaded.model, [ids], 4)[0]
    assert_close_rel(ours, ref)
    assert ours[-5].argmax() == ref[-5].argmax()
