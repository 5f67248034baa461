"""Pass keys through the engine (``LLM``, so the prompt is prefilled in chunks of
``--chunk`` tokens as a worker would), dense prefill against sparse prefill at each
``--sample-last``; decode is dense; the prefix cache is off, so each item prefills whole. Complements benchmarks/sparse_accuracy.py, which prefills
each prompt in one piece by calling the model directly.

    python benchmarks/sparse_passkey_engine.py --length 4096 --items 3 5 7 --sample-last 0 64 \\
        --heads benchmarks/results/sparse_heads_smollm2.json
"""

from __future__ import annotations

import argparse
import time

from kvrelay.benchmarks.sparse_accuracy import passkey_prompts
from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.llm import LLM
from kvrelay.workers.model.sparse_attention import SparseConfig
from kvrelay.workers.types import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--items", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--sample-last", type=int, nargs="+", default=[SparseConfig().sample_last])
    ap.add_argument("--heads", default=None, help="calibrate-heads output (default: none)")
    ap.add_argument("--chunk", type=int, default=EngineConfig().max_num_batched_tokens)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    params = SamplingParams(max_tokens=12, temperature=0.0)
    runs = [("off", 0)] + [("prefill", last) for last in args.sample_last]
    for mode, last in runs:
        sparse = SparseConfig(mode=mode, heads_path=args.heads if mode != "off" else None,
                              sample_last=last)  # fmt: skip
        # no prefix cache: items share the filler, and a hit would reuse the previous item's KV
        # (and change where the chunks fall)
        config = EngineConfig(sparse=sparse, max_num_batched_tokens=args.chunk,
                              enable_prefix_caching=False)  # fmt: skip
        llm = LLM(None, engine_config=config, threads=args.threads)
        c = llm.loaded.config
        prompts = passkey_prompts(llm.tokenizer, args.length, max(args.items) + 1, args.length,
                                  "repeat", c.max_position_embeddings)  # fmt: skip
        for i in args.items:
            ids, key = prompts[i]
            t = time.time()
            out = llm.generate([ids], params)[0]
            print(f"{mode} sample_last={last} item={i} tokens={len(ids)} right={key in out.text}",
                  repr(out.text), f"{time.time() - t:.0f}s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
