"""Latency of the app's Probe (app/pages/6_Probe.py) on the tiny model on CPU: a typed text of 30 tokens
until its reads are on the page. Goal (issue 18): <= 1 s.

    python benchmarks/bench_probe.py                 # ~1 min on 2 CPU cores
    python benchmarks/bench_probe.py --texts 40 --tokens 30

The workspace (a temporary directory) holds the fact world (WorldConfig(n_known=20, n_bio_only=10,
n_new=10)), its tokenizer (`workspace.stages.ensure_tokenizer`) and the `tiny` preset randomly initialised
(`MemoryModel.from_preset("tiny", seed=0)`, 65,536 slots, 4 heads x top-32) saved as WS/models/tiny:
latency does not depend on training. The texts are the first --tokens tokens of --texts corpus articles
(`data.corpus.load_articles()`, title order), decoded, each re-encoded to exactly that length.

Timed, each text new (no cache hit):
- library: `smviz.analysis.read_text(model, text)` on the loaded model (one live forward, every read);
- page: the Probe page under Streamlit's AppTest (script run and element tree, no browser), the "Text"
  box set to the text and the page rerun, until it has run; each run must show the text's token count
  ("N tokens, memory layer L") and no exception.
One warm-up text first for each. Median, p95 and max; the ratio page / library says what the page adds.
The JSON (default benchmarks/results/bench_probe.json) holds every time, the goal, the settings and the
machine with its load average at start and end.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine_record, print_totals, write_result  # noqa: E402 (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
PAGE = REPO / "app" / "pages" / "6_Probe.py"
OUT = ROOT / "results" / "bench_probe.json"
PRESET = "tiny"
MODEL = "tiny"
WORLD = {"n_known": 20, "n_bio_only": 10, "n_new": 10}
GOAL_S = 1.0


def quantiles(seconds: list[float]) -> dict:
    s = sorted(seconds)
    return {"n": len(s), "median_s": statistics.median(s), "p95_s": s[min(len(s) - 1, round(0.95 * (len(s) - 1)))],
            "max_s": s[-1], "all_s": seconds}


def build_workspace(root: Path):
    """WS with the world, its tokenizer and the tiny preset saved as models/tiny."""
    from smviz.data.world import WorldConfig
    from smviz.model import MemoryModel
    from smviz.workspace import Workspace
    from smviz.workspace.stages import build_data, ensure_tokenizer, load_data

    ws = Workspace(root)
    build_data(ws.data, WorldConfig(**WORLD))
    tokenizer = ensure_tokenizer(ws, load_data(ws.data))
    model = MemoryModel.from_preset(PRESET, seed=0, vocab_size=len(tokenizer))
    model.tokenizer = tokenizer
    model.save_pretrained(ws.model(MODEL))
    return ws, tokenizer


def probe_texts(tokenizer, n: int, n_tokens: int) -> list[str]:
    """n distinct texts of exactly n_tokens tokens, from the corpus articles' openings."""
    from smviz.data.corpus import load_articles

    texts = []
    for article in load_articles():
        ids = tokenizer(article.text, add_special_tokens=False)["input_ids"][:n_tokens]
        text = tokenizer.decode(ids)
        if len(ids) == n_tokens and len(tokenizer(text, add_special_tokens=False)["input_ids"]) == n_tokens and text not in texts:
            texts.append(text)
        if len(texts) == n:
            return texts
    raise SystemExit(f"the corpus has only {len(texts)} articles of {n_tokens} tokens that round-trip")


def time_library(ws, texts: list[str]) -> list[float]:
    from smviz.analysis import read_text
    from smviz.model import MemoryModel

    model = MemoryModel.from_pretrained(ws.model(MODEL)).eval()
    read_text(model, texts[0])  # warm-up
    times = []
    for text in texts[1:]:
        t = time.perf_counter()
        reads = read_text(model, text)
        times.append(time.perf_counter() - t)
        assert reads.attrs["n_tokens"] == len(reads["position"].unique())
    return times


def time_page(ws, texts: list[str], n_tokens: int) -> tuple[float, list[float]]:
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGE), default_timeout=600)
    t = time.perf_counter()
    at.run()
    first = time.perf_counter() - t
    times = []
    for i, text in enumerate(texts):
        at.text_area(key="probe_text").set_value(text)
        t = time.perf_counter()
        at.run()
        dt = time.perf_counter() - t
        if at.exception:
            raise SystemExit(f"the Probe page raised: {[e.value for e in at.exception]}")
        if not any(s.value.startswith(f"{n_tokens} tokens") for s in at.subheader):
            raise SystemExit(f"the Probe page does not show the text's {n_tokens} tokens: {[s.value for s in at.subheader]}")
        if i:  # the first text is the warm-up
            times.append(dt)
    return first, times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--texts", type=int, default=20, help="timed texts (default 20), plus one warm-up")
    p.add_argument("--tokens", type=int, default=30, help="tokens per text (default 30)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    os.environ.setdefault("STREAMLIT_LOGGER_LEVEL", "error")
    t_start, load_start = time.perf_counter(), os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench_probe."))
    try:
        ws, tokenizer = build_workspace(tmp / "ws")
        os.environ["SMVIZ_WORKSPACE"] = str(ws.root)
        texts = probe_texts(tokenizer, args.texts + 1, args.tokens)
        library = quantiles(time_library(ws, texts))
        first, page_times = time_page(ws, texts, args.tokens)
        page = quantiles(page_times)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    ratio = page["median_s"] / library["median_s"]
    passed = page["p95_s"] <= GOAL_S
    print(f"{'Probe, ' + str(args.tokens) + '-token text, tiny model, CPU':<48} {'n':>4} {'median':>9} {'p95':>9} {'max':>9}")
    print("-" * 83)
    for name, q in (("library: read_text", library), ("page: text typed, rerun (AppTest)", page)):
        print(f"{name:<48} {q['n']:>4} {q['median_s']:>8.3f}s {q['p95_s']:>8.3f}s {q['max_s']:>8.3f}s")
    print(f"{'page: first run (model loaded)':<48} {1:>4} {first:>8.3f}s")
    print(f"\nratio page / library (median) {ratio:.2f}")
    print(f"goal: page p95 <= {GOAL_S:g} s: {page['p95_s']:.3f}s -> {'pass' if passed else 'FAIL'}")
    total = time.perf_counter() - t_start
    peak = print_totals(total, load_start)
    import streamlit

    write_result(args.out, {
        "benchmark": "smviz app: Probe latency of a typed text on the tiny model",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_record(load_start=load_start, streamlit=streamlit.__version__),
        "settings": {"preset": PRESET, "seed": 0, "world": WORLD, "texts": args.texts, "tokens": args.tokens,
                     "page": str(PAGE.relative_to(REPO))},
        "goals": {"probe_page_p95_s": {"goal": GOAL_S, "value": page["p95_s"], "pass": passed}},
        "results": {"library": library, "page": page, "page_first_run_s": first, "ratio_page_over_library": ratio},
        "total_s": total, "peak_rss_mb": peak,
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
