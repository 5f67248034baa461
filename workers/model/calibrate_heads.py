"""``kvrelay calibrate-heads``: pick a model's streaming heads offline, by attention mass on real
text, and store the mask beside the model (workers/model/sparse_attention.py loads it).

A KV head whose query group puts nearly all its attention on the first ``sink`` tokens and the
last ``local`` ones loses little when it reads only those (DuoAttention's streaming heads). The
dense prefill's attention is measured, averaged over rows and the head's query group, on:

- plain text: the (sink ∪ local) mass of the last ``rows`` positions of ShareGPT texts;
- retrieval: haystacks (ShareGPT texts and the classic repeated filler, alternately) with a pass
  key hidden at 10-80% depth, the question and the answer quoting the key; the mass that the answer's positions put on the pass key sentence, max over
  the prompts. DuoAttention calibrates on such synthetic retrieval: a head that fetches the key
  from the middle must stay dense however local it looks on plain text. Measured on
  SmolLM2-135M: the heads chosen by plain-text mass alone included heads putting ~0.1 of their
  attention on the key, and with them streaming the model no longer retrieved it.

The ``fraction`` of all heads with the most plain-text mass (LServe: half) become streaming
heads, skipping every head whose retrieval mass reaches ``needle_mass`` (so fewer when too few
are left).

Output, JSON: ``{"streaming": [[bool] * Hkv] * L, "mass": [[float] * Hkv] * L, ...}``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from kvrelay import kernels
from kvrelay.kernels.sparse_reference import gather_kv
from kvrelay.workers.model.llama import AttentionMetadata, kv_cache_shape
from kvrelay.workers.model.loader import LoadedModel
from kvrelay.workers.model.sparse_attention import SparseAttention, SparseConfig
from kvrelay.workers.model.tokenizer import Tokenizer


class _MassProbe(SparseAttention):
    """Dense prefill that also records, per text, each head's attention mass on (sink ∪ local),
    or on the key span ``[lo, hi)`` when ``span`` is set."""

    def __init__(self, kv_cache: torch.Tensor, sink: int, local: int, rows: int) -> None:
        super().__init__(SparseConfig(mode="prefill"), kv_cache)
        self.sink, self.local, self.rows = sink, local, rows
        self.span: tuple[int, int] | None = None
        self.per_text: list[torch.Tensor] = []  # [L, Hkv] float64 each

    def prefill(
        self, layer: int, query: torch.Tensor, kv_cache: torch.Tensor, attn: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:  # fmt: skip
        ctx = int(attn.context_lens[0])
        k, _ = gather_kv(kv_cache, layer, attn.block_tables[0], ctx)  # [ctx, Hkv, D]
        heads, kv_heads = query.shape[1], k.shape[1]
        q = query[-self.rows :].float()  # [r, H, D] (positions ctx - r .. ctx - 1)
        s = torch.einsum("rhd,khd->hrk", q, k.float().repeat_interleave(heads // kv_heads, 1))
        pos = torch.arange(ctx - q.shape[0], ctx)[:, None]
        k_pos = torch.arange(ctx)[None, :]
        s = (s * scale).masked_fill((k_pos > pos)[None], float("-inf"))
        p = torch.softmax(s, -1)
        if self.span is None:
            target = (k_pos < self.sink) | (pos - k_pos < self.local)  # [r, ctx]
        else:
            target = (k_pos >= self.span[0]) & (k_pos < self.span[1])  # [1, ctx]
        mass = (p * target[None]).sum(-1).mean(-1)  # [H]
        if layer == 0:
            self.per_text.append(torch.zeros(self.streaming.shape, dtype=torch.float64))
        self.per_text[-1][layer] = mass.view(kv_heads, -1).mean(-1).double()
        return kernels.paged_prefill_attention(
            query, kv_cache, layer, attn.block_tables, attn.query_start_loc, attn.context_lens,
            scale,
        )  # fmt: skip


@torch.inference_mode()
def head_mass(
    loaded: LoadedModel,
    texts: Sequence[Sequence[int]],
    sink: int = 128,
    local: int = 256,
    rows: int = 64,
    block_size: int = 16,
    spans: Sequence[tuple[int, int]] | None = None,
) -> torch.Tensor:  # [T, L, Hkv] float64: each text's attention mass, mean over rows and group
    """The mass of the last ``rows`` queries of each text on (sink ∪ local), or on the text's
    key span when ``spans`` are given."""
    model = loaded.model
    device = model.embed.device
    longest = max(len(t) for t in texts)
    nb = -(-longest // block_size)
    kv = torch.zeros(kv_cache_shape(loaded.config, nb, block_size), dtype=model.embed.dtype,
                     device=device)  # fmt: skip
    probe = _MassProbe(kv, sink, local, rows)
    for i, ids in enumerate(texts):
        n = len(ids)
        probe.span = spans[i] if spans is not None else None
        attn = AttentionMetadata(
            slot_mapping=torch.arange(n, device=device),
            block_tables=torch.arange(nb, device=device, dtype=torch.int32)[None],
            context_lens=torch.tensor([n], device=device, dtype=torch.int32),
            query_start_loc=torch.tensor([0, n], device=device, dtype=torch.int32),
            is_decode=False,
            sparse=probe,
        )
        tokens = torch.tensor(list(ids), device=device)
        model(tokens, torch.arange(n, device=device), kv, attn)
    return torch.stack(probe.per_text)


# The classic pass key haystack (Landmark Attention, LongLoRA), repeated
FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)


class Retrieval(NamedTuple):
    prompts: list[list[int]]  # chat token ids, the answer included
    spans: list[tuple[int, int]]  # [lo, hi) token positions of each prompt's pass key sentence
    rows: int  # final positions that hold the answer (the rows to measure)


def retrieval_texts(tokenizer: Tokenizer, count: int, tokens: int, seed: int = 0) -> Retrieval:
    """``count`` chat conversations of about ``tokens`` tokens: a haystack hiding a pass key, the
    question, and the answer quoting it. The haystacks alternate: a ShareGPT text (not one of the
    first ``count`` plain ones), then the repeated :data:`FILLER`."""
    rng = random.Random(seed)
    out = Retrieval([], [], 0)
    unit = len(tokenizer.encode(FILLER * 16, False)) / 16
    for i, ids in enumerate(sharegpt_texts(tokenizer, 2 * count, tokens - 64)[count:]):
        key = str(rng.randint(10000, 99999))
        hay = tokenizer.decode(ids) if i % 2 == 0 else FILLER * int((tokens - 64) / unit)
        cut = hay.rfind(" ", 0, int(len(hay) * rng.uniform(0.1, 0.8))) + 1
        needle = f"The pass key is {key}. Remember it. {key} is the pass key."
        text = hay[:cut] + f"\n\n{needle}\n\n" + hay[cut:] + "\n\nWhat is the pass key?"
        answer = f"The pass key is {key}."
        chat = [{"role": "user", "content": text}, {"role": "assistant", "content": answer}]
        prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=False)
        rows = len(tokenizer.encode(answer, False)) + 2  # + the end of the turn
        digits = tokenizer.encode(key, False)
        at = [i for i in range(len(prompt) - rows) if prompt[i : i + len(digits)] == digits]
        out.prompts.append(prompt)
        out.spans.append((at[0] - 8, at[-1] + len(digits) + 1))  # "The pass key is" .. "."
        out = out._replace(rows=max(out.rows, rows))
    return out


def pick_streaming(
    mass: torch.Tensor,  # [L, Hkv] (sink ∪ local) mass on plain text
    fraction: float = 0.5,
    retrieving: torch.Tensor | None = None,  # [L, Hkv] bool: heads that fetch a pass key
) -> torch.Tensor:  # [L, Hkv] bool
    """The ``fraction`` of all heads with the most (sink ∪ local) mass, retrieval heads never
    (so fewer when too few heads are left)."""
    flat = mass.flatten()
    if retrieving is not None:
        flat = flat.masked_fill(retrieving.flatten(), float("-inf"))
    count = min(round(fraction * flat.numel()), int(flat.isfinite().sum()))
    streaming = torch.zeros(flat.numel(), dtype=torch.bool)
    if count:
        streaming[flat.topk(count).indices] = True
    return streaming.view_as(mass)


def _rounded(mass: torch.Tensor) -> list[list[float]]:
    return [[round(float(x), 5) for x in row] for row in mass]


def write_heads(path: Path, mass: torch.Tensor, streaming: torch.Tensor, meta: dict) -> None:
    path.write_text(json.dumps({"streaming": streaming.tolist(), "mass": _rounded(mass), **meta}))


def sharegpt_texts(tokenizer, count: int, tokens: int) -> list[list[int]]:  # type: ignore[no-untyped-def]
    """``count`` token lists of ``tokens`` each, consecutive ShareGPT messages joined."""
    from kvrelay.benchmarks.multiturn_bench import iter_records, sharegpt_path

    texts: list[list[int]] = []
    buf: list[int] = []
    for rec in iter_records(sharegpt_path()):
        for m in rec.get("conversations") or []:
            buf += tokenizer.encode(str(m.get("value", "")) + "\n\n", False)
        while len(buf) >= tokens and len(texts) < count:
            texts.append(buf[:tokens])
            buf = buf[tokens:]
        if len(texts) == count:
            return texts
    raise ValueError(f"ShareGPT ran out after {len(texts)} texts of {tokens} tokens")


def calibrate(
    source: str | None, count: int, tokens: int, fraction: float, output: str | None,
    threads: int | None = None, retrieval: int = 4, needle_mass: float = 0.02,
) -> Path:  # fmt: skip
    from kvrelay.workers.model.loader import load_model
    from kvrelay.workers.model.sparse_attention import default_heads_path

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model(source)
    tokens = min(tokens, loaded.config.max_context)
    mass = head_mass(loaded, sharegpt_texts(loaded.tokenizer, count, tokens)).mean(0)
    meta = {"model": loaded.model_id, "texts": count, "tokens": tokens, "sink": 128, "local": 256}
    retrieving = torch.zeros(mass.shape, dtype=torch.bool)
    if retrieval:
        r = retrieval_texts(loaded.tokenizer, retrieval, tokens)
        fetch = head_mass(loaded, r.prompts, rows=r.rows, spans=r.spans).amax(0)
        retrieving = fetch >= needle_mass
        meta |= {"retrieval": retrieval, "needle_mass": _rounded(fetch), "min_needle": needle_mass}
    streaming = pick_streaming(mass, fraction, retrieving)
    path = Path(output) if output else default_heads_path(loaded.source)
    write_heads(path, mass, streaming, meta)
    return path
