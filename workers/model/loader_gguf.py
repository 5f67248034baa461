"""Turn a GGUF file into a Hugging Face folder once, then load that folder.

Export (slow, ~seconds): read with ``gguf.GGUFReader``, dequantize every tensor to float32 with
``gguf.quants.dequantize``, undo llama.cpp's Q/K row permutation, rename to transformers' names,
and write ``model.safetensors`` + ``config.json`` + ``tokenizer.json`` + ``tokenizer_config.json``
under ``<cache>/kvrelay/gguf/<sha256 prefix>-v<format>/``. The folder appears atomically (written
in a temporary sibling, then renamed), so a crash or a concurrent loader never leaves half a
cache behind; later loads read it directly (mmap'd safetensors).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from kvrelay.workers.model.config import ModelLoadError
from kvrelay.workers.model.tokenizer_gguf import build_gguf_tokenizer

CACHE_FORMAT = 1  # bump when the exported folder's content changes
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER = re.compile(r"blk\.(\d+)\.(.+)")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """$XDG_CACHE_HOME/kvrelay/gguf (or ~/.cache/kvrelay/gguf), unless given."""
    if cache_dir is not None:
        return Path(cache_dir)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvrelay" / "gguf"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def export_gguf(path: str | Path, cache_dir: str | Path | None = None) -> Path:
    """The cached HF folder of ``path``, exporting it first if needed."""
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"GGUF file {path} does not exist")
    root = cache_root(cache_dir)
    final = root / f"{file_sha256(path)[:32]}-v{CACHE_FORMAT}"
    if (final / "config.json").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=root))
    try:
        _export(path, tmp)
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():  # not a concurrent winner: a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _open(path: Path) -> Any:
    import gguf

    try:
        return gguf.GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError/struct.error/... on bad files
        raise ModelLoadError(f"{path} is not a readable GGUF file: {exc}") from None


def _metadata(reader: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, field in reader.fields.items():
        try:
            out[key] = field.contents()
        except Exception:  # an unreadable field we do not need must not fail the load
            continue
    return out


def _export(path: Path, folder: Path) -> None:
    from gguf.quants import dequantize

    reader = _open(path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in _ARCHS:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {sorted(_ARCHS)}"
        )
    tensors_by_name = {t.name: t for t in reader.tensors}
    if "rope_freqs.weight" in tensors_by_name:
        raise ModelLoadError(f"{path}: GGUF rope_freqs (Llama 3.1 rope scaling) is not supported")
    config = _config(meta, arch, tie="output.weight" not in tensors_by_name)
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]

    tensors: dict[str, torch.Tensor] = {}
    for name, t in tensors_by_name.items():
        hf_name = _hf_name(name)
        if hf_name is None:
            raise ModelLoadError(f"{path}: unexpected tensor {name!r}")
        try:
            # F32 tensors come back as read-only views of the mmap: copy them out
            array = np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot dequantize {name!r}: {exc}") from None
        # llama.cpp permutes Q/K rows for its interleaved RoPE; qwen2 uses NEOX RoPE (none)
        if arch == "llama" and ".attn_q." in name:
            array = _unpermute(array, heads)
        elif arch == "llama" and ".attn_k." in name:
            array = _unpermute(array, kv_heads)
        tensors[hf_name] = torch.from_numpy(np.ascontiguousarray(array))  # [out, in]

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    backend, tok_config = build_gguf_tokenizer(meta)
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=1))
    # config.json last: its presence marks a complete export
    (folder / "config.json").write_text(json.dumps(config, indent=1))


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    match = _LAYER.fullmatch(name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"model.layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's permute: rows [h, 2, d/2] (interleaved) -> [h, d/2, 2]
    ... -> the rotate-half layout transformers and kvrelay use. w: [n_head * head_dim, ...]."""
    if w.shape[0] % (2 * n_head):
        raise ModelLoadError(f"Q/K rows {w.shape[0]} not divisible by 2 x {n_head} heads")
    half = w.shape[0] // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _config(meta: dict[str, Any], arch: str, tie: bool) -> dict[str, Any]:
    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelLoadError(f"GGUF metadata lacks {arch}.{key}")
        return value

    tokens = meta.get("tokenizer.ggml.tokens")
    heads = int(get("attention.head_count"))
    config: dict[str, Any] = {
        "model_type": arch,
        "architectures": [_ARCHS[arch]],
        "vocab_size": int(get("vocab_size", len(tokens) if tokens else None)),
        "hidden_size": int(get("embedding_length")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv", heads)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
        "torch_dtype": "float32",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    key_length = meta.get(f"{arch}.attention.key_length")
    if key_length is not None:
        config["head_dim"] = int(key_length)
    scaling = meta.get(f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        config["rope_scaling"] = {
            "rope_type": scaling,
            "factor": float(get("rope.scaling.factor", 1.0)),
        }
    return config
