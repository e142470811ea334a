"""Packaging: one version, and a missing compiled extension is never silent at first use.

The install side (setup.py stopping when torch does not import at build time, MAMLPP_REQUIRE_NATIVE)
needs a fresh virtual environment and a native build; README.md, "Installing", says what it does.
"""
import sys
import tomllib
import types
import warnings
from pathlib import Path

import pytest
import torch

import mamlpp_fast
from mamlpp_fast import ops
from mamlpp_fast.ops import backend as registry
from mamlpp_fast.ops import per_step_bn

ROOT = Path(__file__).resolve().parents[1]


def test_version_is_written_once():
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = meta["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "mamlpp_fast.__version__"}
    assert "version=" not in (ROOT / "setup.py").read_text()
    assert isinstance(mamlpp_fast.__version__, str) and mamlpp_fast.__version__.count(".") == 2


def test_torch_requirement_is_a_bounded_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    (torch_req,) = [d for d in deps if d.split(">")[0].split("<")[0].split("=")[0].strip() == "torch"]
    assert ">=" in torch_req and "<" in torch_req.replace("<=", ""), torch_req
    lower = torch_req.split(">=")[1].split(",")[0].strip()
    installed = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])
    assert installed >= tuple(int(p) for p in lower.split(".")[:2])


def _unbuilt_native(error):
    """A stand-in for mamlpp_fast._native when _C did not load."""
    mod = types.ModuleType("mamlpp_fast._native")
    mod.device_types = lambda: ()
    mod.load_error = lambda: error
    return mod


def _bn():
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    return per_step_bn.per_step_batch_norm(x, torch.ones(2, dtype=x.dtype), torch.zeros(2, dtype=x.dtype), 2)


def test_missing_extension_warns_once_at_first_use_naming_the_backend(fresh_registry):
    cause = "ImportError: no _C; the native build failed at install: 'cmake --build' failed"
    fresh_registry.setitem(sys.modules, "mamlpp_fast._native", _unbuilt_native(cause))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            _bn()
    msgs = [str(w.message) for w in record if issubclass(w.category, ops.BackendFallbackWarning)]
    assert len(msgs) == 1, msgs
    assert "mamlpp_fast._C is not available" in msgs[0] and cause in msgs[0]
    assert "backend 'torch'" in msgs[0]


def test_no_warning_when_torch_is_asked_for_or_the_extension_loads(fresh_registry):
    fresh_registry.setitem(sys.modules, "mamlpp_fast._native", _unbuilt_native("ImportError: no _C"))
    fresh_registry.setenv(registry.ENV_VAR, "torch")  # an explicit choice of torch: nothing to warn about
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _bn()
