"""The persistent block tables' CUDA path (changed rows patched through pinned non-blocking
uploads, the table re-mirrored when it grows) against a table rebuilt from scratch after random
joins, leaves, growth, replaced block lists and reorders."""

from __future__ import annotations

import pytest
import torch

from kvrelay_testing.block_tables import check_history

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("seed", range(3))
def test_cuda_table_equals_rebuilt_table(seed: int) -> None:
    check_history(torch.device("cuda"), seed)
