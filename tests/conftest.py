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


def pytest_collection_finish(session):
    """Start the Triton-interpreter suite's subprocess now when its driver is selected (tests/_interp_suite.py)."""
    import _interp_suite
    _interp_suite.start_if_selected(session)


def pytest_unconfigure(config):
    import _interp_suite
    _interp_suite.stop_pending(config)
