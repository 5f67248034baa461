"""A small deterministic ``ClusterBackend`` for frontend tests and demos (no model, no Ray).

* Tokenizer: UTF-8 bytes; token id = byte value, ``EOS = 256``, vocab 260. Chat template:
  ``<|role|>content\\n`` per message, then ``<|assistant|>``.
* Generation: output token i is prompt[i % len(prompt)] (greedy); with temperature > 0 and a
  seed, a seeded shuffle of the prompt's bytes — deterministic per (seed, position).
  One token per step, ``step_delay_s`` apart. Stop token ids, stop strings (text cut before the
  stop string), EOS (unless ignore_eos) and max_tokens end a request.
* KV "blocks": ceil(tokens / block_size) per request, allocated as it grows and freed when the
  request ends, is cancelled or its iterator is closed. ``cluster_status`` reports them, so leak
  checks need only the public protocol (and work the same against the real cluster).
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeAlias, TypeVar

from kvrelay.cluster.api.backend import (
    ClusterBackend,
    ClusterStatus,
    GenerateRequest,
    ModelInfo,
    Readiness,
    WorkerStatus,
)
from kvrelay.cluster.api.servers import serve_frontends
from kvrelay.workers.types import FinishReason, TokenEvent

EOS = 256
T = TypeVar("T")
VOCAB = 260


class ByteTokenizer:
    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: Sequence[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> list[int]:
        text = "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages)
        return self.encode(text + "<|assistant|>")


class EchoBackend:
    def __init__(
        self,
        *,
        model: str = "echo",
        max_context: int = 2048,
        step_delay_s: float = 0.001,
        block_size: int = 16,
        total_blocks: int = 100_000,
    ) -> None:
        self._model = ModelInfo(model, max_context, VOCAB, (EOS,))
        self._tokenizer = ByteTokenizer()
        self.step_delay_s = step_delay_s
        self.block_size = block_size
        self.total_blocks = total_blocks
        self._blocks: dict[str, int] = {}  # request id -> blocks held
        self._cancelled: set[str] = set()
        self.drained: list[str] = []
        self.preempted: list[tuple[str, float]] = []
        self.started = 0  # requests that reached generate()
        self.peak_running = 0  # most requests generating at once
        self.last_prompt: tuple[int, ...] = ()
        self.admitted: list[GenerateRequest] = []  # as the frontend built them

    # -- ClusterBackend --------------------------------------------------------------------
    def models(self) -> Sequence[ModelInfo]:
        return (self._model,)

    def tokenizer(self, model: str) -> ByteTokenizer:
        return self._tokenizer

    def generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        return self._generate(request)

    async def undrain(self, worker_id: str) -> bool:
        if worker_id in self.drained:
            self.drained.remove(worker_id)
            return True
        return False

    async def admit(self, request: GenerateRequest) -> None:
        self.admitted.append(request)  # one always-ready "worker"

    def readiness(self) -> Readiness:
        return Readiness(True)

    async def cancel(self, request_id: str) -> bool:
        if request_id in self._blocks:
            self._cancelled.add(request_id)
            return True
        return False

    async def cluster_status(self) -> ClusterStatus:
        used = sum(self._blocks.values())
        worker = WorkerStatus(
            worker_id="echo-0",
            role="colocated",
            healthy=True,
            draining="echo-0" in self.drained,
            node="local",
            kv_blocks={"gpu": {"used": used, "free": self.total_blocks - used}},
            running=len(self._blocks),
        )
        return ClusterStatus(workers=(worker,), in_flight=len(self._blocks))

    async def drain(self, worker_id: str) -> bool:
        if worker_id != "echo-0":
            return False
        self.drained.append(worker_id)
        return True

    async def notify_preemption(self, worker_id: str, deadline_s: float) -> bool:
        if worker_id != "echo-0":
            return False
        self.preempted.append((worker_id, deadline_s))
        return True

    # -- internals -------------------------------------------------------------------------
    @property
    def blocks_in_use(self) -> int:
        return sum(self._blocks.values())

    def _token_at(self, request: GenerateRequest, i: int) -> int:
        prompt = request.prompt_token_ids
        sp = request.sampling
        if sp.greedy or sp.seed is None:
            return prompt[i % len(prompt)]
        return random.Random(sp.seed * 1_000_003 + i).choice(prompt)

    async def _generate(self, request: GenerateRequest) -> AsyncIterator[TokenEvent]:
        rid = request.request_id
        if rid in self._blocks:
            raise RuntimeError(f"duplicate request id {rid}")
        self.started += 1
        self.last_prompt = request.prompt_token_ids
        self.peak_running = max(self.peak_running, len(self._blocks) + 1)
        sp = request.sampling
        n_prompt = len(request.prompt_token_ids)
        self._blocks[rid] = math.ceil(n_prompt / self.block_size)
        out: list[int] = []
        text = ""
        try:
            while True:
                await asyncio.sleep(self.step_delay_s)
                if rid in self._cancelled:
                    yield TokenEvent(rid, (), finish_reason=FinishReason.ABORT)
                    return
                tok = self._token_at(request, len(out))
                out.append(tok)
                self._blocks[rid] = math.ceil((n_prompt + len(out)) / self.block_size)
                finish: FinishReason | None = None
                if tok in sp.stop_token_ids or (tok == EOS and not sp.ignore_eos):
                    finish = FinishReason.STOP
                new_text = self._tokenizer.decode(out)
                for stop in sp.stop:
                    cut = new_text.find(stop)
                    if cut >= 0:
                        new_text, finish = new_text[:cut], FinishReason.STOP
                if finish is None and (
                    len(out) >= sp.max_tokens or n_prompt + len(out) >= self._model.max_context
                ):
                    finish = FinishReason.LENGTH
                # hold back text a stop string or an unfinished UTF-8 sequence may still change
                upto = len(new_text)
                if finish is None:
                    upto -= max((len(s) - 1 for s in sp.stop), default=0)
                    while upto > len(text) and new_text[upto - 1] == "\ufffd":
                        upto -= 1
                upto = max(upto, len(text))
                delta, text = new_text[len(text) : upto], new_text[:upto]
                yield TokenEvent(rid, (tok,), delta, finish, 0)
                if finish is not None:
                    return
        finally:
            self._blocks.pop(rid, None)
            self._cancelled.discard(rid)


BackendSource: TypeAlias = (
    "ClusterBackend | Callable[[], ClusterBackend | Awaitable[ClusterBackend]]"
)


async def blocks_in_use(backend: ClusterBackend) -> int:
    """KV blocks referenced by requests, summed over workers and tiers (from cluster_status)."""
    status = await backend.cluster_status()
    return sum(states.get("used", 0) for w in status.workers for states in w.kv_blocks.values())


async def wait_blocks_free(backend: ClusterBackend, timeout_s: float = 5.0) -> int:
    """Wait until no KV block is in use (a closed stream frees its blocks within an engine
    step, asynchronously); returns the blocks still in use when ``timeout_s`` ran out (0: ok)."""
    return await _wait_blocks(backend, timeout_s, lambda used: used == 0)


async def wait_blocks_held(backend: ClusterBackend, timeout_s: float = 5.0) -> int:
    """Wait until some KV block is in use (status may lag behind the stream by a heartbeat);
    returns the blocks in use (0: none appeared within ``timeout_s``)."""
    return await _wait_blocks(backend, timeout_s, lambda used: used > 0)


async def _wait_blocks(
    backend: ClusterBackend, timeout_s: float, done: Callable[[int], bool]
) -> int:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout_s
    while True:
        used = await blocks_in_use(backend)
        if done(used) or loop.time() >= end:
            return used
        await asyncio.sleep(0.01)


class FrontendThread:
    """Both frontends on an event loop in a background thread, for tests that drive them with
    blocking clients (the SDK's Client, the openai package)::

        with FrontendThread(backend, api_keys=["k"]) as srv:
            Client(f"127.0.0.1:{srv.grpc_port}").generate(...)
            assert srv.call(wait_blocks_free(backend)) == 0
    """

    def __init__(self, backend: BackendSource, **serve_kwargs: Any) -> None:
        self._source = backend
        is_factory = isinstance(backend, type) or not hasattr(backend, "generate")
        self.backend: Any = None if is_factory else backend
        self._kwargs = {"grpc_port": 0, "http_port": 0, "host": "127.0.0.1", **serve_kwargs}
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.handle: Any = None

    async def _start(self) -> Any:
        if self.backend is None:  # a factory: build the backend on the serving loop
            made = self._source()  # type: ignore[operator,misc]
            self.backend = await made if inspect.isawaitable(made) else made
        return await serve_frontends(self.backend, **self._kwargs)

    async def _stop(self) -> None:
        try:
            if self.handle is not None:
                await self.handle.stop(0.5)
        finally:
            if self.backend is not self._source and hasattr(self.backend, "aclose"):
                await self.backend.aclose()

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    @property
    def grpc_port(self) -> int:
        return int(self.handle.grpc_port)

    @property
    def http_port(self) -> int:
        return int(self.handle.http_port)

    def __enter__(self) -> FrontendThread:
        self._thread.start()
        try:
            self.handle = self.call(self._start(), timeout_s=300)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            self.call(self._stop(), timeout_s=120)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()
