"""Incremental detokenizer against full decodes of a real byte-level BPE tokenizer, both ways:
decoding token windows, and decoding the tokenizer's byte pieces (``byte_pieces``)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

from kvrelay.workers.model.detokenize import IncrementalDetokenizer
from kvrelay.workers.model.tokenizer import byte_pieces
from kvrelay.workers.model.tokenizer_gguf import byte_alphabet

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
    # added tokens: decode writes them as text (a special one not at all when skipping them)
    tok.add_special_tokens([AddedToken("<|sp|>", special=True)])
    tok.add_tokens([AddedToken("<plain é>", special=False)])
    return tok


@pytest.fixture(scope="module", params=["window", "pieces"])
def pieces(request: pytest.FixtureRequest, tokenizer: Tokenizer) -> Sequence[bytes] | None:
    """How the detokenizer under test decodes: windows of ids, or the tokenizer's byte pieces."""
    if request.param == "window":
        return None
    table = byte_pieces(tokenizer, skip_special_tokens=False)
    assert table is not None
    return table


def make_decode(tok: Tokenizer):  # type: ignore[no-untyped-def]
    return lambda ids: tok.decode(list(ids), skip_special_tokens=False)


def stream(
    tok: Tokenizer,
    chunks: Sequence[Sequence[int]],
    stops: Sequence[str],
    pieces: Sequence[bytes] | None,
) -> tuple[list[str], int | None]:
    """Deltas, and the number of chunks consumed when a stop string ended the stream."""
    det = IncrementalDetokenizer(make_decode(tok), stops, pieces=pieces)
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
def test_deltas_equal_truncated_full_decode(
    tokenizer: Tokenizer, pieces: Sequence[bytes] | None, data: st.DataObject
) -> None:
    chunks, stops = data.draw(case(tokenizer))
    deltas, stopped_at = stream(tokenizer, chunks, stops, pieces)
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


def test_multibyte_char_split_over_tokens_is_never_half_emitted(
    tokenizer: Tokenizer, pieces: Sequence[bytes] | None
) -> None:
    det = IncrementalDetokenizer(make_decode(tokenizer), pieces=pieces)
    ids = byte_ids(tokenizer, "a🙂東")
    deltas = [det.push([t]).text_delta for t in ids]
    assert deltas == ["a", "", "", "", "🙂", "", "", "東"]
    assert det.flush().text_delta == ""


def test_possible_stop_prefix_is_held_then_released(
    tokenizer: Tokenizer, pieces: Sequence[bytes] | None
) -> None:
    det = IncrementalDetokenizer(make_decode(tokenizer), stop=["</end>"], pieces=pieces)
    out = [det.push(byte_ids(tokenizer, ch)).text_delta for ch in "x</en"]
    assert out == ["x", "", "", "", ""]
    res = det.push(byte_ids(tokenizer, "s"))  # "</ens" cannot start "</end>" any more
    assert (res.text_delta, res.stop_hit) == ("</ens", False)
    det.push(byte_ids(tokenizer, "</e"))
    assert det.flush().text_delta == "</e"  # end of stream: held text is released


def test_stop_string_across_tokens_is_cut_with_what_follows(
    tokenizer: Tokenizer, pieces: Sequence[bytes] | None
) -> None:
    det = IncrementalDetokenizer(make_decode(tokenizer), ["<stop>", "🎉"], pieces=pieces)
    assert det.push(byte_ids(tokenizer, "ok <st")).text_delta == "ok "
    res = det.push(byte_ids(tokenizer, "op> more"))
    assert (res.text_delta, res.stop_hit, res.stop_string) == ("", True, "<stop>")
    with pytest.raises(RuntimeError):
        det.push([1])


def test_prompt_context_does_not_leak_into_output(
    tokenizer: Tokenizer, pieces: Sequence[bytes] | None
) -> None:
    prompt = tokenizer.encode("résumé 東京 ").ids
    out = tokenizer.encode("🙂 fox").ids
    det = IncrementalDetokenizer(make_decode(tokenizer), prompt_ids=prompt, pieces=pieces)
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


def test_byte_pieces_decode_any_bytes_as_the_tokenizer_does(tokenizer: Tokenizer) -> None:
    """Python's UTF-8 "replace" against the tokenizer's own lossy decoding, byte by byte, for
    invalid and cut sequences of every kind (overlong, surrogates, stray continuations)."""
    table = byte_pieces(tokenizer, skip_special_tokens=False)
    assert table is not None
    spelling = byte_alphabet()
    byte_id = [tokenizer.token_to_id(spelling[b]) for b in range(256)]

    @settings(max_examples=400, deadline=None)
    # ASCII, continuations, leads of 2/3/4 bytes (with E0/ED/F0/F4's narrower second bytes),
    # and bytes that are never valid
    @given(
        st.lists(
            st.sampled_from(b"A\x80\x8f\x9f\xa0\xbf\xc0\xc3\xe0\xed\xef\xf0\xf4\xf5\xff"),
            max_size=12,
        )
    )
    def check(data: list[int]) -> None:
        ids = [byte_id[b] for b in data]
        full = tokenizer.decode(ids, skip_special_tokens=False)
        assert b"".join(table[i] for i in ids).decode("utf-8", "replace") == full
        det = IncrementalDetokenizer(make_decode(tokenizer), pieces=table)
        text = "".join(det.push([i]).text_delta for i in ids) + det.flush().text_delta
        assert text == full

    check()


def test_byte_pieces_skip_special_tokens_as_decode_does(tokenizer: Tokenizer) -> None:
    special = tokenizer.token_to_id("<|sp|>")
    ids = [*tokenizer.encode("é🙂").ids, special, tokenizer.token_to_id("<plain é>"), special]
    ids += byte_ids(tokenizer, "東")[:2]
    for skip in (True, False):
        table = byte_pieces(tokenizer, skip_special_tokens=skip)
        assert table is not None
        assert (table[special] == b"") is skip
        det = IncrementalDetokenizer(make_decode(tokenizer), pieces=table)  # decode unused
        text = "".join(det.push([i]).text_delta for i in ids) + det.flush().text_delta
        assert text == tokenizer.decode(ids, skip_special_tokens=skip)


def test_id_past_the_vocabulary_decodes_to_nothing(
    tokenizer: Tokenizer, pieces: Sequence[bytes] | None
) -> None:
    """A model's vocabulary may be larger than its tokenizer's (padded embeddings)."""
    past = tokenizer.get_vocab_size() + 7
    ids = [*tokenizer.encode("ok").ids, past, *tokenizer.encode(" fox").ids]
    det = IncrementalDetokenizer(make_decode(tokenizer), pieces=pieces)
    text = det.push(ids[:2]).text_delta + det.push(ids[2:]).text_delta + det.flush().text_delta
    assert text == tokenizer.decode(ids, skip_special_tokens=False) == "ok fox"


@pytest.mark.parametrize(
    "decoder",
    [decoders.Metaspace(), decoders.Sequence([decoders.ByteLevel()]), None],
    ids=["metaspace", "sequence", "none"],
)
def test_no_byte_pieces_for_other_decoders(decoder: decoders.Decoder | None) -> None:
    """Their decode may strip or join (a leading space, "##"): the detokenizer keeps windows."""
    tok = Tokenizer(models.BPE())
    if decoder is not None:
        tok.decoder = decoder
    assert byte_pieces(tok, skip_special_tokens=True) is None
