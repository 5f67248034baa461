"""tests/gpu: every test here is marked ``gpu`` and skips, saying why, without a CUDA device.

GPU machines lack the default GGUF (and the root conftest's ``make_checkpoint`` needs it for its
tokenizer), so the fixtures here write their own Hugging Face folder: a random-weight Llama from
transformers and a word-level tokenizer built with the ``tokenizers`` library.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

GPU_VOCAB = 512


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


def _write_tokenizer(folder: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": False}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="session")
def make_gpu_llama(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``make_gpu_llama(seed=0, dtype=torch.float32, **config) -> folder``: a random-weight
    Llama saved by transformers (vocab 512, 4 layers, 8 heads, 2 KV heads, head_dim 32) with a
    word-level tokenizer. Norm weights are drawn around 1 so they count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    counter = iter(range(1_000_000))

    def make(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides: Any) -> Path:
        folder = tmp_path_factory.mktemp(f"gpu-llama-{next(counter)}")
        base: dict[str, Any] = {
            "vocab_size": GPU_VOCAB,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 8,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": False,
            "initializer_range": 0.08,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
        }
        base.update(overrides)
        torch.manual_seed(seed)
        model: Any = LlamaForCausalLM(LlamaConfig(**base))
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.normal_(1.0, 0.1)
        model.to(dtype).save_pretrained(folder)
        _write_tokenizer(folder, int(base["vocab_size"]))
        return folder

    return make
