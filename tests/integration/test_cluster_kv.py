"""KV directory, KV-aware routing, conditional disaggregation and cross-worker prefix pulls on a
real local Ray cluster: outputs equal the colocated engine's with each feature on."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvrelay.cluster.runtime.config import ServeConfig
from kvrelay.cluster.runtime.serve import Cluster
from kvrelay.workers.llm import LLM
from kvrelay.workers.types import SamplingParams

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm() -> LLM:
    """The default model: the prefix tests need its costs (a pull must beat recomputing) and
    its words (a reply re-tokenizes to the same ids in the next turn's prompt)."""
    return LLM(None)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[str, LLM]:
    """A 2-layer random-weight Llama with the default tokenizer, for the tests that check
    routing alone: the same tokens as one engine, milliseconds a step instead of ~60 ms."""
    return str(tiny_model_dir), LLM(str(tiny_model_dir))


def _cluster(model: str | None = None, **kw: object) -> Cluster:
    return Cluster.start(ServeConfig(model=model, grpc_port=None, http_port=None,
                                     threads_per_worker=1, **kw))  # type: ignore[arg-type]


def _turns(llm: LLM) -> list[list[dict[str, str]]]:
    """A three-turn conversation, each turn's prompt holding the earlier turns."""
    messages = [{"role": "user", "content": "Tell me a short story about a lighthouse keeper "
                 "who finds a message in a bottle. Give the keeper a name and a dog."}]
    convo = []
    for follow_up in ("What was the dog's name?", "Now retell it as a poem."):
        convo.append(list(messages))
        reply = llm.generate([llm.tokenizer.apply_chat_template(messages)], GREEDY)[0].text
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": follow_up}]
    convo.append(list(messages))
    return convo


def test_multi_turn_prefills_locally_on_decode(ray_session: None, llm: LLM, wait) -> None:
    prompts = [llm.tokenizer.apply_chat_template(m) for m in _turns(llm)]
    expected = [list(o.token_ids) for o in llm.generate(prompts, GREEDY)]
    with _cluster(prefill_workers=1, decode_workers=1) as cluster:
        decode = next(w for w, r in cluster.workers().items() if r == "decode")
        for i, prompt in enumerate(prompts):
            if i:  # the earlier turn's KV must be visible in the directory first
                wait(lambda p=prompt: cluster.call("match_prefix", p).get(decode, 0) >= 64)
            tokens, _ = cluster.complete(prompt, GREEDY)
            assert tokens == expected[i]
        counters = cluster.counters()
        assert counters["local_prefills"] >= 1  # later turns skipped the handoff
        assert counters["handoffs"] + counters["local_prefills"] == len(prompts)
        assert all(f["used"] == 0 for f in cluster.integrity().values())


def test_prefix_pull_instead_of_recompute(ray_session: None, llm: LLM, wait) -> None:
    base = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Here is a long document about rivers. " * 12
          + "Summarise it."}])
    second = llm.tokenizer.apply_chat_template(
        [{"role": "user", "content": "Here is a long document about rivers. " * 12
          + "List three facts from it."}])
    expected = [list(o.token_ids) for o in llm.generate([base, second], GREEDY)]
    with _cluster(prefill_workers=1, decode_workers=1, conditional_disagg=False) as cluster:
        workers = cluster.workers()
        prefill = next(w for w, r in workers.items() if r == "prefill")
        decode = next(w for w, r in workers.items() if r == "decode")
        assert cluster.complete(base, GREEDY)[0] == expected[0]
        cluster.call("clear_prefix_cache", prefill)  # P forgets; D still holds the prefix
        wait(lambda: cluster.call("match_prefix", second).get(prefill, 0) == 0
              and cluster.call("match_prefix", second).get(decode, 0) >= 64)
        assert cluster.complete(second, GREEDY)[0] == expected[1]
        counters = cluster.counters()
        assert counters["pulls"] == 1 and counters["pull_bytes"] > 0
        assert all(f["used"] == 0 and f["reservations"] == 0 for f in cluster.integrity().values())


@pytest.mark.parametrize("router", ["kv", "round_robin"])
def test_routers_give_identical_outputs(
    ray_session: None, tiny: tuple[str, LLM], router: str
) -> None:
    model, llm = tiny
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Fact {i} about "
               "the ocean, please, in one line."}]) for i in range(6)]
    expected = [list(o.token_ids) for o in llm.generate(prompts, GREEDY)]
    with _cluster(model, prefill_workers=1, decode_workers=2, router=router) as cluster:
        assert [cluster.complete(p, GREEDY)[0] for p in prompts] == expected


def test_dead_worker_leaves_directory_and_routes(
    ray_session: None, tiny: tuple[str, LLM], wait
) -> None:
    model, llm = tiny
    prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": f"Name {i} "
               "colours of the rainbow."}]) for i in range(6)]
    expected = [list(o.token_ids) for o in llm.generate(prompts, GREEDY)]
    with _cluster(model, prefill_workers=1, decode_workers=2) as cluster:
        for p, e in zip(prompts[:3], expected[:3], strict=True):
            assert cluster.complete(p, GREEDY)[0] == e
        victim = next(w for w, r in cluster.workers().items() if r == "decode")
        wait(lambda: victim in cluster.call("directory_workers"))
        cluster.kill_worker(victim)
        wait(lambda: victim not in cluster.workers())
        assert victim not in cluster.call("directory_workers")  # dropped with the worker
        for p, e in zip(prompts[3:], expected[3:], strict=True):
            assert cluster.complete(p, GREEDY)[0] == e
        assert victim not in cluster.workers()
