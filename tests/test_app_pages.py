"""The Slot page at the level of a feature page, and the Probe, Search and Steer pages (issue 18): each
driven with AppTest on one small micro workspace (one new fact recorded, a one-step sparse run, and a
hostile fact recorded into its own trace), the numbers shown checked against the smviz functions that
make them, and hostile corpus / fact / typed text checked to arrive as escaped text."""

from __future__ import annotations

import html
import io
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from apptest import ok  # noqa: E402

APP = Path(__file__).resolve().parents[1] / "app"
sys.path.insert(0, str(APP))
import _common as c  # noqa: E402  (the app's own escaping and export, as the pages use them)

SCRIPT = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
RLO = "\u202e"
HOSTILE = f"{SCRIPT} {IMG} {RLO}evil"
FRESH = "Zebras quietly juggle seventeen violet umbrellas."  # no fact or test text holds it


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from micro_workspace import build_micro_workspace, record

    from smviz.train.finetune import FinetuneConfig
    from smviz.workspace.stages import run_finetune

    ws = build_micro_workspace(tmp_path_factory.mktemp("pages") / "ws", stats_batches=4, trace=True, runs=(), n_new=1)
    config = FinetuneConfig(method="sparse", top_t=16, batch_size=4, steps_per_fact=1, eval_every=1)
    run_finetune(ws.model("micro"), ws.run("sparse"), config, stream=ws.data / "facts-new.jsonl",
                 heldout=ws.data / "corpus-heldout.jsonl", heldout_rows=1, max_facts=1, progress=False)
    fact = {"id": "xss/0", "subject": f"Ada {SCRIPT}", "relation": "birthplace", "answer": f"{IMG}{RLO}Paris",
            "statements": [f"Ada {SCRIPT} was born in {IMG} {RLO}Paris.", f"The birthplace of Ada {SCRIPT} is {IMG}{RLO}Paris."],
            "questions": [{"text": f"Where was Ada {SCRIPT} born?", "template": "birthplace/q0", "heldout": False}],
            "entities": []}
    (ws.data / "facts-xss.jsonl").write_text(json.dumps(fact) + "\n")
    record(ws, ws.data / "facts-xss.jsonl", "xss")
    return ws


@pytest.fixture(scope="module")
def lib(ws):
    """The library objects the pages are checked against."""
    from smviz.analysis import Run
    from smviz.model import MemoryModel
    from smviz.stats import SlotStats
    from smviz.trace import Trace

    trace = Trace.load(ws.trace("new"))
    return {"trace": trace, "index": trace.slot_index(), "model": MemoryModel.from_pretrained(ws.model("micro")),
            "stats": SlotStats.load_for_model(ws.model("micro")), "run": Run(ws.run("sparse"))}


def page(monkeypatch, ws, name: str) -> AppTest:
    monkeypatch.setenv("SMVIZ_WORKSPACE", str(ws.root))
    return AppTest.from_file(str(next((APP / "pages").glob(f"*_{name}.py"))), default_timeout=120)


TABLES = {  # plain st.dataframe elements carry no key in AppTest: each table known by columns only it has
    "card_runs": ("steps_selected", "delta_norm"), "buckets_table": ("bucket", "bucket_tokens"),
    "promoted_table": ("direction", "logit"), "ablation_table": ("logprob_before", "delta"),
    "probe_slots": ("open", "rank", "reads"), "probe_wide": ("top slots (weight)",), "token_results": ("tokens", "weight", "label"),
    "fact_link": ("fact", "open"), "fact_core": ("reads in trace",), "entity_results": ("entity_mass_share", "q_value"),
}


def table(at: AppTest, key: str) -> pd.DataFrame:
    """The table shown with `key` (a selectable one) or with the columns TABLES names for it."""
    for d in at.dataframe:
        if d.key == key or (key in TABLES and all(col in d.value.columns for col in TABLES[key])):
            return d.value
    raise AssertionError(f"no table {key}: {[list(d.value.columns) for d in at.dataframe]}")


def markup(at: AppTest) -> str:
    """Everything the page renders as markdown or HTML (bodies, captions, headers)."""
    return "\n".join(str(e.value) for kind in ("markdown", "caption", "subheader", "header", "title", "html")
                     for e in at.get(kind))


def assert_no_markup(at: AppTest) -> str:
    body = markup(at)
    assert "<script" not in body.lower() and "<img" not in body.lower(), "raw markup reached a markdown/html element"
    assert RLO not in body, "a raw right-to-left override reached a markdown/html element"
    return body


def shown_text(fragment: str) -> str:
    """The text a browser shows for an HTML fragment: tags dropped, entities decoded."""
    return html.unescape(re.sub(r"<[^>]+>", "", fragment))


# ---------------------------------------------------------------- Slot


def test_slot_page_opens_on_the_most_read_slot_with_the_card(monkeypatch, ws, lib):
    from smviz.analysis import slot_card

    trace, index = lib["trace"], lib["index"]
    at = ok(page(monkeypatch, ws, "Slot").run())
    slot = at.number_input(key="slot").value
    counts = trace.slot_counts()
    assert slot == int(np.argmax(counts)) and counts[slot] > 0  # not a dead slot 0
    assert at.selectbox(key="slot_pick").value == slot
    assert at.selectbox(key="slot_pick").options[0].startswith(f"{slot} · {counts[slot]:,} reads")

    card = slot_card(index, slot, model=lib["model"], stats=lib["stats"], runs=[lib["run"]])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Reads in trace"] == f"{card['reads']:,}" and metrics["Reading tokens"] == f"{card['reading_tokens']:,}"
    assert metrics["Density"] == f"{card['density']:.1%}" and metrics["Mean weight"] == f"{card['mean_weight']:.3f}"
    assert metrics["Max weight"] == f"{card['max_weight']:.3f}" and metrics["Sub-keys (i1, i2)"] == f"({card['i1']}, {card['i2']})"
    assert metrics["Value norm"] == f"{card['value_norm']:.3f}" and metrics["IDF"] == f"{card['idf']:.3f}"
    assert metrics["Background DF"] == f"{card['df']:,} / {card['background_docs']:,}"
    assert metrics["Entity label"] == "—"  # entities off
    shown = json.loads(at.json[0].value)
    assert shown == json.loads(json.dumps(card))
    runs = table(at, "card_runs")
    assert runs["run"].tolist() == ["sparse"] and runs["selected"].tolist() == [card["runs"][0]["selected"]]
    assert [t.label for t in at.tabs] == ["Contexts", "Histograms", "Logit effects", "Ablation", "Neighbours", "Key map", "Runs", "Entities"]
    assert card["label"] and any(c.md(card["label"]) in m.value for m in at.markdown)

    # contexts with the read token marked and the next token named, then the weight intervals
    body = "\n".join(m.value for m in at.markdown)
    ctx = index.contexts(slot, n=20, window=8)
    assert body.count('class="smviz-context"') == len(ctx)
    assert f"next {ctx['next_token'].iloc[0]!r}" in shown_text(body)
    buckets = table(at, "buckets_table")
    assert body.count('class="smviz-context smviz-bucket"') == len(buckets) and buckets["bucket"].iloc[0] == "top"
    assert {"weight_hist", "rank_hist", "key_map_fig", "promoted_fig"} <= {ch.key for ch in at.get("plotly_chart")}

    # exports: both buttons; the bytes they carry hold the card, the contexts and the provenance
    assert [b.label for b in at.download_button] == ["Card + contexts (JSON)", "Card + contexts (Parquet)"]
    import pyarrow.parquet as pq

    as_json, as_parquet = c.export_bytes(card, ctx, {"trace": "new"})
    doc = json.loads(as_json)
    assert doc["card"] == json.loads(json.dumps(card)) and len(doc["contexts"]) == len(ctx)
    back = pq.read_table(io.BytesIO(as_parquet))
    assert back.num_rows == len(ctx) and json.loads(back.schema.metadata[b"smviz.slot_card"])["reads"] == card["reads"]
    footer = "\n".join(x.value for x in at.caption)
    assert trace.model_hash in footer and f"{trace.n_tokens:,} tokens" in footer and "background:" in footer


def test_slot_page_neighbours_ablation_and_picker(monkeypatch, ws, lib):
    from smviz.analysis import ablation_effects, co_read_neighbours, subkey_neighbours, value_neighbours

    trace, index, model = lib["trace"], lib["index"], lib["model"]
    slot = int(np.argsort(-trace.slot_counts(), kind="stable")[3])
    at = page(monkeypatch, ws, "Slot")
    at.query_params["slot"] = str(slot)
    ok(at.run())
    assert at.number_input(key="slot").value == slot
    assert table(at, "co_read_table")["slot"].tolist() == co_read_neighbours(index, slot)["slot"].tolist()
    assert table(at, "value_table")["slot"].tolist() == value_neighbours(model, slot)["slot"].tolist()
    assert table(at, "subkey_table")["slot"].tolist() == subkey_neighbours(trace, slot)["slot"].tolist()
    assert table(at, "co_read_table")["open"].iloc[0].startswith("/Slot?trace=new&slot=")
    labels = [b for b in at.get("plotly_chart") if b.key == "promoted_fig"]
    y = json.loads(labels[0].proto.spec)["data"][0]["y"]
    assert len(set(y)) == len(y) == len(table(at, "promoted_table"))

    at.button(key="ablate_slot").click().run()
    ok(at)
    want = ablation_effects(model, index, slot, n=10)
    np.testing.assert_allclose(table(at, "ablation_table")["delta"].to_numpy(), want["delta"].to_numpy())

    other = at.selectbox(key="slot_pick").options[1]
    at.selectbox(key="slot_pick").set_value(int(other.split(" ")[0])).run()
    ok(at)
    assert at.number_input(key="slot").value == int(other.split(" ")[0])


def test_promoted_bars_keep_tokens_that_render_alike():
    from smviz import figures

    pt = pd.DataFrame({"direction": ["promoted", "promoted", "promoted", "suppressed"], "rank": [0, 1, 2, 0],
                       "token_id": [5, 9, 11, 5], "token": ["the", "the", "the ", "the"], "logit": [3.0, 2.0, 1.0, -1.0]})
    fig = figures.promoted_tokens_figure(pt)
    assert len(fig.data[0].x) == 4 and len(set(fig.data[0].y)) == 4  # four bars, none merged
    assert list(fig.data[0].x) == [-1.0, 1.0, 2.0, 3.0]
    assert "'the' #9" in fig.data[0].y and "'the ' #11" in fig.data[0].y


# ---------------------------------------------------------------- Probe


def test_probe_page_reads_fresh_text_like_read_text(monkeypatch, ws, lib):
    from smviz.analysis import read_text, text_top_slots

    at = ok(page(monkeypatch, ws, "Probe").run())
    assert at.text_area(key="probe_text").value  # a sentence of the workspace's facts
    at.text_area(key="probe_text").input(FRESH).run()
    ok(at)
    want = text_top_slots(read_text(lib["model"], FRESH, layer=lib["trace"].layers[0]), 5)
    got = table(at, "probe_slots")
    cols = ["position", "layer", "slot", "rank", "reads"]
    pd.testing.assert_frame_equal(got[cols].reset_index(drop=True), want[cols].reset_index(drop=True), check_dtype=False)
    np.testing.assert_allclose(got["weight"].to_numpy(), want["weight"].to_numpy())
    assert got["open"].iloc[0] == f"/Slot?trace=new&slot={want['slot'].iloc[0]}"  # a trace of this model
    assert len(table(at, "probe_wide")) == want["position"].nunique()
    assert "probe_heatmap" in {ch.key for ch in at.get("plotly_chart")}


# ---------------------------------------------------------------- Search


def test_search_page_token_and_fact(monkeypatch, ws, lib):
    from smviz.analysis import core_set, token_search

    index = lib["index"]
    at = ok(page(monkeypatch, ws, "Search").run())
    at.text_input(key="query").input("the").run()
    ok(at)
    got = table(at, "token_results")
    want = token_search(index, "the", top=20)
    assert got["slot"].tolist() == want["slot"].tolist() and got["reads"].tolist() == want["reads"].tolist()
    assert got["open"].tolist() == [f"/Slot?trace=new&slot={s}" for s in want["slot"]]
    at.radio(key="match").set_value("substring").run()
    assert table(at, "token_results")["slot"].tolist() == token_search(index, "the", match="substring", top=20)["slot"].tolist()

    fact_id = at.selectbox(key="fact").value
    assert table(at, "fact_link")["open"].iloc[0] == f"/Fact?fact={fact_id.replace('/', '%2F')}&trace=new"
    assert table(at, "fact_core")["slot"].tolist() == core_set(lib["trace"], fact_id).tolist()
    # the Fact page opens on ?fact=
    fact = page(monkeypatch, ws, "Fact")
    fact.query_params["fact"] = fact_id
    ok(fact.run())
    assert fact.selectbox(key="fact").value == fact_id


def test_search_page_entities(monkeypatch, ws):
    at = ok(page(monkeypatch, ws, "Search").run())
    at.toggle(key="entities_on").set_value(True).run()
    ok(at)
    _, _, profile = c.load_entities(str(ws.trace("new")), str(ws.data))
    label = at.text_input(key="entity_query").value
    col = f"share_{label}"
    want = profile[profile["reads"] >= 2].sort_values([col, "reads"], ascending=[False, False]).head(20)
    assert table(at, "entity_results")["slot"].tolist() == want["slot"].tolist()


# ---------------------------------------------------------------- Steer


def test_steer_page_matches_steer_generate(monkeypatch, ws, lib):
    from smviz.analysis import steer_generate

    slot = int(np.argmax(lib["trace"].slot_counts()))
    at = page(monkeypatch, ws, "Steer")
    at.query_params["slot"] = str(slot)
    ok(at.run())
    assert at.text_input(key="slots").value == str(slot)
    at.radio(key="mode").set_value("force").run()
    at.button(key="generate").click().run()
    ok(at)
    prompt, answer = at.text_area(key="prompt").value, at.text_input(key="answer").value
    want = steer_generate(lib["model"], prompt, force=[slot], force_weight=0.5, answer=answer, question=True,
                          max_new_tokens=20, layer=lib["trace"].layers[0])
    metrics = {m.label: m for m in at.metric}
    assert metrics["log p(answer) before"].value == f"{want['logprob_before']:.4f}"
    assert metrics["log p(answer) after"].value == f"{want['logprob_after']:.4f}"
    assert metrics["log p(answer) after"].delta == f"{want['delta_logprob']:+.4f}"
    texts = [t.value for t in at.text]
    assert texts == [f"{len(want['tokens_before'])} tokens: {want['tokens_before']}", f"{len(want['tokens_after'])} tokens: {want['tokens_after']}"]
    body = "\n".join(m.value for m in at.markdown)
    assert c.esc(want["prompt"]) + '<mark class="smviz-focus">' + c.esc(want["text_before"]) in body
    assert c.esc(want["text_after"]) in body


# ---------------------------------------------------------------- hostile text


def test_hostile_text_stays_text(monkeypatch, ws):
    from smviz.trace import Trace

    # Slot: a trace whose corpus holds the markup and the override
    xss = Trace.load(ws.trace("xss"))
    at = page(monkeypatch, ws, "Slot")
    at.query_params["trace"] = "xss"
    ok(at.run())
    body = assert_no_markup(at)
    assert "&lt;" in body and "&gt;" in body  # the markup characters arrive escaped
    assert at.number_input(key="slot").value == int(np.argmax(xss.slot_counts()))

    # Probe: typed into the box, shown token by token as the tokens decode (the byte-level tokenizer
    # splits the override into bytes that decode to U+FFFD each; whatever a token holds stays text)
    at = ok(page(monkeypatch, ws, "Probe").run())
    at.text_area(key="probe_text").input(HOSTILE).run()
    ok(at)
    assert_no_markup(at)
    tokens = next(m.value for m in at.markdown if "smviz-tok" in m.value and "<div" in m.value)
    decoded = table(at, "probe_slots").drop_duplicates("position")["token"]
    assert shown_text(tokens.split("</style>")[1]) == "".join(decoded) and "".join(decoded).startswith(SCRIPT)

    # Search: the query echoed, the hostile fact's fields shown
    at = page(monkeypatch, ws, "Search")
    at.query_params["trace"] = "xss"
    ok(at.run())
    at.text_input(key="query").input(SCRIPT).run()
    at.radio(key="match").set_value("substring").run()
    ok(at)
    body = assert_no_markup(at)
    assert "&lt;script&gt;alert\\(1\\)&lt;/script&gt;" in body and "&lt;img src=x onerror=alert\\(1\\)&gt;" in body
    assert "⟨U+202E⟩" in body

    # Steer: a hostile prompt and answer
    at = page(monkeypatch, ws, "Steer")
    at.query_params["slot"] = "1"
    ok(at.run())
    at.text_area(key="prompt").input(HOSTILE).run()
    at.text_input(key="answer").input(IMG).run()
    at.button(key="generate").click().run()
    ok(at)
    body = assert_no_markup(at)
    assert c.esc(HOSTILE) in body and "&lt;script&gt;alert(1)&lt;/script&gt;" in body

