"""Offline generation in one process: ``LLM(source).generate(prompts, params)``.

The same engine a worker serves with, stepped on the caller's thread; used by
``kvrelay generate``, the engine benchmark and the reference runs tests compare against.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from kvrelay.workers.engine.config import EngineConfig
from kvrelay.workers.engine.engine import Engine
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.model.output import RequestText
from kvrelay.workers.types import FinishReason, SamplingParams


@dataclass(frozen=True, slots=True)
class Completion:
    token_ids: tuple[int, ...]
    text: str
    finish_reason: FinishReason
    cached_prompt_tokens: int


class LLM:
    def __init__(
        self,
        source: str | None = None,
        *,
        engine_config: EngineConfig = EngineConfig(),
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
        threads: int | None = None,
    ) -> None:
        if threads:
            torch.set_num_threads(threads)
        self.loaded = load_model(source, dtype=dtype, device=device)
        self.tokenizer = self.loaded.tokenizer
        self.engine = Engine(self.loaded, engine_config, device=device)
        self._next_id = 0

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        params: SamplingParams | Sequence[SamplingParams] = SamplingParams(),
    ) -> list[Completion]:
        per = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        ids: list[str] = []
        texts: dict[str, RequestText] = {}
        cached: dict[str, int] = {}
        for prompt, p in zip(prompts, per, strict=True):
            rid = f"llm-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(rid, prompt, p)
            texts[rid] = RequestText(self.tokenizer, p, prompt)
            ids.append(rid)
        while self.engine.has_unfinished():
            for event in self.engine.step():
                event, stop_hit = texts[event.request_id].process(event)
                cached[event.request_id] = max(cached.get(event.request_id, 0),
                                               event.cached_prompt_tokens)
                if stop_hit:
                    self.engine.abort(event.request_id)
        out = []
        for rid in ids:
            t = texts[rid]
            assert t.finish_reason is not None
            out.append(Completion(tuple(t.token_ids), t.text, t.finish_reason, cached.get(rid, 0)))
        return out
