"""Tokenizer wrapper semantics on a tiny trained BPE: BOS policy, special tokens, chat template
rendering the way transformers renders (trim/lstrip blocks, raise_exception, special-token
variables), and reading a folder's tokenizer files. Parity with transformers on the real
SmolLM2 tokenizer is in tests/integration/test_model_gguf_default.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from kvrelay.workers.model.config import ModelConfig, ModelLoadError
from kvrelay.workers.model.tokenizer import Tokenizer

SPECIALS = ["<unk>", "<s>", "</s>"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}\n"
    "  {% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}\n"
    "  [{{ m['role'] }}] {{ m['content'] | tojson }}{{ eos_token }}\n"
    "{% endfor %}\n"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)


@pytest.fixture(scope="module")
def backend() -> HFTokenizer:
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(["hello world, the quick brown fox", "café ünïcode"] * 20, trainer)
    return tok


def make(backend: HFTokenizer, add_bos: bool, template: str | None = TEMPLATE) -> Tokenizer:
    return Tokenizer(
        backend,
        special_tokens={"bos_token": "<s>", "eos_token": "</s>"},
        add_bos_token=add_bos,
        eos_token_ids=[2, 2],
        chat_template=template,
    )


def test_bos_only_when_configured(backend: HFTokenizer) -> None:
    plain, with_bos = make(backend, False), make(backend, True)
    ids = plain.encode("hello world")
    assert ids and 1 not in ids
    assert with_bos.encode("hello world") == [1, *ids]
    assert with_bos.encode("<s>hello world") == [1, *ids]  # no double BOS
    assert with_bos.encode("hello", add_special_tokens=False)[0] != 1
    assert plain.eos_token_ids == (2,)


def test_decode_round_trip_and_special_tokens(backend: HFTokenizer) -> None:
    tok = make(backend, True)
    ids = tok.encode("café ünïcode hello</s>")
    assert ids[-1] == 2
    assert tok.decode(ids) == "café ünïcode hello"
    assert tok.decode(ids, skip_special_tokens=False) == "<s>café ünïcode hello</s>"


def test_chat_template_renders_like_transformers(backend: HFTokenizer) -> None:
    tok = make(backend, True)
    chat = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "hi"}]
    # trim_blocks + lstrip_blocks: block tags leave no newline or indentation behind
    expected = '<s>  [user] "héllo"</s>\n  [assistant] "hi"</s>\n'
    assert tok.render_chat(chat, add_generation_prompt=False) == expected
    assert tok.render_chat(chat).endswith("</s>\n[assistant]")
    ids = tok.apply_chat_template(chat)
    assert ids[0] == 1 and ids.count(1) == 1  # the template's BOS, not a second one
    assert tok.decode(ids, skip_special_tokens=False) == tok.render_chat(chat)


def test_template_raise_exception_is_a_value_error(backend: HFTokenizer) -> None:
    with pytest.raises(ValueError, match="no system role"):
        make(backend, False).render_chat([{"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="no chat template"):
        make(backend, False, template=None).render_chat([{"role": "user", "content": "x"}])
    with pytest.raises(ModelLoadError, match="does not compile"):
        make(backend, False, template="{% for %}")


def _config(**extra: object) -> ModelConfig:
    raw = {
        "model_type": "llama",
        "vocab_size": 300,
        "hidden_size": 8,
        "intermediate_size": 8,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "bos_token_id": 1,
        "eos_token_id": 2,
        **extra,
    }
    return ModelConfig.from_hf(raw)


def test_from_dir_reads_template_file_and_generation_eos(
    backend: HFTokenizer, tmp_path: Path
) -> None:
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "add_bos_token": True,
                "bos_token": {"content": "<s>"},
                "chat_template": [{"name": "default", "template": "{{ bos_token }}A"}],
            }
        )
    )
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path, _config())
    assert tok.render_chat([]) == "<s>A"
    assert tok.special_tokens["eos_token"] == "</s>"  # from the config's eos id
    assert tok.eos_token_ids == (2, 0)
    assert tok.encode("hello")[0] == 1
    (tmp_path / "chat_template.jinja").write_text("B{{ eos_token }}")  # transformers 5 layout
    assert Tokenizer.from_dir(tmp_path, _config()).render_chat([]) == "B</s>"


def test_from_dir_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"no tokenizer\.json"):
        Tokenizer.from_dir(tmp_path, _config())
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot read"):
        Tokenizer.from_dir(tmp_path, _config())


def test_encoding_lets_other_threads_run(backend: HFTokenizer) -> None:
    """A long prompt tokenized on one thread (the serving frontends' worker thread) leaves the
    GIL to the others (their event loop): a thread that needs the GIL for every count keeps
    counting while ``encode`` runs. ``tokenizers.Tokenizer.encode`` holds the GIL throughout
    (this thread would count at most once or twice); ``encode_batch`` releases it."""
    tok = make(backend, add_bos=False)
    text = "hello world, the quick brown fox " * 20_000  # ~100k tokens: tens of ms
    stop = threading.Event()
    counts = [0]

    def count() -> None:
        while not stop.is_set():
            counts[0] += 1
            time.sleep(0)  # gives the GIL up, so the encoding thread can take it

    counter = threading.Thread(target=count)
    counter.start()
    try:
        while counts[0] == 0:  # the counter runs
            time.sleep(0)
        before = counts[0]
        ids = tok.encode(text)
        during = counts[0] - before
    finally:
        stop.set()
        counter.join()
    assert ids == backend.encode(text).ids
    assert during >= 20, during
