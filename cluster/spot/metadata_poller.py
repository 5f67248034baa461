"""Cloud metadata poller: asks the instance's metadata endpoint whether it is being reclaimed.

Two answer styles (``parser``):

* ``instance-action`` (AWS ``/latest/meta-data/spot/instance-action``): 404 while nothing is
  scheduled; 200 with ``{"action": "terminate"|"stop"|"hibernate", "time": "...Z"}`` when it
  is: deadline = that time.
* ``preempted`` (GCP ``/computeMetadata/v1/instance/preempted``, with header
  ``Metadata-Flavor: Google``): body ``TRUE`` / ``FALSE``; deadline = now + ``grace_s``.

``token_url`` (AWS IMDSv2): the poller first PUTs there for a session token and sends it as
``X-aws-ec2-metadata-token``. A notice fires once; the poller re-arms when the endpoint says
"nothing" again. Errors (network, status, malformed body) are logged and counted, and polling
goes on. Runs on the event loop (aiohttp); nothing blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from kvrelay.cluster.spot.notices import NoticeKind, NoticeSink, PreemptionNotice, parse_rfc3339

if TYPE_CHECKING:
    import aiohttp

log = logging.getLogger(__name__)

_TOKEN_HEADER = "X-aws-ec2-metadata-token"
_TOKEN_TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"


@dataclass(frozen=True)
class MetadataPollerConfig:
    url: str
    target: str  # the node (or worker) this instance is
    parser: Literal["instance-action", "preempted"] = "instance-action"
    kind: NoticeKind = NoticeKind.NODE
    interval_s: float = 5.0
    timeout_s: float = 2.0
    headers: Mapping[str, str] = field(default_factory=dict)
    grace_s: float = 30.0  # for "preempted": how long after TRUE the instance lives
    token_url: str | None = None
    token_ttl_s: int = 21600

    def __post_init__(self) -> None:
        for u in (self.url, self.token_url):
            if u is not None and not u.startswith(("http://", "https://")):
                raise ValueError(f"metadata URL must be http(s)://..., got {u!r}")
        if self.parser not in ("instance-action", "preempted"):
            raise ValueError(
                f"parser must be 'instance-action' or 'preempted', got {self.parser!r}"
            )
        for name in ("interval_s", "timeout_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be positive, got {v}")
        if not (math.isfinite(self.grace_s) and self.grace_s >= 0):
            raise ValueError(f"grace_s must be >= 0, got {self.grace_s}")
        if not self.target:
            raise ValueError("target must name the node or worker")


@dataclass(frozen=True, slots=True)
class Reclaim:
    deadline_s: float
    reason: str


def parse_instance_action(status: int, body: str, now: float) -> Reclaim | None:
    """AWS style. None: nothing scheduled. ValueError: an answer we cannot trust."""
    if status == 404:
        return None
    if status != 200:
        raise ValueError(f"instance-action answered HTTP {status}")
    try:
        doc = json.loads(body)
    except json.JSONDecodeError as e:
        raise ValueError(f"instance-action body is not JSON: {body[:80]!r}") from e
    if not isinstance(doc, dict) or "action" not in doc:
        raise ValueError(f"instance-action body lacks 'action': {body[:80]!r}")
    action = str(doc["action"])
    if action not in ("terminate", "stop", "hibernate"):
        raise ValueError(f"unknown instance action {action!r}")
    deadline = parse_rfc3339(doc["time"]) if "time" in doc else now
    return Reclaim(deadline, f"instance-action {action}")


def parse_preempted(status: int, body: str, now: float, grace_s: float) -> Reclaim | None:
    """GCP style: TRUE / FALSE."""
    if status != 200:
        raise ValueError(f"preempted endpoint answered HTTP {status}")
    word = body.strip().upper()
    if word == "FALSE":
        return None
    if word == "TRUE":
        return Reclaim(now + grace_s, "preempted TRUE")
    raise ValueError(f"preempted body is neither TRUE nor FALSE: {body[:80]!r}")


class MetadataPoller:
    def __init__(
        self,
        config: MetadataPollerConfig,
        sink: NoticeSink,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.config = config
        self._sink = sink
        self._session = session
        self._own_session = session is None
        self._token: str | None = None
        self._fired = False
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.errors = 0
        self.polls = 0

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name="metadata-poller")
        return self._task

    async def stop(self) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def run(self) -> None:
        while not self._stop.is_set():
            await self.poll_once()
            try:
                await asyncio.wait_for(self._stop.wait(), self.config.interval_s)
            except asyncio.TimeoutError:
                pass

    async def poll_once(self) -> PreemptionNotice | None:
        """One request; the notice it fired (at most once per reclaim), or None."""
        import aiohttp  # here, not at import: every worker imports this module (0.27 s)

        cfg = self.config
        self.polls += 1
        try:
            status, body = await self._fetch()
            now = time.time()
            if cfg.parser == "instance-action":
                found = parse_instance_action(status, body, now)
            else:
                found = parse_preempted(status, body, now, cfg.grace_s)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
            self.errors += 1
            log.warning("metadata poll of %s failed: %s: %s", cfg.url, type(e).__name__, e)
            return None
        if found is None:
            self._fired = False  # nothing now: a later reclaim is news again
            return None
        if self._fired:
            return None
        self._fired = True
        notice = PreemptionNotice(
            cfg.target,
            cfg.kind,
            found.deadline_s,
            "metadata",
            found.reason,
            node=cfg.target if cfg.kind is NoticeKind.NODE else "",
        )
        self._sink(notice)
        return notice

    async def _fetch(self) -> tuple[int, str]:
        import aiohttp

        cfg = self.config
        if self._session is None:
            self._session = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=cfg.timeout_s)
        headers = dict(cfg.headers)
        if cfg.token_url is not None:
            if self._token is None:
                self._token = await self._fetch_token(timeout)
            headers[_TOKEN_HEADER] = self._token
        async with self._session.get(cfg.url, headers=headers, timeout=timeout) as resp:
            body = await resp.text()
            if resp.status == 401 and cfg.token_url is not None:
                self._token = None  # expired session token: fetch a new one next poll
            return resp.status, body

    async def _fetch_token(self, timeout: aiohttp.ClientTimeout) -> str:
        assert self._session is not None and self.config.token_url is not None
        headers = {_TOKEN_TTL_HEADER: str(self.config.token_ttl_s)}
        async with self._session.put(
            self.config.token_url, headers=headers, timeout=timeout
        ) as resp:
            if resp.status != 200:
                raise ValueError(f"metadata token endpoint answered HTTP {resp.status}")
            return (await resp.text()).strip()
