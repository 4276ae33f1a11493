"""smviz.figures: each function returns a plotly Figure whose traces hold the numbers it was given."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from smviz import figures


def test_histograms_carry_the_data():
    counts = np.array([0, 0, 3, 7, 1])
    fig = figures.access_histogram(counts)
    assert isinstance(fig, go.Figure) and list(fig.data[0].x) == counts.tolist()
    fig = figures.weight_histogram([0.1, 0.5], slot=4)
    assert "slot 4" in fig.layout.title.text and list(fig.data[0].x) == [0.1, 0.5]


def test_learning_curves_one_line_per_run_and_panel():
    m = pd.DataFrame({"step": [0, 2, 0, 2], "learn_f1": [0, .5, 0, .8], "known_f1": [1, .9, 1, .4],
                      "heldout_nll": [3, 3.1, 3, 3.5], "run": ["sparse", "sparse", "full", "full"]})
    fig = figures.learning_curves(m, by="run")
    assert len(fig.data) == 6  # 2 runs × 3 panels
    full_known = [t for t in fig.data if t.name == "full" and t.xaxis == "x2"][0]
    assert list(full_known.y) == [1, .4]
    assert sum(t.showlegend for t in fig.data) == 2
    with pytest.raises(ValueError, match="step"):
        figures.learning_curves(m.drop(columns="step"))


def test_overlap_heatmap_and_churn():
    mat = pd.DataFrame([[1.0, .25], [.25, 1.0]], index=[1, 2], columns=[1, 2])
    fig = figures.overlap_heatmap(mat)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), mat.to_numpy())
    assert list(fig.data[0].x) == ["1", "2"]
    ch = pd.DataFrame({"step": [1, 2], "churn": [np.nan, .5], "jaccard": [np.nan, .4], "new_share": [1, .5]})
    assert [t.name for t in figures.churn_figure(ch).data] == ["churn", "jaccard", "new_share"]


def test_slot_history_figures():
    hist = pd.DataFrame({"step": [1, 2, 3], "score": [0.0, .2, .1], "selected": [False, True, True]})
    fig = figures.tfidf_history(hist, slot=7)
    assert list(fig.data[0].y) == [0.0, .2, .1] and list(fig.data[0].marker.color) == ["lightgray", "crimson", "crimson"]
    fig = figures.value_norm_history(pd.DataFrame({"step": [0, 1], "norm": [1.0, 2.0]}))
    assert list(fig.data[0].y) == [1.0, 2.0]


def test_promoted_tokens_and_token_slot_heatmap():
    pt = pd.DataFrame({"direction": ["promoted", "suppressed"], "rank": [0, 0], "token_id": [5, 6],
                       "token": ["<b>", "x"], "logit": [2.0, -1.0]})
    fig = figures.promoted_tokens_figure(pt)
    assert list(fig.data[0].x) == [-1.0, 2.0] and list(fig.data[0].y) == ["'x' #6", "'<b>' #5"]
    reads = pd.DataFrame({"position": [0, 0, 1], "token": ["a", "a", "b"], "slot": [3, 4, 3], "weight": [.5, .25, 1.0]})
    fig = figures.token_slot_heatmap(reads)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), [[.5, .25], [1.0, 0.0]])
    assert list(fig.data[0].x) == ["3", "4"]


def test_shift_and_entity_figures():
    fig = figures.access_shift_figure(pd.DataFrame({"jaccard": [1.0, .5]}))
    assert list(fig.data[0].x) == [1.0, .5]
    bins = fig.data[0].xbins  # fixed bins within [0, 1] whatever the values (all 1.0 once drew a bin to 2)
    assert (bins.start, bins.end, bins.size) == (-0.025, 1.025, 0.05) and tuple(fig.layout.xaxis.range) == (-0.03, 1.03)
    fs = pd.DataFrame({"fact_id": ["a", "a", "b"], "f1_before": [0, 1, 0], "f1_after": [1, 1, .5]})
    fig = figures.fact_shift_figure(fs)
    assert list(fig.data[0].y) == [.5, 0] and list(fig.data[1].y) == [1, .5]
    prof = pd.DataFrame({"slot": [1, 2], "share_PERSON": [.3, .1], "share_ORG": [.2, 0.0]})
    fig = figures.entity_share_figure(prof, 1)
    assert list(fig.data[0].x) == ["PERSON", "ORG"] and list(fig.data[0].y) == [.3, .2]
