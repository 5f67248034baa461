"""How late an event loop runs while prompts are tokenized on a worker thread (the serving
frontends' case: long prompts go to ``asyncio.to_thread``, cluster/api/validation.py).

    python benchmarks/tokenize_lag_bench.py [--rate 30] [--seconds 3] [--reps 3] [--json OUT]

One asyncio loop runs a ticker (sleep 1 ms, record how late it woke: ``loop_lag``) while prompts
of ``--tokens`` tokens (the default model's tokenizer) arrive at ``--rate`` a second and are
tokenized in the loop's default thread pool, as the frontends do. Two ways to tokenize, in
alternation, each rep:

* ``encode``: ``tokenizers.Tokenizer.encode``, which holds the GIL while it works (kvrelay's
  ``Tokenizer.encode`` before d918cd8);
* ``encode_batch``: ``encode_batch([text])``, which releases it (kvrelay's now; transformers'
  fast tokenizers call it for ``tokenizer(text)`` too: the peer).

The limit is a loop that wakes on time (lag 0 at every percentile). Check per run: every prompt
was tokenized (the ids counted equal prompts x tokens) and both ways gave the same ids.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kvrelay.cluster.metrics.loop_lag import lag_summary_ms, watch_loop_lag
from kvrelay.workers.model.source import load_tokenizer

TICK_S = 0.001


def prompt_of(backend: Any, tokens: int) -> str:
    """A text of about ``tokens`` tokens (ordinary English words)."""
    unit = "The quick brown fox jumps over the lazy dog near the old river bank. "
    per = len(backend.encode(unit, add_special_tokens=False).ids)
    return unit * max(1, tokens // per)


async def run(
    encode: Callable[[str], list[int]], text: str, rate: float, seconds: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    lags: list[float] = []
    tick = asyncio.create_task(watch_loop_lag(lags.append, TICK_S))
    jobs = []
    t0 = loop.time()
    n = int(rate * seconds)
    for i in range(n):  # open loop: each prompt at its time, whatever the earlier ones do
        await asyncio.sleep(max(0.0, t0 + i / rate - loop.time()))
        jobs.append(asyncio.create_task(asyncio.to_thread(encode, text)))
    ids = await asyncio.gather(*jobs)
    tick.cancel()
    lag = lag_summary_ms(lags)
    return {"prompts": n, "ids": sum(map(len, ids)), "ticks": len(lags),
            "lag_p50_ms": lag["p50"], "lag_p99_ms": lag["p99"], "lag_max_ms": lag["max"],
            "first_ids": ids[0][:8]}  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=6000, help="tokens a prompt (the long ones)")
    p.add_argument("--rate", type=float, default=30.0, help="prompts a second")
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    _, tok, _ = load_tokenizer(None)
    backend = tok.backend
    text = prompt_of(backend, args.tokens)
    want = len(backend.encode(text, add_special_tokens=False).ids)
    ways: dict[str, Callable[[str], list[int]]] = {
        "encode": lambda t: backend.encode(t, add_special_tokens=False).ids,
        "encode_batch": lambda t: backend.encode_batch([t], add_special_tokens=False)[0].ids,
    }
    t = time.perf_counter()
    backend.encode(text, add_special_tokens=False)
    one_ms = 1e3 * (time.perf_counter() - t)
    print(f"prompt {want} tokens (one encode {one_ms:.1f} ms), {args.rate:g}/s for "
          f"{args.seconds:g} s; ticker {1e3 * TICK_S:g} ms; limit: lag 0")  # fmt: skip
    rows: dict[str, list[dict[str, Any]]] = {w: [] for w in ways}
    for rep in range(args.reps):
        for name, encode in ways.items():
            r = asyncio.run(run(encode, text, args.rate, args.seconds))
            assert r["ids"] == r["prompts"] * want, (name, r["ids"], r["prompts"], want)
            rows[name].append(r)
            print(f"rep {rep + 1} {name:>12}: loop lag p50 {r['lag_p50_ms']:.2f} / p99 "
                  f"{r['lag_p99_ms']:.2f} / max {r['lag_max_ms']:.1f} ms, {r['ticks']} ticks, "
                  f"{r['prompts']} prompts ({r['ids']} ids)")  # fmt: skip
    assert rows["encode"][0]["first_ids"] == rows["encode_batch"][0]["first_ids"]
    med = {w: statistics.median(r["lag_p99_ms"] for r in rs) for w, rs in rows.items()}
    print(
        f"loop lag p99, median of {args.reps}: encode {med['encode']:.2f} ms, encode_batch "
        f"{med['encode_batch']:.2f} ms ({med['encode'] / max(med['encode_batch'], 1e-3):.1f}x)"
    )
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "tokens": want, "rows": rows}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
