"""Fixtures shared by integration tests.

``load_test_file("tests/integration/test_api_fuzz.py")`` loads another test file as a private
module so a suite can reuse its helpers (oracles, strategies, a Prometheus launcher): under
``--import-mode=importlib`` test files are not importable by name. Each file is loaded once per
session under a name of its own, so pytest never collects its tests a second time.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def load_test_file() -> Callable[[str], ModuleType]:
    loaded: dict[str, ModuleType] = {}

    def load(relpath: str) -> ModuleType:
        if relpath not in loaded:
            path = ROOT / relpath
            name = "kvrelay_reused_" + path.stem
            spec = importlib.util.spec_from_file_location(name, path)
            assert spec is not None and spec.loader is not None, path
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            loaded[relpath] = module
        return loaded[relpath]

    return load
