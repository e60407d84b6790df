"""Fixtures shared by every test suite."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory) -> Path:
    """The built-in tiny Qwen3 (actors/builtin_model.py), built once per test session."""
    from actors.builtin_model import build_builtin_model

    directory = tmp_path_factory.mktemp("builtin-model")
    build_builtin_model(directory)
    return directory


@pytest.fixture(scope="session")
def sglang_python() -> Path:
    """The interpreter of SGLang's own virtualenv, built by launch/sglang_env.py on first use (about 3 minutes
    on a fresh machine, then cached under ~/.cache/tinkerd): the SGLang tests run the real engine."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "launch.sglang_env"], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, f"building SGLang's virtualenv failed:\n{out.stderr[-4000:]}"
    return Path(out.stdout.strip().splitlines()[-1])
