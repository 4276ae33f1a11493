"""Assertions the AppTest suites share (tests/test_app*.py): a page ran cleanly, and the table it showed
with given columns."""

from __future__ import annotations

import pandas as pd
from streamlit.testing.v1 import AppTest


def ok(at: AppTest) -> AppTest:
    """`at`, after asserting that the page raised nothing and showed no error."""
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def table(at: AppTest, *columns: str) -> pd.DataFrame:
    """The first dataframe shown with all of `columns`."""
    for d in at.dataframe:
        if all(c in d.value.columns for c in columns):
            return d.value
    raise AssertionError(f"no table with columns {columns}: {[list(d.value.columns) for d in at.dataframe]}")
