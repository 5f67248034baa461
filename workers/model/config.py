"""The model's shape, parsed once from a Hugging Face ``config.json`` dict and validated here, at
the edge: everything downstream (model, loaders, engine) trusts a :class:`ModelConfig`.

Both config formats are read (DESIGN.md, Known traps): transformers 5 writes
``rope_parameters = {"rope_type", "rope_theta", ...}``; most published checkpoints still carry
``rope_theta`` and ``rope_scaling = {"type" | "rope_type", ...}`` at the top level.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

# model_type -> the architectures entry transformers writes for it
SUPPORTED_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",  # Llama 2/3.x, SmolLM2, TinyLlama
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",  # q/k/v bias
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """A checkpoint or config kvrelay cannot serve; the message names what is wrong."""


@dataclass(frozen=True, slots=True)
class RopeScaling:
    rope_type: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_max_position_embeddings: int = 8192  # llama3 only


@dataclass(frozen=True, slots=True)
class ModelConfig:
    model_type: str  # key of SUPPORTED_ARCHITECTURES
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # divides num_heads; 1 = multi-query
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2: True; Llama: attention_bias
    o_bias: bool  # Llama attention_bias also covers o_proj; Qwen2 never
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    torch_dtype: str  # the checkpoint's stored dtype ("float32", "bfloat16", "float16")
    sliding_window: int | None = None  # Mistral v0.1: attention window; caps max_context

    @property
    def max_context(self) -> int:
        """Tokens a sequence may hold: beyond a sliding window full attention would be wrong."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Parse a config.json dict; raise :class:`ModelLoadError` naming the problem."""
        if not isinstance(raw, Mapping):
            raise ModelLoadError(f"config must be a JSON object, got {type(raw).__name__}")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ModelLoadError(
                f"unsupported model_type {model_type!r} (architectures {raw.get('architectures')}); "
                f"supported: {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        archs = raw.get("architectures") or [SUPPORTED_ARCHITECTURES[model_type]]
        if SUPPORTED_ARCHITECTURES[model_type] not in archs:
            raise ModelLoadError(
                f"unsupported architectures {archs} for model_type {model_type!r}; "
                f"expected {SUPPORTED_ARCHITECTURES[model_type]}"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"unsupported hidden_act {act!r}: only 'silu' (SwiGLU)")
        if raw.get("mlp_bias"):
            raise ModelLoadError("unsupported mlp_bias=true")

        hidden = _int(raw, "hidden_size")
        heads = _int(raw, "num_attention_heads")
        kv_heads = _int(raw, "num_key_value_heads", default=heads)
        if heads % kv_heads:
            raise ModelLoadError(
                f"num_attention_heads ({heads}) is not a multiple of num_key_value_heads ({kv_heads})"
            )
        head_dim = raw.get("head_dim")
        if head_dim is None:
            if hidden % heads:
                raise ModelLoadError(
                    f"hidden_size ({hidden}) is not divisible by num_attention_heads ({heads}) "
                    "and config has no head_dim"
                )
            head_dim = hidden // heads
        head_dim = _positive("head_dim", head_dim)
        if head_dim % 2:
            raise ModelLoadError(f"head_dim must be even for RoPE, got {head_dim}")

        theta, scaling = _rope(raw)
        attention_bias = bool(raw.get("attention_bias", False))
        qwen = model_type == "qwen2"
        window = raw.get("sliding_window")
        if qwen and not raw.get("use_sliding_window", False):
            window = None
        dtype = str(raw.get("dtype") or raw.get("torch_dtype") or "float32").removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unsupported torch_dtype {dtype!r}; supported: {sorted(_DTYPES)}")
        return cls(
            model_type=model_type,
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=hidden,
            intermediate_size=_int(raw, "intermediate_size"),
            num_layers=_int(raw, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=_int(raw, "max_position_embeddings", default=2048),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=qwen or attention_bias,
            o_bias=attention_bias and not qwen,
            bos_token_id=_opt_id(raw.get("bos_token_id"), "bos_token_id"),
            eos_token_ids=_ids(raw.get("eos_token_id"), "eos_token_id"),
            torch_dtype=dtype,
            sliding_window=None if window is None else _positive("sliding_window", window),
        )


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ModelLoadError(f"config {name} must be a positive integer, got {value!r}")
    return value


def _int(raw: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ModelLoadError(f"config is missing {key!r}")
    return _positive(key, value)


def _opt_id(value: Any, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, list):  # some configs list one bos id
        value = value[0] if value else None
        if value is None:
            return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ModelLoadError(f"config {name} must be a token id, got {value!r}")
    return value


def _ids(value: Any, name: str) -> tuple[int, ...]:
    """eos_token_id is an int in most configs and a list in Llama 3's."""
    values = value if isinstance(value, list) else [value]
    out = tuple(i for i in (_opt_id(v, name) for v in values) if i is not None)
    return out


def _rope(raw: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    params = raw.get("rope_parameters")
    if isinstance(params, Mapping) and "full_attention" in params:  # per-layer-type form
        params = params["full_attention"]
    scaling = raw.get("rope_scaling")
    if params is not None and not isinstance(params, Mapping):
        raise ModelLoadError(f"config rope_parameters must be an object, got {params!r}")
    if scaling is not None and not isinstance(scaling, Mapping):
        raise ModelLoadError(f"config rope_scaling must be an object, got {scaling!r}")
    merged: dict[str, Any] = dict(scaling or {})
    merged.update(params or {})  # transformers 5 format wins where both are present
    theta = merged.get("rope_theta", raw.get("rope_theta", 10000.0))
    if not isinstance(theta, int | float) or theta <= 0:
        raise ModelLoadError(f"config rope_theta must be a positive number, got {theta!r}")
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelLoadError(
            f"unsupported rope scaling type {rope_type!r}; supported: {list(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return float(theta), None
    try:
        factor = float(merged["factor"])
        if rope_type == "linear":
            return float(theta), RopeScaling("linear", factor)
        return float(theta), RopeScaling(
            "llama3",
            factor,
            float(merged["low_freq_factor"]),
            float(merged["high_freq_factor"]),
            int(merged["original_max_position_embeddings"]),
        )
    except KeyError as exc:
        raise ModelLoadError(f"rope scaling {rope_type!r} is missing {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"rope scaling {rope_type!r} has a bad value: {exc}") from None


def parse_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """Accept a torch dtype or its name; only the three kvrelay computes in."""
    if isinstance(dtype, str):
        if dtype.removeprefix("torch.") not in _DTYPES:
            raise ModelLoadError(f"unsupported dtype {dtype!r}; supported: {sorted(_DTYPES)}")
        return _DTYPES[dtype.removeprefix("torch.")]
    if dtype not in _DTYPES.values():
        raise ModelLoadError(f"unsupported dtype {dtype}; supported: {sorted(_DTYPES)}")
    return dtype


def resolve_device_dtype(
    device: str, dtype: torch.dtype | str, *, has_gpu: bool
) -> tuple[str, torch.dtype]:
    """A worker's device and compute dtype from its settings: ``device`` "auto" is CUDA when
    the process was given a GPU, else CPU; ``dtype`` "auto" is bfloat16 on CUDA, float32 on
    CPU. Asking for CUDA without a GPU is an error, not a silent fallback."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not has_gpu:
        raise ValueError("device cuda asked for, but this worker was given no GPU")
    resolved = "cuda" if device == "cuda" or (device == "auto" and has_gpu) else "cpu"
    if dtype == "auto":
        return resolved, torch.bfloat16 if resolved == "cuda" else torch.float32
    return resolved, parse_dtype(dtype)
