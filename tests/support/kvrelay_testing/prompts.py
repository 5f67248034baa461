"""Chat prompts for the engine suites: one system line naming the assistant by its index, so
prompts share a prefix but differ in their first few tokens."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def chat_prompts(tokenizer: Any, questions: Sequence[str]) -> list[list[int]]:
    """Token ids of ``questions`` under the model's chat template."""
    return [
        tokenizer.apply_chat_template(
            [
                {"role": "system", "content": f"You are assistant number {i}."},
                {"role": "user", "content": q},
            ]
        )
        for i, q in enumerate(questions)
    ]
