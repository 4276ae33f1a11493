"""Every plotly figure of smviz, one function each. Each takes DataFrames (or arrays) that the analysis
layer returns and gives back a `plotly.graph_objects.Figure`; the Streamlit app, the HTML reports and
notebooks all draw through these functions, so a figure looks the same everywhere."""

from __future__ import annotations

import html
from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = [
    "access_histogram", "weight_histogram", "curve_panels", "learning_curves", "overlap_heatmap", "churn_figure",
    "tfidf_history", "value_norm_history", "promoted_tokens_figure", "token_slot_heatmap",
    "access_shift_figure", "fact_shift_figure", "entity_share_figure", "rank_histogram_figure", "token_bar_labels",
    "key_map_figure", "learning_forgetting_figure", "slot_reads_histogram",
]

def _e(text: object) -> str:
    """Data text for plotly hover and legend text, which plotly renders as markup."""
    return html.escape(str(text))

# No template here: setting one costs ~9 ms a figure (plotly copies it), several per Slot page render, and
# the app styles charts with Streamlit's theme anyway. Reports set theirs when they embed a figure.
_LAYOUT = dict(margin=dict(l=40, r=20, t=50, b=40))
REPORT_TEMPLATE = "plotly_white"
"""The plotly template of figures in self-contained reports (smviz.report)."""


def _require(df: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"{what} needs columns {list(columns)}; missing {missing}")


def access_histogram(counts: np.ndarray | Sequence[int], *, title: str = "Reads per slot") -> go.Figure:
    """Histogram of per-slot read counts (`Trace.slot_counts()` or `SlotStats` counts of one layer):
    how many slots were read how often; dead slots (0 reads) form the first bar."""
    counts = np.asarray(counts, dtype=np.int64)
    fig = go.Figure(go.Histogram(x=counts, nbinsx=50, name="slots"))
    fig.update_layout(title=title, xaxis_title="reads of a slot", yaxis_title="slots", bargap=0.05, **_LAYOUT)
    return fig


def weight_histogram(weights: np.ndarray | Sequence[float], *, slot: int | None = None) -> go.Figure:
    """Histogram of the softmax weights of every read of one slot (e.g. the slot's entries of
    `SlotIndex.weights`, or the `weight` column of `SlotIndex.contexts`)."""
    w = np.asarray(weights, dtype=np.float64)
    fig = go.Figure(go.Histogram(x=w, nbinsx=40, name="reads"))
    title = "Access weights" + (f" of slot {slot}" if slot is not None else "")
    fig.update_layout(title=title, xaxis_title="weight of the read", yaxis_title="reads", bargap=0.05, **_LAYOUT)
    return fig


CURVE_PANELS = (("learn_f1", "learning: F1 on new facts"), ("known_f1", "forgetting: F1 on known facts"),
                ("heldout_nll", "forgetting: held-out NLL"))
"""The fixed panels of `learning_curves`: (column, title)."""

EDITING_PANELS = tuple((f"editing/{aspect}_{score}", f"editing: {aspect} ({'probability' if score == 'prob' else 'greedy match'})")
                       for aspect in ("efficacy", "generalization", "locality") for score in ("prob", "em"))
"""The editing panels of `learning_curves` (columns of `Run.metrics` of an editing stream)."""


def curve_panels(metrics: pd.DataFrame) -> list[tuple[str, str]]:
    """(column, title) of the panels `learning_curves` draws for `metrics`: learning F1, known-fact F1,
    held-out NLL, the F1 of each named forgetting probe (forget/NAME/f1, in column order) and the six
    editing metrics — each only when the column holds at least one measured value."""
    probes = [(c, f"forgetting: F1 on probe {c.split('/')[1]}") for c in metrics.columns
              if c.startswith("forget/") and c.endswith("/f1") and c.count("/") == 2]
    return [(c, t) for c, t in (*CURVE_PANELS, *probes, *EDITING_PANELS) if c in metrics.columns and metrics[c].notna().any()]


def learning_curves(metrics: pd.DataFrame, *, by: str = "run", columns: int = 3) -> go.Figure:
    """Learning and forgetting against the step, one line per value of column `by` (a run name or method)
    on shared axes, one panel per measured metric (`curve_panels`), `columns` panels a row. `metrics`:
    `Run.metrics` rows, concatenated over runs with a `by` column added; a run that did not measure a
    panel's metric has no line there."""
    _require(metrics, ["step", by], "learning_curves")
    panels = curve_panels(metrics)
    cols = max(min(len(panels), columns), 1)
    rows = max(-(-len(panels) // cols), 1)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=[t for _, t in panels], shared_xaxes=True)
    colors = px.colors.qualitative.Plotly
    for i, (key, group) in enumerate(metrics.groupby(by, sort=False)):
        legend = True
        for j, (col, _) in enumerate(panels):
            if group[col].isna().all():
                continue
            fig.add_trace(go.Scatter(x=group["step"], y=group[col], mode="lines+markers", name=str(key), legendgroup=str(key),
                                     showlegend=legend, line=dict(color=colors[i % len(colors)])), row=j // cols + 1, col=j % cols + 1)
            legend = False
    fig.update_xaxes(title_text="step")
    fig.update_layout(title="Learning and forgetting", **_LAYOUT, **({"height": 320 * rows + 80} if rows > 1 else {}))
    return fig


def overlap_heatmap(matrix: pd.DataFrame, *, title: str = "Jaccard overlap of selected sets") -> go.Figure:
    """Heatmap of a square overlap matrix (`jaccard_matrix`, `overlap_matrix`, `intersection_matrix`)."""
    labels_x = [str(c) for c in matrix.columns]
    labels_y = [str(i) for i in matrix.index]
    fig = go.Figure(go.Heatmap(z=matrix.to_numpy(dtype=np.float64), x=labels_x, y=labels_y, colorscale="Viridis",
                               zmin=0, hoverongaps=False))
    fig.update_layout(title=title, yaxis_autorange="reversed", **_LAYOUT)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def churn_figure(churn: pd.DataFrame) -> go.Figure:
    """Step-to-step change of the selected set (`churn`): churn, Jaccard with the previous step and the
    share of never-before-selected slots."""
    _require(churn, ["step", "churn", "jaccard", "new_share"], "churn_figure")
    fig = go.Figure()
    for col in ("churn", "jaccard", "new_share"):
        fig.add_trace(go.Scatter(x=churn["step"], y=churn[col], mode="lines+markers", name=col))
    fig.update_layout(title="Churn of the selected set", xaxis_title="step", yaxis_title="share", yaxis_range=[0, 1.05], **_LAYOUT)
    return fig


def tfidf_history(history: pd.DataFrame, *, slot: int | None = None) -> go.Figure:
    """TF-IDF score of one slot at every step of a run: `step_table` rows of that slot (step, score,
    rank, selected), with the steps where it was not selected at score 0 when given so."""
    _require(history, ["step", "score"], "tfidf_history")
    selected = history["selected"] if "selected" in history.columns else pd.Series(True, index=history.index)
    fig = go.Figure(go.Scatter(x=history["step"], y=history["score"], mode="lines+markers", name="score",
                               marker=dict(color=np.where(selected, "crimson", "lightgray"), size=9)))
    title = "TF-IDF score across steps" + (f" — slot {slot}" if slot is not None else "")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="tf·idf (red: selected)", **_LAYOUT)
    return fig


def value_norm_history(history: pd.DataFrame, *, slot: int | None = None) -> go.Figure:
    """‖value row‖₂ of a slot after each step of a run (columns step, norm; step 0 = base model)."""
    _require(history, ["step", "norm"], "value_norm_history")
    fig = go.Figure(go.Scatter(x=history["step"], y=history["norm"], mode="lines+markers", name="‖v‖"))
    title = "Value-row norm across steps" + (f" — slot {slot}" if slot is not None else "")
    fig.update_layout(title=title, xaxis_title="step", yaxis_title="‖v‖₂", **_LAYOUT)
    return fig


def token_slot_heatmap(reads: pd.DataFrame, *, max_slots: int = 40) -> go.Figure:
    """Which slots each token of a document read (`SlotIndex.slots_for` rows: position, token, slot,
    weight): tokens down, slots across (the `max_slots` most-read), colour = summed weight over heads."""
    _require(reads, ["position", "token", "slot", "weight"], "token_slot_heatmap")
    top = reads.groupby("slot")["weight"].sum().nlargest(max_slots).index
    sub = reads[reads["slot"].isin(top)]
    grid = sub.pivot_table(index="position", columns="slot", values="weight", aggfunc="sum", fill_value=0.0)
    grid = grid.reindex(sorted(reads["position"].unique()), fill_value=0.0)
    labels = reads.drop_duplicates("position").set_index("position")["token"].reindex(grid.index)
    ylabels = [f"{p}: {t!r}" for p, t in zip(grid.index, labels)]
    fig = go.Figure(go.Heatmap(z=grid.to_numpy(), x=[str(c) for c in grid.columns], y=ylabels, colorscale="Blues"))
    fig.update_layout(title="Token × slot reads", xaxis_title="slot", yaxis_autorange="reversed", **_LAYOUT)
    fig.update_xaxes(type="category")
    fig.update_yaxes(type="category")
    return fig


def access_shift_figure(shift: pd.DataFrame) -> go.Figure:
    """Distribution of the per-token Jaccard similarity of read slots before/after (`access_shift`)."""
    _require(shift, ["jaccard"], "access_shift_figure")
    # 21 fixed bins centred on 0, 0.05, ..., 1: with plotly's automatic size, a trace whose every Jaccard is
    # 1.0 got one bin from 1 to 2
    fig = go.Figure(go.Histogram(x=shift["jaccard"], xbins=dict(start=-0.025, end=1.025, size=0.05)))
    fig.update_layout(title="Access shift: Jaccard of each token's slots, before vs after", xaxis_title="Jaccard",
                      yaxis_title="tokens", xaxis_range=[-0.03, 1.03], bargap=0.05, **_LAYOUT)
    return fig


def fact_shift_figure(shift: pd.DataFrame) -> go.Figure:
    """Per-fact mean F1 before and after (`fact_shift` rows, averaged over each fact's questions)."""
    _require(shift, ["fact_id", "f1_before", "f1_after"], "fact_shift_figure")
    per = shift.groupby("fact_id", sort=False)[["f1_before", "f1_after"]].mean().reset_index()
    fig = go.Figure([go.Bar(x=per["fact_id"], y=per["f1_before"], name="before"),
                     go.Bar(x=per["fact_id"], y=per["f1_after"], name="after")])
    fig.update_layout(title="F1 per fact, before and after", barmode="group", yaxis_range=[0, 1.05], **_LAYOUT)
    return fig


def entity_share_figure(profile: pd.DataFrame, slot: int) -> go.Figure:
    """Share of one slot's access mass per entity label (a `slot_entity_profile` row's share_* columns)."""
    _require(profile, ["slot"], "entity_share_figure")
    row = profile[profile["slot"] == slot]
    cols = [c for c in profile.columns if c.startswith("share_")]
    values = row[cols].iloc[0].to_numpy(dtype=np.float64) if len(row) else np.zeros(len(cols))
    fig = go.Figure(go.Bar(x=[c.removeprefix("share_") for c in cols], y=values))
    fig.update_layout(title=f"Entity labels slot {slot} reads on (share of its mass)", yaxis_title="share", **_LAYOUT)
    return fig


# ---- one slot's page (issue 18): rank positions, logit effects with unique bars, the key map


def rank_histogram_figure(ranks: pd.DataFrame, *, slot: int | None = None) -> go.Figure:
    """Where in its head's top-k each read of a slot landed (`rank_histogram`: rank 1..knn, reads)."""
    _require(ranks, ["rank", "reads"], "rank_histogram_figure")
    fig = go.Figure(go.Bar(x=ranks["rank"].astype(int), y=ranks["reads"], name="reads"))
    title = "Rank of the read in the head's top-k" + (f" — slot {slot}" if slot is not None else "")
    fig.update_layout(title=title, xaxis_title="rank (1 = the head's highest score)", yaxis_title="reads", bargap=0.1, **_LAYOUT)
    fig.update_xaxes(dtick=1)
    return fig


def token_bar_labels(tokens: pd.DataFrame) -> list[str]:
    """One distinct category label per row of a `promoted_tokens` frame: repr(token) and its id, so two
    tokens that render alike ("the" id 5 and "the" id 9, or ones differing only in invisible
    characters) stay two bars; a token listed twice (promoted and suppressed, in a tiny vocabulary)
    gets its direction added."""
    ids = tokens["token_id"] if "token_id" in tokens.columns else pd.Series(range(len(tokens)), index=tokens.index)
    labels = [f"{t!r} #{int(i)}" for t, i in zip(tokens["token"], ids)]
    seen: dict[str, int] = {}
    out = []
    for label, direction in zip(labels, tokens["direction"]):
        n = seen.get(label, 0)
        seen[label] = n + 1
        out.append(label if n == 0 else f"{label} ({direction}{'' if n == 1 else f' {n}'})")
    return out


def promoted_tokens_figure(tokens: pd.DataFrame) -> go.Figure:
    """Vocabulary projection of a slot (`promoted_tokens`): promoted tokens right, suppressed left, one
    bar per row (labels from `token_bar_labels`, never merged by plotly's categories)."""
    _require(tokens, ["direction", "token", "logit"], "promoted_tokens_figure")
    df = tokens.sort_values("logit", kind="stable")
    colors = np.where(df["direction"] == "promoted", "seagreen", "indianred")
    fig = go.Figure(go.Bar(x=df["logit"], y=token_bar_labels(df), orientation="h", marker_color=colors))
    fig.update_layout(title="Promoted and suppressed tokens", xaxis_title="projected logit",
                      height=max(300, 22 * len(df) + 100), **_LAYOUT)
    fig.update_yaxes(type="category")
    return fig


def key_map_figure(grid: np.ndarray, *, slot: int | None = None, max_cells: int = 256) -> go.Figure:
    """Reads over the product-key grid (`key_map`: n_keys × n_keys, row i1, column i2), colour
    log10(1 + reads), `slot` marked with a cross. A grid wider than `max_cells` is shown summed over
    square blocks (the title says how many sub-keys a cell covers)."""
    grid = np.asarray(grid, dtype=np.float64)
    n = grid.shape[0]
    block = max(1, -(-n // max_cells))
    if block > 1:
        m = -(-n // block)
        padded = np.zeros((m * block, m * block))
        padded[:n, :n] = grid
        grid = padded.reshape(m, block, m, block).sum(axis=(1, 3))
    fig = go.Figure(go.Heatmap(z=np.log10(1 + grid), colorscale="Viridis", colorbar=dict(title="log10(1+reads)"),
                               customdata=grid, hovertemplate="i1 %{y}, i2 %{x}: %{customdata:.0f} reads<extra></extra>"))
    if slot is not None:
        i1, i2 = divmod(int(slot), n)
        fig.add_trace(go.Scatter(x=[i2 // block], y=[i1 // block], mode="markers", name=f"slot {slot}",
                                 marker=dict(symbol="x", size=14, color="crimson", line=dict(width=2))))
    cover = f" (a cell = {block}×{block} sub-key pairs)" if block > 1 else ""
    fig.update_layout(title=f"Reads over the key grid (row i1, column i2){cover}", xaxis_title="i2", yaxis_title="i1",
                      yaxis_autorange="reversed", height=520, **_LAYOUT)
    return fig




# ---- the Overview (issue 18): learning against forgetting of every run, reads per slot pre-binned


def learning_forgetting_figure(runs: pd.DataFrame, *, x: str = "known EM drop", y: str = "learning EM") -> go.Figure:
    """One point per run: learning (`y`, e.g. the summary's learning EM at the end) against forgetting
    (`x`, e.g. the known-fact EM drop from the run's start), one colour per method. `runs`: columns run,
    method, `x`, `y`, optionally config (a dict per run, shown on hover); rows with `x` or `y` missing are
    left out. Names and config values are HTML-escaped (plotly renders its hover and legend text as markup)."""
    _require(runs, ["run", "method", x, y], "learning_forgetting_figure")
    shown = runs.dropna(subset=[x, y])
    fig = go.Figure()
    for method, group in shown.groupby("method", sort=True):
        hover = []
        for row in group.to_dict("records"):
            lines = [f"<b>{_e(row['run'])}</b>", f"{_e(y)}: {float(row[y]):.3f}", f"{_e(x)}: {float(row[x]):.3f}"]
            config = row.get("config")
            if isinstance(config, dict):
                lines += [f"{_e(k)}: {_e(v)}" for k, v in config.items() if not isinstance(v, (list, dict))]
            hover.append("<br>".join(lines))
        fig.add_trace(go.Scatter(x=group[x].astype(float).tolist(), y=group[y].astype(float).tolist(), mode="markers+text",
                                 name=_e(method), text=[_e(n) for n in group["run"]], textposition="top center",
                                 hovertext=hover, hoverinfo="text", marker=dict(size=12)))
    fig.update_layout(title="Learning against forgetting, one point per run", xaxis_title=f"forgetting: {x}",
                      yaxis_title=f"learning: {y}", legend_title="method", **_LAYOUT)
    return fig


def slot_reads_histogram(counts: np.ndarray | Sequence[int], *, bins: int = 40, title: str = "Reads per slot") -> go.Figure:
    """`access_histogram` binned here (numpy), so the figure holds `bins` + 1 bars and not one value per
    slot (a memory of millions of slots draws as fast as a small one): the first bar, apart, is the dead
    slots (0 reads); the others split 1..max reads into `bins` equal ranges."""
    counts = np.asarray(counts, dtype=np.int64)
    dead = int((counts == 0).sum())
    read = counts[counts > 0]
    fig = go.Figure(go.Bar(x=[0], y=[dead], name="dead (0 reads)", marker_color="indianred", width=[0.8],
                           hovertemplate="0 reads: %{y} slots<extra></extra>"))
    if len(read):
        top = int(read.max())
        n = max(1, min(bins, top))
        edges = np.linspace(1, top + 1, n + 1)
        hist, _ = np.histogram(read, bins=edges)
        lo, hi = np.ceil(edges[:-1]).astype(int), np.ceil(edges[1:]).astype(int) - 1
        labels = [f"{a}" if a == b else f"{a}–{b}" for a, b in zip(lo, hi)]
        fig.add_trace(go.Bar(x=((edges[:-1] + edges[1:]) / 2 - 0.5).tolist(), y=hist.tolist(), width=(np.diff(edges) * 0.95).tolist(), name="read",
                             customdata=labels, hovertemplate="%{customdata} reads: %{y} slots<extra></extra>",
                             marker_color="steelblue"))
    fig.update_layout(title=title, xaxis_title="reads of a slot", yaxis_title="slots", showlegend=True, **_LAYOUT)
    return fig


