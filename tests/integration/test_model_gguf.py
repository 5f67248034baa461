"""GGUF loading against transformers' own GGUF loader: a tiny GGUF written here from a random
checkpoint the way llama.cpp's converter writes it (Q/K rows permuted, some tensors Q8_0), the
export cache, and the default SmolLM2 GGUF (model logits, tokenizer, chat template)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from kvrelay.workers.model.config import ModelLoadError
from kvrelay.workers.model.loader import load_model
from kvrelay.workers.model.loader_gguf import export_gguf

_VOCAB_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_GGUF = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    # convert_hf_to_gguf.py LlamaModel.permute: rotate-half rows -> interleaved pairs
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(ckpt_dir: Path, out: Path) -> None:
    """A llama GGUF from an HF folder: F32 norms, Q8_0 matrices, byte-level BPE tokenizer."""
    import gguf
    from safetensors.torch import load_file

    cfg = json.loads((ckpt_dir / "config.json").read_text())
    tok = json.loads((ckpt_dir / "tokenizer.json").read_text())
    tok_cfg = json.loads((ckpt_dir / "tokenizer_config.json").read_text())
    w = gguf.GGUFWriter(str(out), "llama")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_parameters"]["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    tokens = sorted(tok["model"]["vocab"], key=tok["model"]["vocab"].get)
    special = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3 if t in special else 1 for t in tokens])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_bos_token_id(cfg["bos_token_id"])
    w.add_eos_token_id(cfg["eos_token_id"])
    w.add_add_bos_token(False)
    w.add_chat_template(tok_cfg["chat_template"])
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for name, tensor in load_file(str(ckpt_dir / "model.safetensors")).items():
        array = tensor.float().numpy()
        if name in _VOCAB_GGUF:
            gname = _VOCAB_GGUF[name]
        else:
            _, _, layer, *rest = name.split(".")
            module, kind = ".".join(rest[:-1]), rest[-1]
            gname = f"blk.{layer}.{_LAYER_GGUF[module]}.{kind}"
        if ".attn_q." in gname:
            array = _llamacpp_permute(array, heads)
        elif ".attn_k." in gname:
            array = _llamacpp_permute(array, kv_heads)
        if array.ndim == 2:
            q8 = gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(gname, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def tiny_gguf(make_checkpoint: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    """A single-KV-head Llama checkpoint and its GGUF (Q8_0 matrices, permuted Q/K rows)."""
    ckpt = make_checkpoint("llama", num_key_value_heads=1, num_attention_heads=4, seed=11)
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(ckpt.path, path)
    return ckpt, path


@pytest.fixture(scope="module")
def tiny_export(tiny_gguf: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    cache = tmp_path_factory.mktemp("cache")
    return cache, export_gguf(tiny_gguf[1], cache)


def test_tiny_gguf_matches_transformers_gguf_loader(
    tiny_gguf: Any, tiny_export: Any, run_paged: Any, assert_close_rel: Any
) -> None:
    from transformers import AutoModelForCausalLM

    ckpt, gguf_path = tiny_gguf
    ours = load_model(gguf_path, cache_dir=tiny_export[0])
    assert not ours.config.tie_word_embeddings and ours.config.num_kv_heads == 1
    ids = ours.tokenizer.apply_chat_template([{"role": "user", "content": "Bonjour, ça va?"}])
    hf = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).eval()
    with torch.inference_mode():
        ref = hf(torch.tensor([ids])).logits[0]
    assert_close_rel(run_paged(ours.model, [ids], 3)[0], ref)
    # Q8_0 noise is visible: the dequantized model is not the fp32 one
    with pytest.raises(AssertionError):
        assert_close_rel(run_paged(load_model(ckpt.path).model, [ids], 0)[0], ref)


def test_export_cache_is_keyed_atomic_and_reused(
    tiny_gguf: Any, tiny_export: Any, tmp_path: Path
) -> None:
    cache, folder = tiny_export
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no temp dir left behind
    assert (folder / "config.json").is_file() and (folder / "tokenizer.json").is_file()
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    copy = tmp_path / "copy.gguf"  # same bytes under another name: same entry, no re-export
    copy.write_bytes(tiny_gguf[1].read_bytes())
    start = time.perf_counter()
    assert export_gguf(copy, cache) == folder
    assert time.perf_counter() - start < 1.0  # hash + lookup, no GGUF parse
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    with copy.open("r+b") as f:  # other bytes: a cache miss (and here a bad file)
        f.write(b"FUGG")
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        export_gguf(copy, cache)
    assert [p.name for p in cache.iterdir()] == [folder.name]  # the failed export left nothing


def test_bad_gguf_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        load_model(bad, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache").iterdir())


def test_sentencepiece_gguf_tokenizer_matches_transformers(tmp_path: Path) -> None:
    """A Llama-2 / TinyLlama style vocabulary (byte-fallback tokens, scores, no merges)."""
    import gguf
    from tokenizers import SentencePieceBPETokenizer
    from transformers import AutoTokenizer

    from kvrelay.workers.model.tokenizer import Tokenizer
    from kvrelay.workers.model.tokenizer_gguf import build_gguf_tokenizer

    corpus = ["The quick brown fox jumps over the lazy dog.", "Hello world!", "naïve café"] * 50
    spm = SentencePieceBPETokenizer()
    spm.train_from_iterator(corpus, vocab_size=300, min_frequency=1, show_progress=False)
    learned = [t for t, _ in sorted(spm.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *learned]
    meta: dict[str, Any] = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(learned),
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(i) for i in range(len(learned))],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
    }
    w = gguf.GGUFWriter(str(tmp_path / "spm.gguf"), "llama")
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(8)
    w.add_head_count(2)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(meta["tokenizer.ggml.scores"])
    w.add_token_types(meta["tokenizer.ggml.token_type"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ref = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")

    backend, config = build_gguf_tokenizer(meta)
    assert config["add_bos_token"] and config["bos_token"] == "<s>"
    specials = {k: v for k, v in config.items() if k.endswith("_token")}
    ours = Tokenizer(
        backend, special_tokens=specials, add_bos_token=True, eos_token_ids=[2], chat_template=None
    )
    for text in ["The quick brown fox", "  Hello   world!", "naïve 日本 😀", "</s>hi<s>", "a\n\tb"]:
        ids = ours.encode(text)
        assert ids == ref.encode(text)
        assert ids[0] == 1  # BOS by default for sentencepiece vocabularies
        for skip in (True, False):
            assert ours.decode(ids, skip) == ref.decode(ids, skip_special_tokens=skip)
    assert any(3 <= i < 259 for i in ours.encode("日本"))  # byte fallback in use
