"""The exceptions of mamlpp-fast, under one base class.

Every error that a user can cause (a configuration value, a dataset, a checkpoint, a batch, an
experiment folder, a plot request) or that the training policy raises (a non-finite meta-update under
nonfinite_policy='stop') is a `MamlppError`. The command line turns a `MamlppError` into one line on
stderr and exit status 2; anything else is a bug and keeps its traceback.

Each class also derives from the built-in exception that callers caught before there was a common
base (ValueError, RuntimeError, FloatingPointError), so existing `except ValueError:` code still
works. This module imports nothing of the package: every layer may import it.
"""
from __future__ import annotations

__all__ = ["BatchError", "CheckpointError", "ConfigError", "DatasetError", "ExperimentError", "MamlppError",
           "NonFiniteError", "PlotError"]


class MamlppError(Exception):
    """Base class of the package's errors: a user-caused or policy error, reported in one line."""


class ConfigError(MamlppError, ValueError):
    """A configuration key is missing, has the wrong type, or an invalid value."""


class BatchError(MamlppError, ValueError):
    """A data batch has inconsistent shapes, a wrong image size or labels out of range."""


class CheckpointError(MamlppError, RuntimeError):
    """A checkpoint file is missing, truncated, corrupt, or does not fit the model."""


class DatasetError(MamlppError, ValueError):
    """The dataset cannot serve the requested tasks; the message names the path and the cause."""


class ExperimentError(MamlppError, RuntimeError):
    """The experiment folder cannot be used as asked (existing outputs, incompatible configuration)."""


class PlotError(MamlppError, ValueError):
    """The experiment folder lacks what a chart needs; the message names the path."""


class NonFiniteError(MamlppError, FloatingPointError):
    """A meta-update produced a non-finite loss or gradient and nonfinite_policy is 'stop'."""
