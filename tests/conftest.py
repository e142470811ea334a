"""Fixtures shared by several test files."""
import pytest

from mamlpp_fast.ops import backend as registry


@pytest.fixture
def fresh_registry(monkeypatch):
    """The op-backend registry as a new process has it (no MAMLPP_BACKEND, no process-wide choice, empty cache),
    restored afterwards."""
    monkeypatch.delenv(registry.ENV_VAR, raising=False)
    previous = registry.set_backend(None)
    registry.clear_cache()
    yield monkeypatch
    registry.set_backend(previous)
    registry.clear_cache()
