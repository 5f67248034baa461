"""Incremental detokenization with stop strings, for streaming.

Two holdbacks, one after the other:

1. UTF-8 (vLLM's prefix/read offsets). Decoding a window of recent tokens instead of the whole
   output keeps a step O(window). A token may end inside a multi-byte character; its decoded
   text then ends with U+FFFD, so the window's text is released only up to its last character
   that is not a trailing U+FFFD, and the window moves on once its text ends cleanly::

       ids:   ... | prefix_offset ........ read_offset ........ len(ids)
                    \\__ context (already released) _/\\__ new tokens __/
       decode(ids[prefix_offset:])[:released] is already out; the rest is new.

   The context token in front keeps tokenizers that strip a leading space on the first token
   (SentencePiece) honest, as in vLLM.

   A window whose text keeps ending in U+FFFD (a model emitting bytes that never complete a
   character, as random weights do) would never slide, and each step would decode the whole
   output: quadratic. Once more than ``_MAX_HELD_TOKENS`` tokens wait behind such an end, the
   window is cut before one of its last ``_UTF8_TAIL`` to ``2 * _UTF8_TAIL - 1`` tokens (a
   character spans at most 4 bytes, so an incomplete one started there at the latest) where —
   checked, not assumed — the two parts decode to the window's text (a cut inside an invalid
   sequence changes how many U+FFFDs it gives); the head's text, its U+FFFDs included, is then
   final. Where
   the check fails (a decoder that strips a leading space), the window grows as before and the
   next try waits until the held tokens have doubled.

   With the tokenizer's byte pieces (``Tokenizer.byte_pieces``: a byte-level decoder, whose
   decode is the UTF-8 decoding, U+FFFD for what is invalid, of the ids' pieces joined), this
   stage is instead an incremental UTF-8 decoder fed each token's piece: no decode call per
   step. It holds back only a character that is still incomplete (and can still be completed),
   so its output, flushed at the end, is the full decode's text exactly.

2. Stop strings (OpenAI semantics). Released text goes into ``pending``; the earliest stop
   string found there ends the stream, and neither it nor anything after it is emitted. Of the
   rest, the longest suffix that is a proper prefix of some stop string is held back, so a
   stream never emits text that later turns out to belong to a stop string. Invariant: no
   future match can start in emitted text, so searching ``pending`` is enough.

With one token per ``push`` the concatenated deltas equal ``decode(ids)`` truncated at the start
of the earliest stop string in the text of the shortest prefix of ids that contains one (for
byte-level BPE and other decoders for which decode(a + b) == decode(a) + decode(b) at
character boundaries).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from typing import NamedTuple

_REPLACEMENT = "\ufffd"
# prompt tokens kept as decoding context in front of the first output token (vLLM uses 5)
_PROMPT_CONTEXT = 5
# tokens behind a window end in U+FFFD before the window is cut, and the tail the cut keeps
_MAX_HELD_TOKENS = 16
_UTF8_TAIL = 4


class DetokResult(NamedTuple):  # a NamedTuple: built every step, ~4x cheaper than a dataclass
    text_delta: str  # new text safe to stream; "" while held back
    stop_hit: bool  # a stop string was found: the stream is over
    stop_string: str | None = None  # which one (the earliest-starting), when stop_hit


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas; one instance per request."""

    def __init__(
        self,
        decode: Callable[[Sequence[int]], str],
        stop: Sequence[str] = (),
        prompt_ids: Sequence[int] = (),
        pieces: Sequence[bytes] | None = None,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop strings must be non-empty")
        self._decode = decode
        # byte pieces make the UTF-8 stage a decoder of bytes (no prompt context needed: a
        # byte-level decoder strips nothing)
        self._pieces = pieces
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._stop = tuple(dict.fromkeys(stop))  # dedup, keep order
        # prefixes of stop strings (proper), for the holdback test; sizes are tiny (<= 4 x ~20)
        self._stop_prefixes = {s[:i] for s in self._stop for i in range(1, len(s))}
        # the lengths of those prefixes by their last character, longest first: the holdback
        # test slices only where a prefix could end as the text does
        ends: dict[str, set[int]] = {}
        for p in self._stop_prefixes:
            ends.setdefault(p[-1], set()).add(len(p))
        self._hold_lengths = {c: sorted(ns, reverse=True) for c, ns in ends.items()}
        self._max_hold = max((len(s) - 1 for s in self._stop), default=0)
        self._ids: list[int] = [] if pieces is not None else list(prompt_ids[-_PROMPT_CONTEXT:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        # output text is what output tokens add after the prompt's (context) text
        self._released = len(decode(self._ids)) if self._ids else 0
        self._pending = ""  # released by the UTF-8 stage, not yet emitted (stop holdback)
        self._done = False
        self._cut_at = _MAX_HELD_TOKENS  # held tokens that make the next cut attempt

    @property
    def finished(self) -> bool:
        return self._done

    def push(self, new_ids: Sequence[int]) -> DetokResult:
        """Add the ids of one step; returns the text they make safe to emit."""
        if self._done:
            raise RuntimeError("push() after a stop string or flush()")
        pieces = self._pieces
        if pieces is not None:
            try:
                # one id a step is the common case: no join
                data = (
                    pieces[new_ids[0]]
                    if len(new_ids) == 1
                    else b"".join([pieces[t] for t in new_ids])
                )
            except IndexError:  # an id past the tokenizer's vocabulary decodes to nothing
                data = b"".join([pieces[t] for t in new_ids if t < len(pieces)])
            self._pending += self._utf8.decode(data)
            return self._emit(final=False)
        self._ids.extend(new_ids)
        text = self._decode(self._ids[self._prefix_offset :])
        stable = text.rstrip(_REPLACEMENT)
        if len(stable) > self._released:
            self._pending += stable[self._released :]
            self._released = len(stable)
        if len(stable) == len(text) and self._read_offset < len(self._ids):
            # clean end: everything in the window is out; slide it, keeping one step of context
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
            self._released = len(self._decode(self._ids[self._prefix_offset :]))
            self._cut_at = _MAX_HELD_TOKENS
        elif len(self._ids) - self._read_offset > self._cut_at:
            self._cut(text)
        return self._emit(final=False)

    def _cut(self, text: str) -> None:
        """Release the window's head for good when its text cannot change (module docstring)."""
        for cut in range(len(self._ids) - _UTF8_TAIL, len(self._ids) - 2 * _UTF8_TAIL, -1):
            head = self._decode(self._ids[self._prefix_offset : cut])
            if head + self._decode(self._ids[cut:]) == text:
                break
        else:
            self._cut_at *= 2
            return
        if len(head) > self._released:
            self._pending += head[self._released :]
        self._released = max(0, self._released - len(head))
        self._prefix_offset = self._read_offset = cut
        self._cut_at = _MAX_HELD_TOKENS

    def flush(self) -> DetokResult:
        """End of stream (EOS, stop id, max tokens): release everything held back."""
        if self._done:
            return DetokResult("", stop_hit=False)
        if self._pieces is not None:
            self._pending += self._utf8.decode(b"", final=True)
            return self._emit(final=True)
        text = self._decode(self._ids[self._prefix_offset :])
        if len(text) > self._released:
            self._pending += text[self._released :]
            self._released = len(text)
        return self._emit(final=True)

    def _emit(self, final: bool) -> DetokResult:
        pending = self._pending
        if not self._stop:
            self._pending = ""
            self._done = final
            return DetokResult(pending, stop_hit=False)
        hit = self._earliest_stop(pending)
        if hit is not None:
            start, stop = hit
            self._pending = ""
            self._done = True
            return DetokResult(pending[:start], stop_hit=True, stop_string=stop)
        if final:
            self._pending = ""
            self._done = True
            return DetokResult(pending, stop_hit=False)
        hold = self._held_suffix(pending)
        cut = len(pending) - hold
        self._pending = pending[cut:]
        return DetokResult(pending[:cut], stop_hit=False)

    def _earliest_stop(self, text: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for s in self._stop:
            i = text.find(s)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def _held_suffix(self, text: str) -> int:
        """Length of the longest suffix of text that a stop string starts with."""
        if not text:
            return 0
        for n in self._hold_lengths.get(text[-1], ()):
            if n <= len(text) and text[-n:] in self._stop_prefixes:
                return n
        return 0

    def check_integrity(self) -> None:
        assert 0 <= self._prefix_offset <= self._read_offset <= len(self._ids)
        assert len(self._pending) <= self._max_hold or self._done
        assert self._earliest_stop(self._pending) is None or self._done
