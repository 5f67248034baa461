"""Kubernetes preemption watcher: node taints / labels and worker-pod deletion -> notices.

Two background threads (the ``kubernetes`` client blocks; nothing here runs on the event
loop), each a list-then-watch loop: list to get the current state and a resourceVersion,
report what the list shows, then watch from that version; on 410 Gone or any error, log,
back off and list again. ``classify_node`` / ``classify_pod`` are pure and do the deciding.

* node: a configured taint or label present, or the node being deleted -> a NODE notice;
  deadline = taint.timeAdded (or now) + that taint's grace. Re-announced only when a later
  event brings an earlier deadline; forgotten when the signal goes away.
* pod (the worker pods, by namespace + label selector): deletionTimestamp set -> a POD
  notice carrying the pod's node; deadline = deletionTimestamp (Kubernetes sets it to
  now + the grace period). A DELETED event for a pod not yet announced: deadline now.
  Once per pod uid. Mapping nodes and pods to Ray workers is the controller's job.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from kvrelay.cluster.spot.notices import NoticeKind, NoticeSink, PreemptionNotice, parse_rfc3339

log = logging.getLogger(__name__)

# Taint key -> grace seconds (None: the configured default). The clouds' own signals first.
DEFAULT_TAINTS: Mapping[str, float | None] = {
    "aws-node-termination-handler/spot-itn": 120.0,  # EC2 spot interruption: 2 minutes
    "aws-node-termination-handler/asg-lifecycle-termination": None,
    "aws-node-termination-handler/scheduled-maintenance": None,
    "cloud.google.com/impending-node-termination": 30.0,  # GKE spot / preemptible: 30 s
    "node.cloudprovider.kubernetes.io/shutdown": None,
    "ToBeDeletedByClusterAutoscaler": None,
    "DeletionCandidateOfClusterAutoscaler": None,  # soft: scale-down may follow
    "karpenter.sh/disrupted": None,  # Karpenter v1
    "karpenter.sh/disruption": None,  # Karpenter before v1 (value "disrupting")
}
# Label ("key" or "key=value") -> grace. None of the big clouds announces with a label alone;
# add your termination handler's here.
DEFAULT_LABELS: Mapping[str, float | None] = {}


@dataclass(frozen=True)
class K8sWatchConfig:
    pod_namespace: str | None = None  # None: do not watch pods
    pod_label_selector: str = ""  # e.g. "ray.io/cluster=kvrelay"
    watch_nodes: bool = True
    node_label_selector: str = ""
    taints: Mapping[str, float | None] = field(default_factory=lambda: dict(DEFAULT_TAINTS))
    labels: Mapping[str, float | None] = field(default_factory=lambda: dict(DEFAULT_LABELS))
    default_grace_s: float = 30.0
    watch_timeout_s: int = 300  # server closes each watch after this; we list again
    retry_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if self.default_grace_s < 0 or self.retry_backoff_s < 0:
            raise ValueError("default_grace_s and retry_backoff_s must be >= 0")
        if self.watch_timeout_s <= 0:
            raise ValueError("watch_timeout_s must be positive")
        for k, v in (*self.taints.items(), *self.labels.items()):
            if v is not None and v < 0:
                raise ValueError(f"grace for {k!r} must be >= 0, got {v}")


def _time_or(text: Any, default: float) -> float:
    try:
        return parse_rfc3339(text)
    except (TypeError, ValueError):
        return default


def classify_node(
    event_type: str, node: Mapping[str, Any], cfg: K8sWatchConfig, now: float
) -> PreemptionNotice | None:
    """The earliest-deadline termination signal on ``node`` (raw API dict), or None."""
    meta = node.get("metadata") or {}
    name = meta.get("name") or ""
    if not name:
        return None
    found: list[tuple[float, str]] = []
    if event_type == "DELETED":
        found.append((now, "node deleted"))
    if meta.get("deletionTimestamp"):
        found.append((now + cfg.default_grace_s, "node being deleted"))
    for taint in (node.get("spec") or {}).get("taints") or []:
        key = taint.get("key")
        if key in cfg.taints:
            grace = cfg.taints[key]
            start = _time_or(taint.get("timeAdded"), now)
            deadline = start + (cfg.default_grace_s if grace is None else grace)
            what = f"taint {key}={taint.get('value', '')}:{taint.get('effect', '')}"
            found.append((deadline, what))
    labels = meta.get("labels") or {}
    for entry, grace in cfg.labels.items():
        key, _, value = entry.partition("=")
        if key in labels and (not value or labels[key] == value):
            g = cfg.default_grace_s if grace is None else grace
            found.append((now + g, f"label {key}={labels[key]}"))
    if not found:
        return None
    deadline, reason = min(found)
    return PreemptionNotice(name, NoticeKind.NODE, deadline, "k8s-node", reason, node=name)


def classify_pod(
    event_type: str, pod: Mapping[str, Any], cfg: K8sWatchConfig, now: float
) -> PreemptionNotice | None:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    target = f"{meta.get('namespace', '')}/{meta.get('name', '')}"
    node = spec.get("nodeName") or ""
    if meta.get("deletionTimestamp"):
        grace = meta.get("deletionGracePeriodSeconds")
        if grace is None:
            grace = spec.get("terminationGracePeriodSeconds", cfg.default_grace_s)
        deadline = _time_or(meta["deletionTimestamp"], now + float(grace))
        return PreemptionNotice(target, NoticeKind.POD, deadline, "k8s-pod", "pod deleting", node)
    if event_type == "DELETED":
        return PreemptionNotice(target, NoticeKind.POD, now, "k8s-pod", "pod deleted", node)
    return None


class K8sWatcher:
    """``start()`` the watch threads; notices go to ``sink`` (called from those threads)."""

    def __init__(
        self,
        config: K8sWatchConfig,
        sink: NoticeSink,
        api_client: client.ApiClient | None = None,
    ) -> None:
        self.config = config
        self._sink = sink
        self._api = client.CoreV1Api(api_client)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watches: list[watch.Watch] = []
        self._lock = threading.Lock()
        self._node_deadlines: dict[str, float] = {}  # node -> deadline announced
        self._pods_announced: set[str] = set()  # pod uids
        self.errors = 0  # failed list/watch rounds (logged), for tests and metrics

    def start(self) -> None:
        cfg = self.config
        loops: list[tuple[str, Any, Any]] = []
        if cfg.watch_nodes:
            loops.append(("nodes", self._list_nodes, self._on_node))
        if cfg.pod_namespace is not None:
            loops.append(("pods", self._list_pods, self._on_pod))
        for name, lister, handler in loops:
            t = threading.Thread(
                target=self._loop, args=(lister, handler), name=f"k8s-watch-{name}", daemon=True
            )
            self._threads.append(t)
            t.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Ask the threads to end and close open watch streams; join within ``timeout_s``."""
        self._stop.set()
        with self._lock:
            watches = list(self._watches)
        for w in watches:
            w.stop()
            resp = getattr(w, "_resp", None)  # unblock a read waiting for the next event
            if resp is not None:
                try:
                    resp.close()
                except Exception:  # closing a dying stream: nothing to do
                    pass
        for t in self._threads:
            t.join(timeout_s)

    def _list_nodes(self, **kw: Any) -> Any:
        return self._api.list_node(label_selector=self.config.node_label_selector, **kw)

    def _list_pods(self, **kw: Any) -> Any:
        cfg = self.config
        return self._api.list_namespaced_pod(
            cfg.pod_namespace or "default", label_selector=cfg.pod_label_selector, **kw
        )

    def _loop(self, lister: Any, handler: Any) -> None:
        while not self._stop.is_set():
            try:
                self._list_then_watch(lister, handler)
            except ApiException as e:
                if e.status != 410:  # 410 Gone: our version expired; list again at once
                    self._failed(f"k8s watch: API error {e.status} {e.reason}")
            except Exception as e:  # network, decode: log and retry, never die
                if not self._stop.is_set():
                    self._failed(f"k8s watch: {type(e).__name__}: {e}")

    def _failed(self, msg: str) -> None:
        self.errors += 1
        log.warning("%s; retrying in %.1f s", msg, self.config.retry_backoff_s)
        self._stop.wait(self.config.retry_backoff_s)

    def _list_then_watch(self, lister: Any, handler: Any) -> None:
        # raw JSON, not models: the classifiers read API dicts; the watch below gets raw dicts
        # too, because the listers' return annotation names no model
        listed = lister(_preload_content=False)
        try:
            body = json.loads(listed.data)
        finally:
            listed.release_conn()
        for item in body.get("items") or []:
            handler("ADDED", item)
        rv = (body.get("metadata") or {}).get("resourceVersion")
        w = watch.Watch()
        with self._lock:
            self._watches.append(w)
        try:
            if self._stop.is_set():
                return
            for event in w.stream(
                lister, resource_version=rv, timeout_seconds=self.config.watch_timeout_s
            ):
                handler(event["type"], event["raw_object"])
                if self._stop.is_set():
                    break
        finally:
            with self._lock:
                self._watches.remove(w)

    def _on_node(self, event_type: str, node: Mapping[str, Any]) -> None:
        now = time.time()
        notice = classify_node(event_type, node, self.config, now)
        name = (node.get("metadata") or {}).get("name") or ""
        if notice is None:
            self._node_deadlines.pop(name, None)  # signal gone: a later one is news again
            return
        last = self._node_deadlines.get(name)
        if event_type == "DELETED":
            self._node_deadlines.pop(name, None)
            if last is not None:
                return  # already announced; its deletion is the announcement coming true
        elif last is not None and notice.deadline_s >= last:
            return
        else:
            self._node_deadlines[name] = notice.deadline_s
        self._sink(notice)

    def _on_pod(self, event_type: str, pod: Mapping[str, Any]) -> None:
        meta = pod.get("metadata") or {}
        uid = meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
        if uid in self._pods_announced:
            if event_type == "DELETED":
                self._pods_announced.discard(uid)  # gone for good: forget it
            return
        notice = classify_pod(event_type, pod, self.config, time.time())
        if notice is not None:
            if event_type != "DELETED":
                self._pods_announced.add(uid)
            self._sink(notice)
