"""The detokenizer alone, µs a token, on SmolLM2's real tokenizer (issue 17).

    python benchmarks/detokenize_bench.py --tokenizer DIR [--tokens 16384 --reps 5]

Streams ``--tokens`` ids one a ``push`` through ``RequestText``'s detokenizer (no stop strings,
then two stop strings that never match, so the holdback is searched each step), as the
controller does per request, both ways: decoding windows of ids (two tokenizer decodes a token,
vLLM's scheme; what a tokenizer without byte pieces gets) and decoding the byte pieces (no decode
call). Ids: a real text's (words), and uniformly random ones (split characters, byte tokens,
special tokens). Beside them: one ``Tokenizer.decode`` of one id (the window path pays two a
token). Check: each stream's text equals the full decode of its ids (special tokens skipped).
Figure: ``time.perf_counter`` over the stream / tokens, median of ``--reps``. On the code before
byte pieces (no ``Tokenizer.byte_pieces``) it measures the window path only.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

from kvrelay.workers.model.detokenize import IncrementalDetokenizer
from kvrelay.workers.model.source import load_tokenizer

TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening, counting the steps as his "
    "father had, and lit the lamp before the fishing boats came around the northern point. "
    "Zürich, 東京, naïve café 🙂 — ∑ x² "
)


def one_stream(
    tok: Any, ids: Sequence[int], stop: Sequence[str], pieces: Sequence[bytes] | None
) -> tuple[float, str]:
    kw = {} if pieces is None else {"pieces": pieces}  # runs on the code before pieces too
    det = IncrementalDetokenizer(tok.decode, stop, prompt_ids=(1, 2, 3), **kw)
    push = det.push
    out = []
    t = time.perf_counter()
    for i in ids:
        out.append(push((i,)).text_delta)
    out.append(det.flush().text_delta)
    return 1e6 * (time.perf_counter() - t) / len(ids), "".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokenizer", required=True, help="folder with SmolLM2's tokenizer files")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    _, tok, _ = load_tokenizer(args.tokenizer)
    t = time.perf_counter()
    pieces = getattr(tok, "byte_pieces", None)  # None: the code before them (windows only)
    print(f"byte pieces: {pieces is not None}, {time.perf_counter() - t:.2f} s", flush=True)
    words = tok.encode(TEXT * 200, add_special_tokens=False)
    rng = random.Random(0)
    streams = {
        "text": (words * (args.tokens // len(words) + 1))[: args.tokens],
        "random": [rng.randrange(tok.vocab_size) for _ in range(args.tokens)],
    }
    one = [i % tok.vocab_size for i in range(20, 20 + args.tokens)]
    t = time.perf_counter()
    for i in one:
        tok.decode((i,))
    print(f"one decode of one id: {1e6 * (time.perf_counter() - t) / len(one):.2f} us", flush=True)
    for name, ids in streams.items():
        full = tok.decode(ids)
        for stop in ((), ("<never>", "\n\n\n\n")):
            row = []
            ways = [("windows", None), ("byte pieces", pieces)] if pieces else [("windows", None)]
            for label, table in ways:
                times = []
                for _ in range(args.reps):
                    us, text = one_stream(tok, ids, stop, table)
                    assert text == full, f"{name} {label}: text differs from the full decode"
                    times.append(us)
                row.append(
                    f"{label} {statistics.median(times):.2f} ("
                    + ", ".join(f"{x:.2f}" for x in times)
                    + ")"
                )
            print(
                f"{name} ids, {len(stop)} stop strings: us/token "
                + "; ".join(row)
                + "; text == full decode",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
