"""The client CLI commands (cluster/cli/client_commands.py) against a running frontend."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator

import pytest

from kvrelay.cluster.cli.client_commands import add_client_commands
from kvrelay_testing.frontend import ByteTokenizer, EchoBackend, FrontendThread


@pytest.fixture(scope="module")
def srv() -> Iterator[FrontendThread]:
    with FrontendThread(EchoBackend(), admin_keys=["adm"], api_keys=["usr"]) as server:
        yield server


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="kvrelay")
    add_client_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_complete_streams_text(srv: FrontendThread, capsys: pytest.CaptureFixture[str]) -> None:
    target = f"127.0.0.1:{srv.grpc_port}"
    assert (
        run(
            [
                "complete",
                "abcdef",
                "--target",
                target,
                "--api-key",
                "usr",
                "--max-tokens",
                "4",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "abcd\n"
    assert run(["complete", "x", "--target", target, "--api-key", "bad"]) == 1
    assert "UnauthenticatedError" in capsys.readouterr().err


def test_chat_keeps_the_conversation(
    srv: FrontendThread, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    lines = iter(["first question", "", "second question"])

    def fake_input(prompt: str) -> str:
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    monkeypatch.setattr("builtins.input", fake_input)
    assert (
        run(
            [
                "chat",
                "--target",
                f"127.0.0.1:{srv.grpc_port}",
                "--api-key",
                "usr",
                "--system",
                "be brief",
                "--max-tokens",
                "6",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2
    prompt = ByteTokenizer().decode(srv.backend.last_prompt)  # type: ignore[attr-defined]
    # the second turn carries the system message, the first exchange and the new question
    assert prompt.startswith("<|system|>be brief\n<|user|>first question\n<|assistant|>")
    assert prompt.endswith("<|user|>second question\n<|assistant|>")


def test_status_and_drain_need_admin(
    srv: FrontendThread, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{srv.grpc_port}"
    assert run(["status", "--target", target, "--api-key", "usr"]) == 1
    assert "PermissionDeniedError" in capsys.readouterr().err
    assert run(["status", "--target", target, "--api-key", "adm", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["workers"][0]["worker_id"] == "echo-0"
    assert run(["status", "--target", target, "--api-key", "adm"]) == 0
    assert "echo-0" in capsys.readouterr().out
    assert run(["drain", "echo-0", "--target", target, "--api-key", "adm"]) == 0
    assert "accepted" in capsys.readouterr().out
    assert run(["drain", "nope", "--target", target, "--api-key", "adm"]) == 1
