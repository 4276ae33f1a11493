"""The one exception family of smviz: every error a user can cause says what was wrong and what to do."""

from __future__ import annotations


class SmvizError(Exception):
    """Base class of every error smviz raises on bad input or bad files."""


class ConfigError(SmvizError, ValueError):
    """A configuration value is invalid (unknown preset, knn > n_keys, layer out of range, ...)."""


class ModelFileError(SmvizError):
    """A model directory is incomplete, altered, or not an smviz model."""


class TraceError(SmvizError):
    """A trace is incomplete, damaged, queried out of range, or recorded with another model."""
