"""Shared model fixtures: small random-weight Hugging Face checkpoints written by transformers
itself (so they are real references), and the default GGUF model.

    def test_x(make_checkpoint):
        ckpt = make_checkpoint("qwen2", hidden_size=96, num_key_value_heads=1)
        loaded = load_model(ckpt.path)

    def test_y(tiny_model_dir): ...  # 2-layer Llama, SmolLM2 tokenizer, vocab 49152, fast

Every checkpoint carries the default model's tokenizer (exported once from its GGUF), so its
vocabulary is 49152. The GGUF export goes to the user's cache (as the CLI does), so it is paid
once per machine, not once per run.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch

from kvrelay.workers.model.llama import AttentionMetadata, LlamaModel, kv_cache_shape
from kvrelay.workers.model.loader_gguf import export_gguf
from kvrelay.workers.model.source import default_model_path

VOCAB = 49152
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


class Checkpoint(NamedTuple):
    path: Path
    model_type: str
    hf_config: dict[str, Any]  # the config.json transformers wrote (before any rewrite)


@pytest.fixture(scope="session")
def default_gguf_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def default_gguf_export(default_gguf_path: Path) -> Path:
    """The default model as an HF folder (dequantized weights, tokenizer files)."""
    return export_gguf(default_gguf_path)


def _hf_config(model_type: str, **overrides: Any) -> Any:
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    base: dict[str, Any] = {
        "vocab_size": VOCAB,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "initializer_range": 0.05,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
    }
    base.update(overrides)
    return classes[model_type](**base)


@pytest.fixture(scope="session")
def make_checkpoint(
    tmp_path_factory: pytest.TempPathFactory, default_gguf_export: Path
) -> Callable[..., Checkpoint]:
    """Factory: ``make_checkpoint(model_type="llama", *, seed=0, shard=False,
    legacy_rope=False, dtype=torch.float32, **config_overrides) -> Checkpoint``.

    ``shard=True`` writes several model-0000x-of-0000y.safetensors with an index;
    ``legacy_rope=True`` rewrites config.json with top-level rope_theta/rope_scaling (the format
    most published checkpoints have) instead of transformers 5's rope_parameters.
    """
    from transformers import AutoModelForCausalLM

    counter = iter(range(1_000_000))

    def make(
        model_type: str = "llama",
        *,
        seed: int = 0,
        shard: bool = False,
        legacy_rope: bool = False,
        dtype: torch.dtype = torch.float32,
        **overrides: Any,
    ) -> Checkpoint:
        folder = tmp_path_factory.mktemp(f"{model_type}-{next(counter)}")
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(_hf_config(model_type, **overrides))
        with torch.no_grad():  # transformers inits biases to 0 and norms to 1: make them count
            for name, param in model.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0.0, 0.1)
                elif name.endswith("norm.weight"):
                    param.normal_(1.0, 0.1)
        model.to(dtype).save_pretrained(folder, max_shard_size="1MB" if shard else "10GB")
        for name in TOKENIZER_FILES:
            shutil.copy(default_gguf_export / name, folder / name)
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text())
        if legacy_rope:
            rope = dict(config.pop("rope_parameters"))
            legacy = dict(config)
            legacy["rope_theta"] = rope.pop("rope_theta")
            if rope.get("rope_type", "default") != "default":
                legacy["rope_scaling"] = rope
            config_path.write_text(json.dumps(legacy, indent=1))
        return Checkpoint(folder, model_type, config)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(make_checkpoint: Callable[..., Checkpoint]) -> Path:
    """A 2-layer Llama (hidden 64, 4 heads, 2 KV heads, tied) with the SmolLM2 tokenizer and
    chat template: real tokens, milliseconds per step."""
    ckpt = make_checkpoint(
        "llama", tie_word_embeddings=True, max_position_embeddings=2048, seed=1234
    )
    return ckpt.path


class PagedRunner:
    """Drives LlamaModel like the engine: blocks allocated from a shuffled free list."""

    def __init__(self, model: LlamaModel, num_blocks: int = 96, block_size: int = 4) -> None:
        self.model, self.block_size = model, block_size
        dtype = model.embed.dtype
        self.cache = torch.zeros(kv_cache_shape(model.config, num_blocks, block_size), dtype=dtype)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables: dict[int, list[int]] = {}
        self.lens: dict[int, int] = {}

    def step(self, chunks: dict[int, list[int]]) -> dict[int, torch.Tensor]:
        """Feed each sequence's new tokens; logits [n_i, vocab] of every new token."""
        ids, positions, slots, starts, ctx = [], [], [], [0], []
        for seq, tokens in chunks.items():
            table, start = self.tables.setdefault(seq, []), self.lens.get(seq, 0)
            end = start + len(tokens)
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            for pos in range(start, end):
                slots.append(
                    table[pos // self.block_size] * self.block_size + pos % self.block_size
                )
            ids += tokens
            positions += range(start, end)
            starts.append(starts[-1] + len(tokens))
            ctx.append(end)
            self.lens[seq] = end
        width = max(len(self.tables[s]) for s in chunks)
        tables = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in chunks]
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            block_tables=torch.tensor(tables, dtype=torch.int32),
            context_lens=torch.tensor(ctx, dtype=torch.int32),
            query_start_loc=torch.tensor(starts, dtype=torch.int32),
            is_decode=all(len(t) == 1 for t in chunks.values()),
        )
        hidden = self.model(torch.tensor(ids), torch.tensor(positions), self.cache, attn)
        logits = self.model.compute_logits(hidden)
        return dict(zip(chunks, logits.split([len(t) for t in chunks.values()]), strict=True))


def _run_paged(model: LlamaModel, seqs: list[list[int]], decode_steps: int) -> list[torch.Tensor]:
    """Logits [len(seq), V] per sequence: seq[0]'s prompt in two chunks (the second batched with
    the other prompts), then ``decode_steps`` batched decode steps over the last tokens."""
    runner = PagedRunner(model)
    out: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(seqs))}
    prompts = [s[: len(s) - decode_steps] for s in seqs]
    cut = len(prompts[0]) // 2
    if cut:
        out[0].append(runner.step({0: prompts[0][:cut]})[0])
    second = runner.step({0: prompts[0][cut:], **{i: p for i, p in enumerate(prompts) if i}})
    for i, logits in second.items():
        out[i].append(logits)
    for step in range(decode_steps):
        pos = {i: len(prompts[i]) + step for i in range(len(seqs))}
        for i, logits in runner.step({i: [seqs[i][p]] for i, p in pos.items()}).items():
            out[i].append(logits)
    return [torch.cat(out[i]) for i in range(len(seqs))]


@pytest.fixture(scope="session")
def run_paged() -> Callable[[LlamaModel, list[list[int]], int], list[torch.Tensor]]:
    """``run_paged(model, seqs, decode_steps) -> [logits [len(seq), vocab]]`` through the paged
    KV cache: seq 0's prompt in two chunks, the rest batched, then batched decode steps."""
    return _run_paged


def _assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float = 1e-4) -> None:
    assert ours.shape == ref.shape
    err = float((ours - ref).abs().max() / ref.abs().max())
    assert err <= tol, f"max |ours - ref| / max |ref| = {err:.2e} > {tol:.0e}"


@pytest.fixture(scope="session")
def assert_close_rel() -> Callable[..., None]:
    """``assert_close_rel(ours, ref, tol=1e-4)``: max |ours - ref| <= tol * max |ref|."""
    return _assert_close_rel


@pytest.fixture(scope="session")
def self_signed_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for localhost / 127.0.0.1, made by the openssl CLI for TLS tests."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")  # the cryptography package is not either
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


# -- the `cluster` marker (left out by `./dev test --fast`) ----------------------------------------
# An integration module that starts Ray, a `kvrelay` or server process, worker processes or network
# hosts says so in its source; every test in it is marked, so a new module cannot be forgotten.
_STARTS_PROCESSES = (
    "ray_session", "ray.init", "Cluster.start", "subprocess", "multiprocessing", "netns",
)


@functools.cache
def _starts_processes(path: Path) -> bool:
    text = path.read_text()
    return any(word in text for word in _STARTS_PROCESSES)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "integration" in item.path.parts and _starts_processes(item.path):
            item.add_marker(pytest.mark.cluster)
