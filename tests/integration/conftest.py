"""Fixtures shared by integration tests.

``load_test_file("tests/unit/test_frontend_fuzz.py")`` loads another test file as a private
module so a suite can reuse its helpers (oracles, strategies, a Prometheus launcher): under
``--import-mode=importlib`` test files are not importable by name. Each file is loaded once per
session under a name of its own, so pytest never collects its tests a second time.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable, Iterator
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


@pytest.fixture(scope="module")
def ray_session(request: pytest.FixtureRequest) -> Iterator[None]:
    """A local Ray instance for one test module (its clusters start inside it); token auth is
    off as for every local kvrelay cluster (README, Configuration)."""
    import ray

    from kvrelay.cluster.runtime.local_ray import init_local_ray

    init_local_ray(num_cpus=8, namespace=f"kvrelay-{request.module.__name__.rsplit('.', 1)[-1]}",
                   log_to_driver=False)  # loopback only, as `kvrelay serve` starts it
    yield
    ray.shutdown()


def wait_until(
    cond: Callable[[], bool],
    timeout: float = 60.0,
    describe: Callable[[], object] | None = None,
) -> None:
    """Poll a condition on the cluster's state (no fixed sleeps as synchronisation).
    ``describe``: what the failure message shows of that state when time runs out."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            seen = f": {describe()!r}" if describe is not None else ""
            raise AssertionError(f"condition not reached in time{seen}")
        time.sleep(0.05)


@pytest.fixture
def wait() -> Callable[..., None]:
    return wait_until
