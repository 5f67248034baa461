"""Incremental detokenizer against full decodes of a real byte-level BPE tokenizer."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvrelay.workers.model.detokenize import IncrementalDetokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. 🙂🚀 naïve café, résumé.",
    "東京は日本の首都です。我爱北京天安门。한국어 텍스트도 있어요.",
    "Emoji mix: 👍🏽 👨‍👩‍👧 🎉🎉 and math ∑∫√ plus <stop> and </end> tags.",
    "def f(x):\n    return x ** 2  # ünïcödé comment\n",
]


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    return tok


def make_decode(tok: Tokenizer):  # type: ignore[no-untyped-def]
    return lambda ids: tok.decode(list(ids), skip_special_tokens=False)


def stream(
    tok: Tokenizer, chunks: Sequence[Sequence[int]], stops: Sequence[str]
) -> tuple[list[str], int | None]:
    """Deltas, and the number of chunks consumed when a stop string ended the stream."""
    det = IncrementalDetokenizer(make_decode(tok), stops)
    deltas = []
    for n, chunk in enumerate(chunks, 1):
        res = det.push(chunk)
        det.check_integrity()
        deltas.append(res.text_delta)
        if res.stop_hit:
            assert det.finished
            return deltas, n
    deltas.append(det.flush().text_delta)
    return deltas, None


def reference(
    tok: Tokenizer, chunks: Sequence[Sequence[int]], stops: Sequence[str]
) -> tuple[str, int | None]:
    """Full decode after each chunk; truncate at the earliest stop in the first text holding one."""
    ids: list[int] = []
    for n, chunk in enumerate(chunks, 1):
        ids.extend(chunk)
        text = tok.decode(ids, skip_special_tokens=False)
        hits = [text.find(s) for s in stops if s in text]
        if hits:
            return text[: min(hits)], n
    return tok.decode(ids, skip_special_tokens=False), None


@st.composite
def case(draw, tok: Tokenizer):  # type: ignore[no-untyped-def]
    vocab = tok.get_vocab_size()
    if draw(st.booleans()):  # arbitrary ids: split and invalid UTF-8 everywhere
        ids = draw(st.lists(st.integers(0, vocab - 1), max_size=40))
    else:  # ids of real text
        text = draw(st.text(st.sampled_from("ab <>/é東京🙂👍🏽\n"), max_size=30))
        ids = tok.encode(text).ids
    full = tok.decode(ids, skip_special_tokens=False)
    stops = []
    for _ in range(draw(st.integers(0, 3))):
        if full and draw(st.booleans()):  # a substring of the output: a likely hit
            i = draw(st.integers(0, len(full) - 1))
            stops.append(full[i : i + draw(st.integers(1, 4))])
        else:
            stops.append(draw(st.text(st.sampled_from("ab <>/é東🙂"), min_size=1, max_size=4)))
    stops = [s for s in stops if "\ufffd" not in s]
    cuts = sorted(draw(st.lists(st.integers(0, len(ids)), max_size=4)))
    if draw(st.booleans()):  # one token per push, as the engine does
        chunks = [[t] for t in ids]
    else:
        bounds = [0, *cuts, len(ids)]
        chunks = [ids[a:b] for a, b in itertools.pairwise(bounds)]
    return chunks, stops


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_deltas_equal_truncated_full_decode(tokenizer: Tokenizer, data: st.DataObject) -> None:
    chunks, stops = data.draw(case(tokenizer))
    deltas, stopped_at = stream(tokenizer, chunks, stops)
    expected, ref_stop = reference(tokenizer, chunks, stops)
    assert "".join(deltas) == expected
    assert stopped_at == ref_stop
    full = tokenizer.decode([t for c in chunks for t in c], skip_special_tokens=False)
    if "\ufffd" not in full:
        assert not any("\ufffd" in d for d in deltas)


def byte_ids(tok: Tokenizer, text: str) -> list[int]:
    """One token per UTF-8 byte (the byte-level alphabet is in every byte-level vocab)."""
    pieces = pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)
    chars = "".join(piece for piece, _ in pieces)  # one printable char per byte
    assert len(chars) == len(text.encode())
    ids = [tok.token_to_id(c) for c in chars]
    assert all(i is not None for i in ids)
    return [i for i in ids if i is not None]


def test_multibyte_char_split_over_tokens_is_never_half_emitted(tokenizer: Tokenizer) -> None:
    det = IncrementalDetokenizer(make_decode(tokenizer))
    ids = byte_ids(tokenizer, "a🙂東")
    deltas = [det.push([t]).text_delta for t in ids]
    assert deltas == ["a", "", "", "", "🙂", "", "", "東"]
    assert det.flush().text_delta == ""


def test_possible_stop_prefix_is_held_then_released(tokenizer: Tokenizer) -> None:
    det = IncrementalDetokenizer(make_decode(tokenizer), stop=["</end>"])
    out = [det.push(byte_ids(tokenizer, ch)).text_delta for ch in "x</en"]
    assert out == ["x", "", "", "", ""]
    res = det.push(byte_ids(tokenizer, "s"))  # "</ens" cannot start "</end>" any more
    assert (res.text_delta, res.stop_hit) == ("</ens", False)
    det.push(byte_ids(tokenizer, "</e"))
    assert det.flush().text_delta == "</e"  # end of stream: held text is released


def test_stop_string_across_tokens_is_cut_with_what_follows(tokenizer: Tokenizer) -> None:
    det = IncrementalDetokenizer(make_decode(tokenizer), stop=["<stop>", "🎉"])
    assert det.push(byte_ids(tokenizer, "ok <st")).text_delta == "ok "
    res = det.push(byte_ids(tokenizer, "op> more"))
    assert (res.text_delta, res.stop_hit, res.stop_string) == ("", True, "<stop>")
    with pytest.raises(RuntimeError):
        det.push([1])


def test_prompt_context_does_not_leak_into_output(tokenizer: Tokenizer) -> None:
    prompt = tokenizer.encode("résumé 東京 ").ids
    out = tokenizer.encode("🙂 fox").ids
    det = IncrementalDetokenizer(make_decode(tokenizer), prompt_ids=prompt)
    text = "".join(det.push([t]).text_delta for t in out) + det.flush().text_delta
    assert text == "🙂 fox"


def test_empty_stop_string_is_rejected(tokenizer: Tokenizer) -> None:
    with pytest.raises(ValueError, match="non-empty"):
        IncrementalDetokenizer(make_decode(tokenizer), stop=["a", ""])


def test_bytes_that_never_complete_a_character_cost_linear_decoding(
    tokenizer: Tokenizer,
) -> None:
    """Random weights emit byte tokens that never finish a character: every step's window text
    ends in U+FFFD. The window is cut behind them (verified to decode the same), so the tokens
    decoded per step stay bounded, and the stream is still exactly the full decode."""
    lone = byte_ids(tokenizer, "é")[1]  # a continuation byte alone: U+FFFD however it ends
    lead = byte_ids(tokenizer, "東")[0]  # a lead byte: its character may still come
    ids = [lone, lead] * 200 + byte_ids(tokenizer, "a東")
    decoded: list[int] = []
    decode = make_decode(tokenizer)

    def counting(window: Sequence[int]) -> str:
        decoded.append(len(window))
        return decode(window)

    det = IncrementalDetokenizer(counting, ["</end>"])
    deltas = []
    for t in ids:
        deltas.append(det.push([t]).text_delta)
        det.check_integrity()
    deltas.append(det.flush().text_delta)
    assert "".join(deltas) == decode(ids)
    assert "".join(deltas).endswith("\ufffda東")
    assert max(decoded) <= 40  # without the cut: the whole output, 400+ tokens
    assert sum(decoded) <= 40 * len(ids)
