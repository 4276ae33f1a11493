"""Render a report dict (as `build_diff_report` / `build_run_report` return it) as one self-contained HTML
file (plotly.js inlined once, no network references, every text value escaped) or as Markdown."""

from __future__ import annotations

import html
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from smviz import figures
from smviz.io import json_text

_CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:.5em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
.protocol{color:#555;font-size:.85em}.smviz-context{font-family:monospace;margin:.2em 0}.smviz-meta{color:#777;font-size:.8em}"""


def e(text: Any) -> str:
    """HTML-escaped text (quotes too), as app/_common.e: corpus and fact text is data, never markup."""
    return html.escape(str(text), quote=True)


def _fmt(x: Any) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (list, dict)):
        return json_text(x, indent=None)
    return str(x)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of the rows, first seen first (rows may differ: gain in one, relative_drop in the next)."""
    return list(dict.fromkeys(k for r in rows for k in r))


def _table_html(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "<p><em>none</em></p>"
    columns = columns or _columns(rows)
    head = "".join(f"<th>{e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{e(_fmt(r.get(c)))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _md_cell(x: Any) -> str:
    # Markdown renderers pass inline HTML through: escape it, and the table syntax
    return e(_fmt(x)).replace("|", "\\|").replace("\n", " ")


def _table_md(rows: list[dict[str, Any]], columns: list[str] | None = None) -> str:
    if not rows:
        return "_none_\n"
    columns = columns or _columns(rows)
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_md_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _fig(fig: go.Figure) -> str:
    fig.update_layout(template=figures.REPORT_TEMPLATE)
    return fig.to_html(full_html=False, include_plotlyjs=False, config={"displaylogo": False})


def _context_html(c: dict[str, Any]) -> str:
    """One context (SlotIndex.contexts record), escaped and highlighted as app/_common.context_html does."""
    window, f = list(c["window"]), int(c["focus"])
    meta = e(f"#{c['rank']} · {c['doc_id']} · pos {c['position']} · weight {float(c['weight']):.3f}")
    return (f'<div class="smviz-context"><span class="smviz-meta">{meta}</span><br>{e("".join(window[:f]))}'
            f'<mark>{e(window[f])}</mark>{e("".join(window[f + 1:]))}</div>')


# --------------------------------------------------------------------------- sections (shared by html and md)


def _sections(report: dict[str, Any]) -> list[tuple[str, str, list[tuple[str, Any]]]]:
    """(title, protocol, parts) per section; a part is ('table', (rows, columns)), ('fig', Figure),
    ('text', str) or ('html', trusted markup built from escaped values)."""
    return _diff_sections(report) if report["kind"] == "diff" else _run_sections(report)


_ITEM_COLUMNS = {
    "facts": ["fact_id", "subject", "relation", "gold", "answer_before", "answer_after", "f1_before", "f1_after",
              "slots_trained", "entity_share", "statement"],
    "edits": ["id", "subject", "rewrite_prompt", "target_true", "target_new", "continuation_before", "continuation_after",
              "efficacy_prob_before", "efficacy_prob_after", "efficacy_em_before", "efficacy_em_after", "slots_trained",
              "entity_share"],
}
"""The per-item table's columns, by what a diff compared (its JSON rows hold more)."""
_ITEM_TITLES = {"facts": ("learning", "Per fact", "fact", "facts"), "edits": ("editing", "Per editing record", "record", "records")}
"""(what the summary measured, the per-item section's title, an item, items) by what a diff compared."""


def _diff_sections(r: dict[str, Any]) -> list:
    kind = r.get("compared", "facts")  # reports written before editing diffs compared facts
    measured, per_item, one, noun = _ITEM_TITLES[kind]
    out = [(f"Summary: {measured} and forgetting", r["summary"]["protocol"], [("table", (r["summary"]["metrics"], None))])]
    mem = r["memory"]
    norms = pd.DataFrame(mem["delta_norm"])
    parts: list = [("text", f"{mem['changed_slots']} value rows changed ({mem['changed_slots_per_layer']}); "
                            f"{mem['violations']} audit violations.")]
    if len(norms):
        hist = go.Figure(go.Histogram(x=norms["delta_norm"], nbinsx=30))  # no ‖ΔV‖ histogram in smviz.figures
        hist.update_layout(title="‖ΔV‖₂ of the changed value rows", xaxis_title="‖ΔV‖₂", yaxis_title="rows", template="plotly_white")
        parts.append(("fig", hist))
        parts.append(("table", ([mem["delta_norm_quantiles"]], None)))
    parts.append(("text", "Frozen-parameter audit"))
    parts.append(("table", (mem["audit"], None)))
    out.append(("Memory changes", mem["protocol"], parts))
    items = r[kind]
    item_parts: list = [("table", (items["table"], _ITEM_COLUMNS[kind]))]
    if items.get("questions"):
        item_parts.append(("fig", figures.fact_shift_figure(pd.DataFrame(items["questions"]))))
    out.append((per_item, items["protocol"], item_parts))
    ash = r["access_shift"]
    parts = [("table", (ash["per_layer"], None))]
    if ash["jaccard"]:
        parts.append(("fig", figures.access_shift_figure(pd.DataFrame({"jaccard": ash["jaccard"]}))))
    out.append(("Access shift on the probe set", ash["protocol"], parts))
    ov = r["overlap"]
    ids = ov[kind]
    parts = []
    if ids:
        m = pd.DataFrame(ov["matrix"], index=ids, columns=ids).astype(float)
        parts.append(("fig", figures.overlap_heatmap(m, title=f"Jaccard of the {noun}' trained slot sets")))
        parts.append(("table", ([{one: f, **{g: v for g, v in zip(ids, row)}} for f, row in zip(ids, ov["matrix"])], None)))
    out.append((f"Overlap of the {noun}' slot sets", ov["protocol"], parts))
    parts = []
    for s in r["top_slots"]["slots"]:
        parts.append(("text", f"layer {s['layer']} slot {s['slot']}: ‖ΔV‖₂ {_fmt(s['delta_norm'])}, "
                              f"relative change {_fmt(s['relative_change'])}, allowed {s['allowed']}"))
        if s["entity_profile"]:
            prof = {k: v for k, v in s["entity_profile"].items() if k in ("reads", "entity_mass_share", "top1", "top2", "top3", "q_value")
                    or k.startswith("share_")}
            parts.append(("table", ([prof], None)))
        parts.append(("contexts", s["contexts"]))
    out.append(("Top changed slots", r["top_slots"]["protocol"], parts))
    return out


def _run_sections(r: dict[str, Any]) -> list:
    runs = r["runs"]
    curves = pd.concat([pd.DataFrame(x["curves"]).assign(run=x["label"]) for x in runs], ignore_index=True)
    parts: list = [("fig", figures.learning_curves(curves, by="run"))]
    if len(runs) > 1:  # the paper's Fig. 3 view: one point per run (not in smviz.figures)
        drawn = [x for x in runs if x["pareto"]["forgetting_f1_relative_drop"] is not None and x["pareto"]["learning_f1_gain"] is not None]
        pts = go.Figure()
        for x in drawn:
            pts.add_trace(go.Scatter(x=[x["pareto"]["forgetting_f1_relative_drop"]], y=[x["pareto"]["learning_f1_gain"]],
                                     mode="markers+text", text=[x["label"]], textposition="top center", name=x["label"]))
        pts.update_layout(title="Learning vs forgetting per run", xaxis_title="relative drop of F1 on known facts (else the first probe)",
                          yaxis_title="learning F1 gain", template="plotly_white")
        parts.append(("fig", pts))
        if len(drawn) < len(runs):
            parts.append(("text", "not drawn (learning gain or forgetting drop not measured, or a start of 0): "
                                  + ", ".join(x["label"] for x in runs if x not in drawn)))
    parts.append(("table", ([{"run": x["label"], "method": x["method"], "stream": x["stream"], "steps": x["steps"],
                              "facts": x["facts"], **x["pareto"]} for x in runs], None)))
    out = [("Runs", r["protocol"], parts)]
    for x in runs:
        parts = [("table", (x["summary"], None)), ("text", "Curves (metrics.jsonl)"), ("table", (x["curves"], None))]
        items = x["items"]  # no rows for runs written before stream.jsonl
        parts.append(("text", f"Stream: {len(items['rows'])} items ({items['kind']}, stream.jsonl)"))
        parts.append(("table", (items["rows"], items["columns"])))
        if x["dynamics"]:
            for layer, d in x["dynamics"].items():
                parts.append(("text", f"layer {layer}: {d['ever_selected']} slots ever selected, "
                                      f"{d['reused_by_several_facts']} by more than one fact"))
                parts.append(("fig", figures.churn_figure(pd.DataFrame(d["churn"]))))
                parts.append(("table", (d["churn"], None)))
        else:
            parts.append(("text", "no selected-slot dynamics (the method selects no value rows)"))
        parts.append(("text", "Per fact" if x["stream"] == "facts" else "Per stream item"))
        parts.append(("table", (x["per_fact"], None)))
        out.append((f"Run {x['label']} ({x['method']})", x["protocol"] + " " + x["dynamics_protocol"], parts))
    return out


def _title(report: dict[str, Any]) -> str:
    h = report["model_hashes"]
    if report["kind"] == "diff":
        return f"smviz diff report: {h['before']} → {h['after']}"
    return "smviz run report: " + ", ".join(f"{k} ({v['before']} → {v['after']})" for k, v in h["runs"].items())


def render_html(report: dict[str, Any]) -> str:
    """One self-contained HTML page: plotly.js inlined once in the head; nothing is fetched when opened."""
    from plotly.offline import get_plotlyjs

    body = [f"<h1>{e(_title(report))}</h1>", f"<p class=protocol>model hashes: {e(json_text(report['model_hashes'], indent=None))}</p>"]
    if report.get("warning"):
        body.append(f"<p><strong>{e(report['warning'])}</strong></p>")
    for title, protocol, parts in _sections(report):
        body.append(f"<h2>{e(title)}</h2><p class=protocol>{e(protocol)}</p>")
        for kind, x in parts:
            if kind == "table":
                body.append(_table_html(*x))
            elif kind == "fig":
                body.append(_fig(x))
            elif kind == "contexts":
                body.append("".join(_context_html(c) for c in x))
            else:
                body.append(f"<p>{e(x)}</p>")
    js = get_plotlyjs().replace("</script", "<\\/script")
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; script-src 'unsafe-inline' 'unsafe-eval'; "
            "style-src 'unsafe-inline'; img-src data:; font-src data:\">"
            f"<title>{e(_title(report))}</title><style>{_CSS}</style>\n<script type=\"text/javascript\">{js}</script>\n"
            "</head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def render_md(report: dict[str, Any]) -> str:
    """Markdown for a pull request or a paper draft: the tables and protocols (figures are HTML-only)."""
    lines = [f"# {_md_cell(_title(report))}", "", f"Model hashes: `{json_text(report['model_hashes'], indent=None)}`", ""]
    if report.get("warning"):
        lines += [f"**{_md_cell(report['warning'])}**", ""]
    for title, protocol, parts in _sections(report):
        lines += [f"## {_md_cell(title)}", "", f"_Protocol: {_md_cell(protocol)}_", ""]
        for kind, x in parts:
            if kind == "table":
                lines.append(_table_md(*x))
            elif kind == "contexts":
                for c in x:
                    w, f = list(c["window"]), int(c["focus"])
                    lines.append(f"- {_md_cell(''.join(w[:f]))}**{_md_cell(w[f])}**{_md_cell(''.join(w[f + 1:]))} "
                                 f"(weight {float(c['weight']):.3f})")
                lines.append("")
            elif kind == "text":
                lines += [_md_cell(x), ""]
    return "\n".join(lines)
