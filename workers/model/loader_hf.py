"""Load a Hugging Face folder: config.json, model.safetensors or sharded
model-0000x-of-0000y.safetensors (with model.safetensors.index.json), tokenizer files."""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from kvrelay.workers.model.config import ModelConfig, ModelLoadError
from kvrelay.workers.model.llama import LlamaModel
from kvrelay.workers.model.tokenizer import Tokenizer


def read_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder} has no config.json")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None
    return ModelConfig.from_hf(raw)


def weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(f"malformed {index}: {exc!r}") from None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise ModelLoadError(f"{index.name} lists shards that are not in {folder}: {missing}")
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    raise ModelLoadError(f"{folder} has no model.safetensors nor model.safetensors.index.json")


def load_weights(model: LlamaModel, files: list[Path]) -> None:
    """Copy tensors from the safetensors files into ``model`` (dtype/device converted by copy)."""
    with ExitStack() as stack:
        owner: dict[str, Any] = {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(str(path), framework="pt", device="cpu"))
            except Exception as exc:  # safetensors raises its own error types for bad headers
                raise ModelLoadError(f"cannot read safetensors file {path}: {exc}") from None
            for name in handle.keys():
                owner[name] = handle

        def get(name: str) -> torch.Tensor | None:
            handle = owner.get(name)
            return None if handle is None else handle.get_tensor(name)

        model.load_hf_weights(get)


def load_hf_folder(
    folder: Path, dtype: torch.dtype, device: torch.device | str
) -> tuple[ModelConfig, LlamaModel, Tokenizer]:
    if not folder.is_dir():
        raise ModelLoadError(f"model folder {folder} does not exist")
    config = read_config(folder)
    files = weight_files(folder)
    tokenizer = Tokenizer.from_dir(folder, config)
    model = LlamaModel(config, dtype=dtype, device=device)
    load_weights(model, files)
    return config, model.eval(), tokenizer
