"""Malformed checkpoints give a ModelLoadError naming what is wrong (never a crash or a model
that loads with garbage)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from kvrelay.workers.model.config import ModelLoadError
from kvrelay.workers.model.loader import load_model


@pytest.fixture
def broken(tiny_model_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    return folder


def edit_config(folder: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((folder / "config.json").read_text())
    change(config)
    (folder / "config.json").write_text(json.dumps(config))


def edit_weights(folder: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


def test_tiny_model_loads(tiny_model_dir: Path) -> None:
    loaded = load_model(str(tiny_model_dir))
    assert loaded.model_id == tiny_model_dir.name and loaded.config.num_layers == 2
    assert loaded.config.tie_word_embeddings and loaded.model.lm_head is None


def test_unknown_architecture(broken: Path) -> None:
    edit_config(
        broken, lambda c: c.update(model_type="falcon", architectures=["FalconForCausalLM"])
    )
    with pytest.raises(ModelLoadError, match="unsupported model_type 'falcon'"):
        load_model(broken)


def test_bad_rope_scaling_type(broken: Path) -> None:
    edit_config(broken, lambda c: c.update(rope_parameters={"rope_type": "dynamic", "factor": 2.0}))
    with pytest.raises(ModelLoadError, match="unsupported rope scaling type 'dynamic'"):
        load_model(broken)


def test_missing_tensor(broken: Path) -> None:
    edit_weights(broken, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        ModelLoadError, match=r"missing tensor 'model\.layers\.1\.self_attn\.k_proj"
    ):
        load_model(broken)


def test_wrong_shape(broken: Path) -> None:
    edit_weights(
        broken, lambda t: t.update({"model.norm.weight": t["model.norm.weight"][:-1].clone()})
    )
    with pytest.raises(ModelLoadError, match=r"'model\.norm\.weight' has shape \(63,\)"):
        load_model(broken)


def test_untied_config_without_lm_head(broken: Path) -> None:
    edit_config(broken, lambda c: c.update(tie_word_embeddings=False))
    with pytest.raises(ModelLoadError, match=r"missing tensor 'lm_head\.weight'"):
        load_model(broken)


def test_missing_files_and_bad_sources(broken: Path, tmp_path: Path) -> None:
    (broken / "model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ModelLoadError, match="cannot read safetensors"):
        load_model(broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"no model\.safetensors"):
        load_model(broken)
    (broken / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(ModelLoadError, match="lists shards that are not in"):
        load_model(broken)
    (broken / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"no config\.json"):
        load_model(broken)
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"neither a folder nor a \.gguf"):
        load_model(tmp_path / "weights.bin")
