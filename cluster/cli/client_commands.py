"""Client commands of the ``kvrelay`` CLI, on top of the SDK (kvrelay.client):

    kvrelay complete "Once upon a time" --max-tokens 32
    kvrelay chat                      # interactive; keeps the conversation; /reset, /quit
    kvrelay status
    kvrelay drain WORKER
    kvrelay undrain WORKER

Each takes ``--target HOST:PORT`` (default localhost:50051), ``--api-key`` (default
$KVRELAY_API_KEY), ``--tls`` / ``--root-cert``, ``--timeout``. Usage:
``add_client_commands(subparsers)`` then ``args.func(args)`` returns the exit status.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import Any, TextIO

from kvrelay.client import Client, GenerationChunk, KvrelayError
from kvrelay.client.types import GenerationResult


def _client(args: argparse.Namespace) -> Client:
    return Client(
        args.target,
        api_key=args.api_key or None,
        tls=args.tls,
        root_cert=args.root_cert,
        timeout=args.timeout,
    )


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    params: dict[str, Any] = {
        "model": args.model,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "seed": args.seed,
        "stop": args.stop or (),
    }
    return {k: v for k, v in params.items() if v is not None}


def _print_stream(chunks: Iterator[GenerationChunk], out: TextIO) -> str:
    text = []
    for chunk in chunks:
        out.write(chunk.text)
        out.flush()
        text.append(chunk.text)
    out.write("\n")
    return "".join(text)


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except KvrelayError as err:
            print(f"error: {type(err).__name__}: {err.message}", file=sys.stderr)
            return 1

    return run


@_guard
def cmd_complete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        _print_stream(client.generate(args.prompt, stream=True, **_sampling(args)), sys.stdout)
    return 0


@_guard
def cmd_chat(args: argparse.Namespace) -> int:
    messages: list[dict[str, str]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    with _client(args) as client:
        while True:
            try:
                line = input("you> ")
            except EOFError:
                print()
                return 0
            if line.strip() in ("/quit", "/exit"):
                return 0
            if line.strip() == "/reset":
                del messages[1 if args.system else 0 :]
                continue
            if not line.strip():
                continue
            messages.append({"role": "user", "content": line})
            sys.stdout.write("assistant> ")
            try:
                stream = client.chat(messages, stream=True, **_sampling(args))
                assert not isinstance(stream, GenerationResult)
                reply = _print_stream(stream, sys.stdout)
            except KvrelayError:
                messages.pop()  # keep the conversation as the server saw it
                raise
            messages.append({"role": "assistant", "content": reply})


@_guard
def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.cluster_status()
    if args.json:
        print(json.dumps(asdict(status), indent=2))
        return 0
    print(f"in flight: {status.in_flight}")
    print(f"{'worker':<20} {'role':<10} {'node':<16} {'health':<8} {'run':>5} {'wait':>5}  kv blocks")
    for w in status.workers:
        health = ("draining" if w.draining else "ok") if w.healthy else "DOWN"
        kv = " ".join(
            f"{tier}:" + ",".join(f"{s}={n}" for s, n in sorted(states.items()))
            for tier, states in sorted(w.kv_blocks.items())
        )
        print(
            f"{w.worker_id:<20} {w.role:<10} {w.node:<16} {health:<8} {w.running:>5} "
            f"{w.waiting:>5}  {kv}"
        )
    return 0


@_guard
def cmd_undrain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ok = client.undrain(args.worker)
    print(f"undrain {args.worker}: {'accepted' if ok else 'unknown or failed worker'}")
    return 0 if ok else 1


@_guard
def cmd_drain(args: argparse.Namespace) -> int:
    with _client(args) as client:
        ok = client.drain(args.worker)
    print(f"drain {args.worker}: {'accepted' if ok else 'unknown worker'}")
    return 0 if ok else 1


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default="localhost:50051", help="HOST:PORT of the gRPC frontend")
    p.add_argument(
        "--api-key",
        default=os.environ.get("KVRELAY_API_KEY"),
        help="bearer key (default: $KVRELAY_API_KEY)",
    )
    p.add_argument("--tls", action="store_true", help="use TLS (system roots)")
    p.add_argument("--root-cert", help="PEM file with the CA / self-signed certificate (TLS)")
    p.add_argument("--timeout", type=float, default=None, help="per-call deadline, seconds")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", help="stop string (repeatable)")


def add_client_commands(subparsers: Any) -> None:
    """Register complete / chat / status / drain / undrain on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("complete", help="complete a prompt (streams to stdout)")
    p.add_argument("prompt")
    _common(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_complete)

    p = subparsers.add_parser("chat", help="interactive chat that keeps the conversation")
    p.add_argument("--system", default="", help="system message")
    _common(p)
    _sampling_args(p)
    p.set_defaults(func=cmd_chat)

    p = subparsers.add_parser("status", help="cluster status (admin)")
    p.add_argument("--json", action="store_true")
    _common(p)
    p.set_defaults(func=cmd_status)

    p = subparsers.add_parser("drain", help="stop routing to a worker (admin)")
    p.add_argument("worker")
    _common(p)
    p.set_defaults(func=cmd_drain)

    p = subparsers.add_parser("undrain", help="route to a drained worker again (admin)")
    p.add_argument("worker")
    _common(p)
    p.set_defaults(func=cmd_undrain)
