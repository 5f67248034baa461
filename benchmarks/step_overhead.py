"""Host time of one decode ``Engine.step`` (issue 17): the engine's own work, the model taken out.

    .venv/bin/python benchmarks/step_overhead.py [--batches 32 128] [--steps 40] [--reps 3]
        [--prompt 32] [--overlap off on] [--device cpu] [--threads 1] [--json PATH]

Model: a random-weight Llama of one tiny layer (hidden 64, 4/2 heads, head_dim 16, vocab 512),
so what a step costs is mostly the engine. ``--batches`` requests of ``--prompt``-token prompts
(32; a longer one widens the block tables) are prefilled, then ``--steps`` decode-only steps are timed (every request decoding, the batch
unchanged but for a block boundary every 16 tokens). Per step:

* ``step`` = time of ``Engine.step()``;
* ``model`` = time inside the model's ``forward`` + ``compute_logits`` (instance wrappers; on
  CPU the device is the host, so this is the forward's real cost);
* ``host`` = step - model: scheduling, input preparation, sampling bookkeeping, stop checks;
  and its parts: ``schedule`` (``Scheduler.schedule``), ``sample`` (``Sampler.sample``), and
  ``prepare`` (``ModelRunner.run`` minus the model: building the batch's tensors).

Times are CPU time of the engine's thread (``time.thread_time``, torch on one thread), not wall
time: the machine is shared, and wall time there measures the neighbours as much as the engine
(a 2-core box at load 11 moved wall figures by 3x between reps). Each rep builds a fresh engine;
figures are the median over reps of each rep's mean. On CUDA the model time is the host's launch
time only (kernels run asynchronously); use gpu_bench.py ``--engine-only`` there.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.config import ModelConfig
from kvrelay.workers.model.llama import LlamaModel
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.types import SamplingParams

VOCAB, BS = 512, 16
PARTS = ("step", "model", "host", "schedule", "prepare", "sample")


def tiny_model(device: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)  # fmt: skip
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    config = ModelConfig.from_hf(cfg.to_dict())
    model = LlamaModel(config, dtype=torch.float32, device=device)
    model.load_hf_weights({k: v.to(device) for k, v in hf.state_dict().items()}.get)
    tok = SimpleNamespace(eos_token_ids=())
    return LoadedModel(config, model.eval(), tok, "bench", "random")  # type: ignore[arg-type]


class Timers:
    """Seconds spent in wrapped methods (instance attributes shadowing the class's)."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}

    def wrap(self, obj: Any, name: str, key: str) -> None:
        inner: Callable[..., Any] = getattr(obj, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            t0 = time.thread_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self.spent[key] = self.spent.get(key, 0.0) + time.thread_time() - t0

        setattr(obj, name, timed)


def one_rep(loaded: LoadedModel, batch: int, steps: int, overlap: bool, device: str,
            prompt: int = 32) -> dict[str, float]:  # fmt: skip
    per_seq = max(16, -(-(prompt + steps + 8) // BS) + 1)  # blocks: prompt, steps, warm-up
    engine = Engine(loaded, EngineConfig(block_size=BS, num_blocks=batch * per_seq + 16,
                                         max_num_seqs=batch, max_num_batched_tokens=4096,
                                         cpu_num_blocks=0, overlap_schedule=overlap),
                    device=device)  # fmt: skip
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(
            f"r{i}", torch.randint(3, VOCAB, (prompt,), generator=g).tolist(), params
        )
    while engine.stats().waiting or any(
        s.num_computed < len(s.prompt_ids) for s in engine.seqs.values()
    ):
        engine.step()
    for _ in range(3):
        engine.step()
    timers = Timers()
    timers.wrap(engine.runner.model, "forward", "model")
    timers.wrap(engine.runner.model, "compute_logits", "model")
    timers.wrap(engine.runner, "run", "run")
    timers.wrap(engine.scheduler, "schedule", "schedule")
    timers.wrap(engine.sampler, "sample", "sample")
    decoded = engine.decode_tokens_computed
    t0 = time.thread_time()
    for _ in range(steps):
        engine.step()
    wall = time.thread_time() - t0
    assert engine.decode_tokens_computed - decoded == batch * steps, "not a pure decode batch"
    s = timers.spent
    out = {
        "step": wall,
        "model": s["model"],
        "host": wall - s["model"],
        "schedule": s["schedule"],
        "prepare": s["run"] - s["model"],
        "sample": s["sample"],
    }
    engine.close()
    return {k: v / steps * 1e3 for k, v in out.items()}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[32, 128])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--overlap", nargs="+", default=["off"], choices=("off", "on"))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    loaded = tiny_model(args.device)
    rows = []
    print(f"| batch | overlap | {' | '.join(p + ' ms' for p in PARTS)} | host share |")
    print("| ---: | --- |" + " ---: |" * (len(PARTS) + 1))
    for batch in args.batches:
        for mode in args.overlap:
            reps = [one_rep(loaded, batch, args.steps, mode == "on", args.device, args.prompt)
                    for _ in range(args.reps)]  # fmt: skip
            med = {p: statistics.median(r[p] for r in reps) for p in PARTS}
            spread = {p: (min(r[p] for r in reps), max(r[p] for r in reps)) for p in PARTS}
            rows.append(dict(batch=batch, overlap=mode, median_ms=med, min_max_ms=spread))
            cells = " | ".join(f"{med[p]:.3f}" for p in PARTS)
            print(f"| {batch} | {mode} | {cells} | {med['host'] / med['step']:.2f} |", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
