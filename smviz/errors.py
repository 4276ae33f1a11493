"""The one exception family of smviz: every error a user can cause says what was wrong and what to do,
in the user's terms. The CLI prints any of them as one line (`smviz CMD: error: ...`), never a traceback."""

from __future__ import annotations


class SmvizError(Exception):
    """Base class of every error smviz raises on bad input, bad files or a failed write."""


class ConfigError(SmvizError, ValueError):
    """A configuration value or flag is invalid (unknown preset, knn > n_keys, lr not finite, ...)."""


class InputError(SmvizError, ValueError):
    """A file the user brings (facts, corpus, documents, a world) is missing or malformed."""


class ModelFileError(SmvizError):
    """A model directory is incomplete, altered, or not an smviz model."""


class TraceError(SmvizError):
    """A trace is incomplete, damaged, queried out of range, or recorded with another model."""


class StatsError(SmvizError):
    """Background slot statistics are damaged, or belong to another model or memory."""


class RunError(SmvizError):
    """A finetuning run directory is incomplete or damaged, or a run cannot go on (loss not finite)."""


class AnalysisError(SmvizError):
    """An analysis was asked something its inputs cannot answer (no such fact, mismatched models, ...)."""


class WriteError(SmvizError):
    """An output could not be written (read-only folder, full disk, a file where a folder must be);
    nothing half-written is left looking complete."""
