"""A workspace: where its files lie (`layout`, layer 1: `Workspace`) and the stages that fill it
(`stages`, layer 12: world, tokenizer, pretraining, evaluation, statistics, trace, streams, reports,
and the demo that runs them in order). Importing this package loads only the layout."""

from __future__ import annotations

from smviz.workspace.layout import Workspace

__all__ = ["Workspace"]
