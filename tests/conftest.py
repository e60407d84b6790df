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
