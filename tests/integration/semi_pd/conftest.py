"""The semi-PD worker tests' module-scoped fixtures: the tiny model, its chat prompts of the
shared questions, and the colocated worker's reference tokens (kvrelay_testing/semi_pd.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvrelay.workers.model.loader import LoadedModel, load_model
from kvrelay_testing.prompts import chat_prompts
from kvrelay_testing.semi_pd import QUESTIONS, Reference, colocated_reference


@pytest.fixture(scope="module")
def loaded(tiny_model_dir: Path) -> LoadedModel:
    torch.manual_seed(0)
    return load_model(str(tiny_model_dir))


@pytest.fixture(scope="module")
def prompts(loaded: LoadedModel) -> list[list[int]]:
    return chat_prompts(loaded.tokenizer, QUESTIONS)


@pytest.fixture(scope="module")
def colocated(loaded: LoadedModel) -> Iterator[Reference]:
    """The colocated worker's tokens for a batch, each batch generated once for the module
    (the plain and the overlapped decode lane compare against the same run)."""
    with colocated_reference(loaded) as tokens:
        yield tokens
