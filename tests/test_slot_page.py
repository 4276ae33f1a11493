"""The slot page's library functions (`smviz.analysis.slot_page`) against brute-force references computed
from the raw accesses table with plain pandas / Python sets, the index's `ranks` array and its cache
(round trip, old format rebuilt), and the refusal of bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from smviz.analysis.runs import Run
from smviz.analysis.slot_page import (
    co_read_neighbours,
    key_map,
    rank_histogram,
    slot_card,
    slot_label,
    subkey_neighbours,
    token_search,
    value_neighbours,
    weight_buckets,
)
from smviz.data.corpus import load_articles
from smviz.data.tokenizer import train_tokenizer
from smviz.errors import AnalysisError, SmvizError
from smviz.model import MemoryModel
from smviz.record import AccessRecorder
from smviz.stats import SlotStats
from smviz.trace import INDEX_FORMAT, SlotIndex, Trace
from smviz.train.rundir import RUN_FORMAT, FinetuneRunDir

LAYER = 1  # the micro preset's memory block


@pytest.fixture(scope="module")
def setting():
    """The micro model (hash set) with a small tokenizer and an in-memory trace of 12 short articles
    recorded in two calls; the accesses joined with token columns; per-token weights of every slot."""
    articles = load_articles()[:20]
    tokenizer = train_tokenizer([a.text for a in articles], vocab_size=300)
    model = MemoryModel.from_preset("micro", seed=0, vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    model.model_hash = "b" * 16
    model.eval()
    enc = tokenizer([a.text for a in articles[:12]], return_tensors="pt", padding=True, truncation=True, max_length=40)
    with torch.no_grad(), AccessRecorder(model) as rec:
        for part in (slice(0, 6), slice(6, 12)):
            model(input_ids=enc["input_ids"][part], attention_mask=enc["attention_mask"][part])
    trace = rec.trace()
    acc = trace.to_pandas()
    per_token = acc.groupby(["slot", "token"])["weight"].agg(lambda w: w.astype(np.float64).sum()).rename("weight").reset_index()
    return model, trace, acc, per_token


def busiest(acc: pd.DataFrame, i: int = 0) -> int:
    counts = acc["slot"].value_counts()
    return int(sorted(counts.index, key=lambda s: (-counts[s], s))[i])


def unused(trace: Trace, acc: pd.DataFrame) -> int:
    dead = sorted(set(range(trace.n_slots)) - set(acc["slot"]))
    assert dead, "the micro trace reads every slot; pick a smaller one"
    return dead[0]


def brute_top(per_token: pd.DataFrame, slot: int) -> pd.DataFrame:
    hits = per_token[per_token["slot"] == slot]
    return hits.sort_values(["weight", "token"], ascending=[False, True]).reset_index(drop=True)


def test_ranks_histogram_and_reading_tokens_match_the_accesses(setting):
    _, trace, acc, _ = setting
    index = trace.slot_index()
    for slot in (busiest(acc), busiest(acc, 5), unused(trace, acc)):
        mine = acc[acc["slot"] == slot]
        assert np.array_equal(index.slot_ranks(slot), mine["rank"].to_numpy())
        assert np.array_equal(index.slot_heads(slot), mine["head"].to_numpy())
        hist = rank_histogram(index, slot)
        assert hist["rank"].tolist() == [1, 2, 3, 4]  # micro: knn = 4
        assert hist["reads"].tolist() == [int((mine["rank"] == r).sum()) for r in range(4)]
    brute = acc.groupby("slot")["token"].nunique().reindex(range(trace.n_slots), fill_value=0)
    assert np.array_equal(index.reading_tokens(), brute.to_numpy())


def test_ranks_are_cached_and_an_old_format_cache_is_rebuilt(setting, tmp_path, caplog):
    _, trace, acc, _ = setting
    saved = trace.save(tmp_path / "t")
    built = saved.slot_index()
    info_file = tmp_path / "t" / "index" / "index.json"
    assert json.loads(info_file.read_text())["format"] == INDEX_FORMAT and (tmp_path / "t" / "index" / "ranks.npy").is_file()
    cached = SlotIndex.for_trace(Trace.load(tmp_path / "t"))
    assert isinstance(cached.ranks, np.memmap) and np.array_equal(cached.ranks, built.ranks)
    slot = busiest(acc)
    assert np.array_equal(cached.slot_ranks(slot), acc[acc["slot"] == slot]["rank"].to_numpy())

    # an index cached by an older smviz: format 1, no ranks.npy
    info = json.loads(info_file.read_text())
    (tmp_path / "t" / "index" / "ranks.npy").unlink()
    info_file.write_text(json.dumps(info | {"format": "smviz-slot-index/1"}))
    with caplog.at_level("INFO", logger="smviz.trace.index"):
        rebuilt = SlotIndex.for_trace(Trace.load(tmp_path / "t"))
    assert "rebuilding" in caplog.text and not isinstance(rebuilt.ranks, np.memmap)
    assert np.array_equal(rebuilt.ranks, built.ranks)
    assert json.loads(info_file.read_text())["format"] == INDEX_FORMAT
    assert np.array_equal(SlotIndex.for_trace(Trace.load(tmp_path / "t")).ranks, built.ranks)

    # a cache whose ranks array has the wrong length is damaged
    np.save(tmp_path / "t" / "index" / "ranks.new.npy", np.zeros(3, np.int16))
    (tmp_path / "t" / "index" / "ranks.npy").unlink()
    (tmp_path / "t" / "index" / "ranks.new.npy").rename(tmp_path / "t" / "index" / "ranks.npy")
    assert np.array_equal(SlotIndex.for_trace(Trace.load(tmp_path / "t")).ranks, built.ranks)
    assert "damaged" in caplog.text


def test_contexts_show_the_next_token(setting):
    _, trace, acc, _ = setting
    index = trace.slot_index()
    tokens = trace.to_pandas("tokens")
    got = index.contexts(busiest(acc), n=10, window=2)
    for r in got.itertuples():
        nxt = tokens[(tokens["doc"] == r.doc) & (tokens["row"] == r.row + 1)]["text"].tolist()
        assert r.next_token == (nxt[0] if nxt else "")


def test_weight_buckets_bounds_membership_and_draws(setting):
    _, trace, acc, per_token = setting
    index = trace.slot_index()
    slot = busiest(acc)
    brute = brute_top(per_token, slot)
    w = brute["weight"].to_numpy()
    got = weight_buckets(index, slot, buckets=4, per_bucket=3, random=6, window=2, seed=1)
    assert got["bucket"].iloc[0] == "top" and got["bucket"].iloc[-1] == "random"

    top = got[got["bucket"] == "top"]
    assert top["row"].tolist() == brute["token"].head(3).tolist()
    np.testing.assert_allclose(top["weight"], brute["weight"].head(3), rtol=1e-12)
    ctx = index.contexts(slot, n=3, window=2)
    for col in ("row", "doc_id", "position", "token", "left", "right", "focus", "next_token"):
        assert top[col].tolist() == ctx[col].tolist()

    edges = np.linspace(w.min(), w.max(), 5)
    intervals = got[~got["bucket"].isin(["top", "random"])]
    assert (np.diff(intervals["bucket_lo"].to_numpy()) <= 0).all()  # highest interval first
    for label, part in intervals.groupby("bucket", sort=False):
        lo, hi = part["bucket_lo"].iloc[0], part["bucket_hi"].iloc[0]
        b = int(np.flatnonzero(np.isclose(edges, lo))[0])
        assert hi == pytest.approx(edges[b + 1]) and label == f"{lo:.2f}–{hi:.2f}"
        inside = (w >= lo) & ((w < hi) if b < 3 else (w <= hi))
        assert part["bucket_tokens"].iloc[0] == inside.sum() and len(part) == min(3, inside.sum())
        assert set(part["row"]) <= set(brute["token"][inside]) and part["row"].is_unique
        assert (np.diff(part["weight"].to_numpy()) <= 0).all()
    shown = intervals.groupby("bucket")["bucket_tokens"].first()
    assert len(intervals) == sum(min(3, n) for n in shown)
    assert sum(min(3, int(n)) for n in np.histogram(w, edges)[0]) == len(intervals)

    rand = got[got["bucket"] == "random"]
    assert len(rand) == min(6, len(brute)) and rand["row"].is_unique and set(rand["row"]) <= set(brute["token"])
    assert (rand["bucket_lo"] == w.min()).all() and (rand["bucket_hi"] == w.max()).all()
    by_row = dict(zip(brute["token"], brute["weight"]))
    np.testing.assert_allclose(got["weight"], [by_row[r] for r in got["row"]], rtol=1e-12)

    again = weight_buckets(index, slot, buckets=4, per_bucket=3, random=6, window=2, seed=1)
    pd.testing.assert_frame_equal(got, again)
    other = weight_buckets(index, slot, buckets=4, per_bucket=3, random=6, window=2, seed=2)
    assert other[other["bucket"] == "top"]["row"].tolist() == top["row"].tolist()
    assert other["row"].tolist() != got["row"].tolist()

    assert weight_buckets(index, unused(trace, acc)).empty
    single = per_token.groupby("slot").size()
    one = int(single[single == 1].index[0]) if (single == 1).any() else None
    if one is not None:
        df = weight_buckets(index, one, buckets=3, per_bucket=2, random=2)
        assert df["bucket"].tolist()[0] == "top" and len(df) == 3
    for bad in (dict(buckets=0), dict(per_bucket=-1), dict(random=-2), dict(window=-1), dict(buckets="3")):
        with pytest.raises(AnalysisError, match="must be an integer"):
            weight_buckets(index, slot, **bad)
    with pytest.raises(AnalysisError, match="out of range"):
        weight_buckets(index, trace.n_slots)


def test_co_read_neighbours_jaccard_and_pmi_by_hand(setting):
    _, trace, acc, _ = setting
    index = trace.slot_index()
    readers = {int(s): set(g["token"]) for s, g in acc.groupby("slot")}
    n_tokens = trace.n_tokens
    slot = busiest(acc)
    got = co_read_neighbours(index, slot, top=12)
    mine = readers[slot]
    brute = []
    for other, theirs in readers.items():
        both = len(mine & theirs)
        if other != slot and both:
            brute.append((other, both, len(theirs), both / len(mine | theirs), math.log(both * n_tokens / (len(mine) * len(theirs)))))
    brute.sort(key=lambda r: (-r[3], r[0]))
    assert got["slot"].tolist() == [r[0] for r in brute[:12]]
    assert got["n_both"].tolist() == [r[1] for r in brute[:12]] and got["readers"].tolist() == [r[2] for r in brute[:12]]
    np.testing.assert_allclose(got["jaccard"], [r[3] for r in brute[:12]], rtol=1e-12)
    np.testing.assert_allclose(got["pmi"], [r[4] for r in brute[:12]], rtol=1e-12)
    assert got.attrs == {"slot": slot, "readers": len(mine), "n_tokens": n_tokens}
    pair = got.iloc[0]
    both = len(mine & readers[int(pair["slot"])])
    assert pair["jaccard"] == pytest.approx(both / (len(mine) + len(readers[int(pair["slot"])]) - both))
    assert co_read_neighbours(index, unused(trace, acc)).empty
    with pytest.raises(AnalysisError, match="top must be"):
        co_read_neighbours(index, slot, top=0)


def test_value_neighbours_are_cosines_of_value_rows(setting):
    model, _, _, _ = setting
    values = model.memory_layers[LAYER].value_table.weight.detach()
    slot = 17
    got = value_neighbours(model, slot, top=8)
    assert len(got) == 8 and slot not in got["slot"].tolist() and (np.diff(got["cosine"].to_numpy()) <= 0).all()
    for r in got.itertuples():
        assert r.cosine == pytest.approx(float(F.cosine_similarity(values[slot], values[r.slot], dim=0)), abs=1e-6)
        assert r.value_norm == pytest.approx(float(values[r.slot].norm()), rel=1e-6)
    brute = F.cosine_similarity(values[slot][None], values, dim=1)
    brute[slot] = -2
    assert int(got["slot"].iloc[0]) == int(brute.argmax())
    with pytest.raises(AnalysisError, match="out of range"):
        value_neighbours(model, values.shape[0])


def test_key_map_and_subkey_neighbours_against_loops(setting):
    _, trace, acc, _ = setting
    tiny = np.array([5, 0, 2, 0, 7, 1, 3, 3, 0])
    grid = key_map(tiny, 3)
    for i1 in range(3):
        for i2 in range(3):
            assert grid[i1, i2] == tiny[i1 * 3 + i2]
    n_keys = trace.meta["memory"]["n_keys"]
    counts = trace.slot_counts()
    full = key_map(torch.from_numpy(counts), n_keys)
    assert all(full[s // n_keys, s % n_keys] == int((acc["slot"] == s).sum()) for s in range(trace.n_slots))

    got = subkey_neighbours(tiny, 4, 3, top=5)  # slot 4 = (1, 1): row 1 holds 0, 7, 1; column 1 holds 0, 7, 3
    assert got.to_dict("list") == {"relation": ["row i1", "column i2"], "slot": [5, 7], "i1": [1, 2], "i2": [2, 1], "reads": [1, 3]}
    slot = busiest(acc)
    i1, i2 = divmod(slot, n_keys)
    same_row = sorted(((int(counts[i1 * n_keys + j]), i1 * n_keys + j) for j in range(n_keys) if j != i2 and counts[i1 * n_keys + j]),
                      key=lambda t: (-t[0], t[1]))[:4]
    same_col = sorted(((int(counts[i * n_keys + i2]), i * n_keys + i2) for i in range(n_keys) if i != i1 and counts[i * n_keys + i2]),
                      key=lambda t: (-t[0], t[1]))[:4]
    for source in (trace, counts):
        got = subkey_neighbours(source, slot, None if source is trace else n_keys, top=4)
        assert got[got["relation"] == "row i1"][["reads", "slot"]].apply(tuple, axis=1).tolist() == same_row
        assert got[got["relation"] == "column i2"][["reads", "slot"]].apply(tuple, axis=1).tolist() == same_col
        assert (got["slot"] == got["i1"] * n_keys + got["i2"]).all()

    with pytest.raises(AnalysisError, match="n_keys² = 16"):
        key_map(tiny, 4)
    with pytest.raises(AnalysisError, match="n_keys² = 9"):
        key_map(tiny.reshape(3, 3), 3)
    with pytest.raises(AnalysisError, match=">= 0"):
        key_map(-tiny, 3)
    with pytest.raises(AnalysisError, match="n_keys must be"):
        key_map(tiny, 0)
    with pytest.raises(AnalysisError, match="does not match the trace"):
        subkey_neighbours(trace, slot, n_keys + 1)
    with pytest.raises(AnalysisError, match="give n_keys"):
        subkey_neighbours(counts, slot)
    with pytest.raises(AnalysisError, match="out of range"):
        subkey_neighbours(tiny, 9, 3)


def test_slot_label_from_the_strongest_readers(setting):
    _, trace, acc, per_token = setting
    index = trace.slot_index()
    texts = trace.to_pandas("tokens")["text"].to_numpy()
    for slot in (busiest(acc), busiest(acc, 3)):
        seen = []
        for row in brute_top(per_token, slot)["token"]:
            t = texts[row].strip()
            if t and t not in seen:
                seen.append(t)
        assert slot_label(index, slot, n=3) == "reads at: " + " · ".join(seen[:3]) + (" · …" if len(seen) > 3 else "")
    assert slot_label(index, unused(trace, acc)) == ""
    with pytest.raises(AnalysisError, match="n must be"):
        slot_label(index, 0, n=0)


def fake_run(path, base_hash, steps, values):
    """A value-row run dir: `steps` = selected slots per step (best first), `values` = {slot: row after}."""
    run = FinetuneRunDir(path)
    run.write_identity({"format": RUN_FORMAT, "config": {"method": "sparse"}, "base_model_hash": base_hash})
    run.write_steps([{"step": i + 1, "fact_id": "F1", "fact_index": 0, "loss": 1.0, "layer": LAYER, "accessed": 9, "grad_norm": 1.0,
                      "selected": sel, "tf": [0.1] * len(sel), "df": [1] * len(sel), "score": [0.1] * len(sel)}
                     for i, sel in enumerate(steps)])
    for i, sel in enumerate(steps):
        rows = torch.tensor(sorted(sel))
        run.write_delta(i + 1, {LAYER: (rows, torch.stack([values[int(r)] for r in rows]))})
    return Run(path)


def test_slot_card_against_brute_counts(setting, tmp_path):
    model, trace, acc, _ = setting
    index = trace.slot_index()
    slot = busiest(acc)
    mine = acc[acc["slot"] == slot]
    values = model.memory_layers[LAYER].value_table.weight.detach()
    n = trace.n_slots
    counts = torch.zeros(1, n, dtype=torch.int64)
    df = torch.arange(n, dtype=torch.int64).view(1, n) % 7
    stats = SlotStats((LAYER,), n, "batch", counts, df, n_docs=10, n_tokens=100)
    after = {s: values[s] + 0.5 for s in range(n)}
    runs = [fake_run(tmp_path / "a", model.model_hash, [[3, slot, 9], [slot, 4], [5, 6]], after),
            fake_run(tmp_path / "b", model.model_hash, [[3, 4]], after),
            fake_run(tmp_path / "c", "0" * 16, [[slot]], after)]
    profile = pd.DataFrame({"slot": [slot - 1, slot], "share_PERSON": [0.9, 0.1], "share_GPE": [0.0, 0.3],
                            "entity_mass_share": [0.9, 0.4], "top1": ["Kofi", "Accra"], "q_value": [0.5, 0.01]})
    card = slot_card(index, slot, model=model, stats=stats, runs=runs, entity_profile=profile)

    assert card["slot"] == slot and card["layer"] == LAYER and card["reads"] == len(mine)
    assert card["reading_tokens"] == mine["token"].nunique()
    assert card["density"] == pytest.approx(mine["token"].nunique() / trace.n_tokens)
    assert card["density_per_head"] == pytest.approx({h: mine[mine["head"] == h]["token"].nunique() / trace.n_tokens for h in (0, 1)})
    assert card["mean_weight"] == pytest.approx(float(mine["weight"].astype(np.float64).mean()))
    assert card["max_weight"] == float(mine["weight"].max())
    assert (card["i1"], card["i2"]) == divmod(slot, 16)
    assert card["value_norm"] == pytest.approx(float(values[slot].norm()), rel=1e-6)
    assert card["median_value_norm"] == pytest.approx(float(np.median(values.norm(dim=1).numpy())), rel=1e-6)
    assert card["df"] == slot % 7 and card["idf"] == pytest.approx(math.log(11 / (slot % 7 + 1)))
    assert card["background_docs"] == 10 and card["background_unit"] == "batch"
    a, b, c = card["runs"]
    assert (a["selected"], a["best_rank"], a["steps_selected"]) == (True, 1, 2)
    assert a["delta_norm"] == pytest.approx(float((after[slot] - values[slot]).norm()), rel=1e-6)
    assert (b["selected"], b["best_rank"], b["steps_selected"], b["delta_norm"]) == (False, None, 0, None)
    assert c["selected"] and c["delta_norm"] is None  # another base model: no ΔV
    assert (card["entity_label"], card["entity_top"]) == ("GPE", "Accra")
    assert card["entity_share"] == 0.3 and card["entity_q_value"] == 0.01 and card["entity_mass_share"] == 0.4
    assert card["label"] == slot_label(index, slot)

    dead = slot_card(index, unused(trace, acc))
    assert dead["reads"] == 0 and dead["density"] == 0 and dead["mean_weight"] is None and dead["label"] == ""
    assert dead["value_norm"] is None and dead["df"] is None and dead["runs"] == [] and dead["entity_label"] is None
    with pytest.raises(AnalysisError, match="memory config differs"):
        slot_card(index, slot, model=MemoryModel.from_preset("micro", seed=0, vocab_size=300, knn=2))
    with pytest.raises(AnalysisError, match="out of range"):
        slot_card(index, -1)
    with pytest.raises(AnalysisError, match="slot column"):
        slot_card(index, slot, entity_profile=pd.DataFrame({"x": [1]}))


def test_token_search_against_a_pandas_filter(setting):
    _, trace, acc, _ = setting
    index = trace.slot_index()
    tokens = trace.to_pandas("tokens")
    stripped = tokens["text"].str.strip()
    common = stripped[stripped.str.len() >= 2].str.lower().value_counts()
    query = str(common.index[0])

    def brute(mask):
        hits = acc[acc["token"].isin(tokens["row"][mask])]
        agg = hits.groupby("slot").agg(reads=("weight", "size"), tokens=("token", "nunique"),
                                       weight=("weight", lambda w: w.astype(np.float64).sum())).reset_index()
        return agg.sort_values(["weight", "slot"], ascending=[False, True]).head(15).reset_index(drop=True)

    for q, match, mask in ((f"  {query.upper()} ", "exact", stripped.str.lower() == query),
                           (query[:2], "substring", stripped.str.contains(query[:2], case=False, regex=False))):
        got = token_search(index, q, match=match, top=15)
        expected = brute(mask)
        assert got["slot"].tolist() == expected["slot"].tolist()
        assert got["reads"].tolist() == expected["reads"].tolist() and got["tokens"].tolist() == expected["tokens"].tolist()
        np.testing.assert_allclose(got["weight"], expected["weight"], rtol=1e-9)
        assert got.attrs["rows"] == int(mask.sum()) and got.attrs["match"] == match
    assert token_search(index, "zzzqqq-no-such-token").empty
    for bad in ("", "   ", None):
        with pytest.raises(AnalysisError, match="non-empty string"):
            token_search(index, bad)
    with pytest.raises(AnalysisError, match="'exact' or 'substring'"):
        token_search(index, query, match="regex")


def test_errors_are_smviz_errors(setting):
    model, trace, _, _ = setting
    index = trace.slot_index()
    for call in (lambda: rank_histogram(index, trace.n_slots), lambda: rank_histogram(index, True),
                 lambda: slot_card(index, "3"), lambda: value_neighbours(model, -1), lambda: rank_histogram(index, 0, layer=0)):
        with pytest.raises(SmvizError):
            call()
