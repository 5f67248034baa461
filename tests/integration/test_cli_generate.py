"""`kvrelay generate` as a user runs it: a subprocess on the default model."""

from __future__ import annotations

import json
import subprocess
import sys


def _kvrelay(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kvrelay.cluster.cli.main", *args],
        capture_output=True, text=True, timeout=300, check=False,
    )


def test_generate_chat_answers_in_english() -> None:
    out = _kvrelay("generate", "--chat", "--prompt", "What is the capital of France?", "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert "Paris" in result["text"]
    assert result["finish_reason"] in ("stop", "length")
    assert result["token_ids"] and all(isinstance(t, int) for t in result["token_ids"])


def test_generate_rejects_a_missing_model_clearly() -> None:
    out = _kvrelay("generate", "--model", "/nonexistent/model", "--prompt", "hi")
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr
