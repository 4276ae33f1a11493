"""Speed of the app's Slot page on a trace of 10 million accesses: the first load, then every later render.

    python benchmarks/bench_app.py                    # full run: a 10M-access trace (about 2 minutes on 2 CPU cores)
    python benchmarks/bench_app.py --quick            # a 1M-access trace, fewer renders (under a minute)
    python benchmarks/bench_app.py --workdir /tmp/app --keep      # keep (and next time reuse) the workspace
    python benchmarks/bench_app.py --browser          # also time the served page in headless Chromium
    python benchmarks/bench_app.py --browser --direct # ... served by `streamlit run app/Home.py` itself

The workspace (in the work directory, WS = WORKDIR/ws) is built as benchmarks/bench_record.py builds
its own: the fact world (WorldConfig(n_known=20, n_bio_only=10, n_new=10)), the workspace tokenizer
(`workspace.stages.ensure_tokenizer`, 4,096 entries), and the `tiny` preset randomly initialised
(`MemoryModel.from_preset("tiny", seed=0)`: 4 memory heads x top-32 on one layer = 128 reads per token,
65,536 slots); background corpus articles (`data.corpus.load_articles()`, in title order) holding
>= --trace-accesses accesses (default 10 million = ~80k tokens; --quick: 1 million) are recorded with
`record_texts` into WS/traces/big. With --workdir, a trace already there with enough accesses is reused.

The Slot page (app/pages/1_Slot.py) runs under Streamlit's `AppTest` (in this process, script run and
element tree included, no browser or network), with SMVIZ_WORKSPACE=WS and ?trace=big:
- cold, index built: the trace's index/ cache is deleted and st.cache_resource cleared; the first run
  of the page loads the trace and builds (and writes) the slot index;
- cold, index cached: st.cache_resource cleared again; the first run loads the trace and opens the
  memory-mapped index cache (what a restarted app does on a trace it has shown before);
- new session: a new AppTest (a new browser tab) on the warm cache, its first run;
- renders after the first load: --renders times, the "Slot id" number input is set to another slot
  (random slots with reads, uniform, seed 0; the most-read slot first) and the page rerun; each render
  is timed and must show that slot's top contexts (`.smviz-context` HTML with the library's rank-0
  token, `SlotIndex.contexts`). Median, p95 and max. Goal: p95 < 1 s.
With --browser, the page served by `smviz app` (--direct: by the `streamlit run` command it runs) is also timed in headless Chromium (Debian's chromium via
Playwright): a fresh navigation to /Slot?trace=big&slot=N until the slot's first context shows (page
load, websocket, script run, render), and, in one page, typing a new slot id until its contexts show.

The JSON (default benchmarks/results/bench_app.json; --quick: bench_app_quick.json) holds every time,
the goal and whether it passes, the settings, the machine and the load average at start and end.

The Overview (--overview): the first load of app/Home.py and a Slot page render after the first.

    python benchmarks/bench_app.py --overview                      # on a micro workspace built in a temp dir (~2 min)
    python benchmarks/bench_app.py --overview --workspace WS       # on a workspace of yours (e.g. `smviz demo`'s)
    python benchmarks/bench_app.py --overview --compare-app DIR    # also another copy of app/ (before/after), interleaved

Every repeat (--repeats, default 3) is a fresh Python process, so imports and Streamlit's caches are
cold. In it, an empty page runs first under AppTest (Streamlit's own start: its runtime and the
component scan, which a served app does once at server start), then, timed: the Overview's first run
(its imports included: torch, transformers, ...), its rerun (cached), the Slot page's first run on the
workspace's trace (--trace, default the first) and --renders renders after it (the "Slot id" input
set to the most-read slot, then random read slots, seed 0). A second kind of process imports the
libraries the pages import (smviz, smviz.figures, the trace, stats, model and run-dir modules, pandas,
plotly) before the timed run: what the page itself does on its first load. The processes of the two
kinds (and of --compare-app) are interleaved. Goals: the Overview's first load <= 3 s (median of the
cold processes) and a Slot page render after the first <= 0.3 s (p95). The JSON (default
benchmarks/results/bench_app_overview.json) holds every time, medians, the ratios (cold / libraries
imported; --compare-app: that app / this one), the workspace's size, the machine and the load average.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
from _bench import machine_record, print_totals, write_result  # noqa: E402 (run as a script from benchmarks/)

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
PAGE = REPO / "app" / "pages" / "1_Slot.py"
DEFAULT_OUT = ROOT / "results" / "bench_app.json"
QUICK_OUT = ROOT / "results" / "bench_app_quick.json"
TRACE = "big"
PRESET = "tiny"
WORLD = {"n_known": 20, "n_bio_only": 10, "n_new": 10}
GOAL_S = 1.0
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def quantiles(seconds: list[float]) -> dict:
    s = np.asarray(seconds)
    return {"n": len(s), "median_s": float(np.median(s)), "p95_s": float(np.percentile(s, 95)),
            "max_s": float(s.max()), "min_s": float(s.min()), "mean_s": float(s.mean()), "times_s": [float(x) for x in s]}


# --------------------------------------------------------------------------- the trace


def ensure_trace(ws, args) -> tuple[dict, bool]:
    """WS/traces/big with >= args.trace_accesses accesses: reused when there, else recorded."""
    from smviz.trace import Trace

    path = ws.trace(TRACE)
    if path.exists():
        try:
            t = Trace.load(path)
            if t.n_accesses >= args.trace_accesses:
                log(f"reusing {path}: {t.n_accesses:,} accesses")
                return {"tokens": t.n_tokens, "accesses": t.n_accesses, "record_s": None}, True
        except Exception as e:  # noqa: BLE001 - any unusable trace is recorded again
            log(f"not reusing {path}: {e}")
    import torch
    from bench_record import corpus_documents

    from smviz.data.corpus import load_articles
    from smviz.data.world import WorldConfig
    from smviz.model import MemoryModel
    from smviz.workspace.stages import build_data, ensure_tokenizer, load_data
    from smviz.record import record_texts

    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    if not (ws.data / "world.json").exists() and not any(ws.data.glob("*.jsonl")):
        build_data(ws.data, WorldConfig(**WORLD))
    tokenizer = ensure_tokenizer(ws, load_data(ws.data))
    model = MemoryModel.from_preset(PRESET, seed=0).eval()
    per_token = 128  # tiny: 1 memory layer x 4 heads x top-32
    docs, ids = corpus_documents(tokenizer, load_articles(), math.ceil(args.trace_accesses / per_token))
    n_tok = sum(map(len, ids))
    shutil.rmtree(path, ignore_errors=True)
    shutil.rmtree(path.parent / f".{path.name}.partial", ignore_errors=True)
    log(f"recording {len(docs)} articles, {n_tok:,} tokens ({n_tok * per_token:,} accesses) into {path} ...")
    t = time.perf_counter()
    trace = record_texts(model, docs, path, tokenizer=tokenizer, progress=False)
    rec_s = time.perf_counter() - t
    log(f"  recorded in {rec_s:.1f}s")
    return {"tokens": trace.n_tokens, "accesses": trace.n_accesses, "record_s": rec_s}, False


def pick_slots(ws, n: int) -> tuple[list[int], dict[int, int]]:
    """The most-read slot, then n - 1 random distinct slots with reads (seed 0), and reads per slot."""
    from smviz.trace import Trace

    trace = Trace.load(ws.trace(TRACE))
    counts = {}
    for part in trace.iter_table("accesses"):
        vc = pc.value_counts(part.column("slot"))
        for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist()):
            counts[v] = counts.get(v, 0) + c
    busiest = max(counts, key=lambda s: (counts[s], -s))
    rest = sorted(set(counts) - {busiest})
    rng = random.Random(0)
    return [busiest] + rng.sample(rest, min(n - 1, len(rest))), counts


def expected_tokens(ws, slots: list[int]) -> dict[int, str]:
    """The library's rank-0 context token of each slot (whitespace-normalised), from an index built in
    memory (`SlotIndex.build`, which writes no index/ cache, so the page's first load stays cold)."""
    from smviz.trace import SlotIndex, Trace

    index = SlotIndex.build(Trace.load(ws.trace(TRACE)))
    return {s: " ".join(str(index.contexts(s, n=1, window=0).iloc[0]["token"]).split()) for s in slots}


# --------------------------------------------------------------------------- AppTest


def page_html(at) -> str:
    """All markdown / html element bodies of the page's last run."""
    return "\n".join(str(e.value) for e in [*at.markdown, *at.html])


def check_render(at, slot: int, token: str | None) -> None:
    if at.exception:
        raise SystemExit(f"the Slot page raised for slot {slot}: {[e.value for e in at.exception]}")
    html = page_html(at)
    n = html.count('class="smviz-context"')
    if n < 1:
        raise SystemExit(f"the Slot page shows no .smviz-context for slot {slot}:\n{html[:2000]}")
    if token is not None:
        import html as _html
        import re

        m = re.search(r'<mark class="smviz-focus"[^>]*>(.*?)</mark>', html, re.DOTALL)
        got = " ".join(_html.unescape(re.sub(r"<[^>]+>", "", m.group(1))).split()) if m else None
        if got != token:
            raise SystemExit(f"slot {slot}: the first context's focus token is {got!r}, the library's rank-0 is {token!r}")


def slot_input(at):
    boxes = [b for b in at.number_input if b.label == "Slot id"]
    if not boxes:
        raise SystemExit(f"no number_input labelled 'Slot id' on the page (labels: {[b.label for b in at.number_input]})")
    return boxes[0]


def new_apptest(ws, slot: int | None = None):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(PAGE), default_timeout=180)
    at.query_params["trace"] = TRACE
    if slot is not None:
        at.query_params["slot"] = str(slot)
    return at


def timed_run(at) -> float:
    t = time.perf_counter()
    at.run()
    return time.perf_counter() - t


def section_apptest(ws, slots: list[int], tokens: dict[int, str]) -> dict:
    import streamlit as st

    out: dict = {}
    first = slots[0]
    # cold, index built
    shutil.rmtree(ws.trace(TRACE) / "index", ignore_errors=True)
    st.cache_resource.clear()
    st.cache_data.clear()
    at = new_apptest(ws, first)
    out["cold_index_built_s"] = timed_run(at)
    check_render(at, first, tokens[first])
    log(f"  cold (index built): {out['cold_index_built_s']:.2f}s")
    # cold, index cached on disk
    st.cache_resource.clear()
    st.cache_data.clear()
    at = new_apptest(ws, first)
    out["cold_index_cached_s"] = timed_run(at)
    check_render(at, first, tokens[first])
    log(f"  cold (index cached): {out['cold_index_cached_s']:.2f}s")
    # a new session on the warm cache
    at = new_apptest(ws, first)
    out["new_session_s"] = timed_run(at)
    check_render(at, first, tokens[first])
    log(f"  new session: {out['new_session_s']:.3f}s")
    # renders after the first load
    times = []
    for i, s in enumerate(slots[1:] + slots[:1]):
        slot_input(at).set_value(s)
        times.append(timed_run(at))
        check_render(at, s, tokens[s])
        if (i + 1) % 10 == 0:
            log(f"  render {i + 1}/{len(slots)}: median so far {statistics.median(times):.3f}s")
    out["renders"] = quantiles(times)
    out["slots"] = slots[1:] + slots[:1]
    return out


# --------------------------------------------------------------------------- the served page in Chromium


def section_browser(ws, slots: list[int], tokens: dict[int, str], n_nav: int, direct: bool) -> dict:
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", SMVIZ_WORKSPACE=str(ws.root))
    if direct:  # the command `smviz app` runs, started here
        cmd = [sys.executable, "-m", "streamlit", "run", str(REPO / "app" / "Home.py"), "--server.address", "127.0.0.1",
               "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    else:
        cmd = [sys.executable, "-m", "smviz", "app", "--workspace", str(ws.root), "--port", str(port),
               "--host", "127.0.0.1"]
    log_path = Path(tempfile.mkstemp(prefix="bench_app_server.", suffix=".log")[1])
    logf = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_js = """([slot, token]) => {
        const box = document.querySelector('input[aria-label="Slot id"]');
        const first = document.querySelector('.smviz-context mark.smviz-focus');
        return box && box.value === String(slot) && first
            && first.textContent.split(/\\s+/).filter(Boolean).join(' ') === token;
    }"""
    out: dict = {}
    try:
        t = time.perf_counter()
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{' '.join(cmd)} exited with {proc.returncode}: {log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
            if time.perf_counter() - t > 90:
                raise SystemExit(f"{' '.join(cmd)} did not answer within 90s: {log_path.read_text()[-3000:]}")
        out["server_start_s"] = time.perf_counter() - t
        log(f"  server up in {out['server_start_s']:.1f}s")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                nav = []
                for i, s in enumerate([slots[0]] + slots[1 : n_nav + 1]):
                    page = browser.new_page()
                    t = time.perf_counter()
                    page.goto(f"{url}/Slot?trace={TRACE}&slot={s}")
                    page.wait_for_function(wait_js, arg=[s, tokens[s]], timeout=180_000)
                    dt = time.perf_counter() - t
                    page.close()
                    if i == 0:
                        out["first_navigation_s"] = dt  # the server's first load of the trace
                        log(f"  first navigation: {dt:.2f}s")
                    else:
                        nav.append(dt)
                out["navigation"] = quantiles(nav)
                page = browser.new_page()
                page.goto(f"{url}/Slot?trace={TRACE}&slot={slots[0]}")
                page.wait_for_function(wait_js, arg=[slots[0], tokens[slots[0]]], timeout=180_000)
                box = page.locator('input[aria-label="Slot id"]')
                typed = []
                for s in slots[1 : n_nav + 1]:
                    t = time.perf_counter()
                    box.fill(str(s))
                    box.press("Enter")
                    page.wait_for_function(wait_js, arg=[s, tokens[s]], timeout=60_000)
                    typed.append(time.perf_counter() - t)
                out["typed_slot"] = quantiles(typed)
            finally:
                browser.close()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        logf.close()
        log_path.unlink(missing_ok=True)
    return out


# --------------------------------------------------------------------------- the Overview (--overview)

OVERVIEW_OUT = ROOT / "results" / "bench_app_overview.json"
OVERVIEW_GOAL_S = 3.0
SLOT_RENDER_GOAL_S = 0.3
PRELOADED = ("pandas", "plotly.express", "smviz", "smviz.figures", "smviz.workspace.layout", "smviz.model",
             "smviz.trace", "smviz.stats", "smviz.train.rundir")
"""What a "libraries imported" process imports before the timed run (what the pages import)."""

CHILD = r"""
import json, os, sys, tempfile, time
home, slot_page, trace, slots, preload, out_path = json.loads(sys.argv[1])
out = {}
t = time.perf_counter()
from streamlit.testing.v1 import AppTest
out["streamlit_import_s"] = time.perf_counter() - t
empty = os.path.join(tempfile.mkdtemp(prefix="bench_app_empty."), "empty.py")
open(empty, "w").write("import streamlit as st\nst.write('start')\n")
t = time.perf_counter()
AppTest.from_file(empty, default_timeout=600).run()
out["streamlit_start_s"] = time.perf_counter() - t
if preload:
    import importlib
    t = time.perf_counter()
    for name in preload:
        importlib.import_module(name)
    out["preload_s"] = time.perf_counter() - t

def check(at, what):
    if at.exception:
        raise SystemExit(f"{what} raised: {[e.value for e in at.exception]}")

at = AppTest.from_file(home, default_timeout=600)
t = time.perf_counter(); at.run(); out["home_first_s"] = time.perf_counter() - t
check(at, "the Overview")
out["home_elements"] = {"dataframes": len(at.dataframe), "charts": len(at.get("plotly_chart"))}
t = time.perf_counter(); at.run(); out["home_rerun_s"] = time.perf_counter() - t
if slot_page and trace is not None and slots:
    page = AppTest.from_file(slot_page, default_timeout=600)
    page.query_params["trace"] = trace
    page.query_params["slot"] = str(slots[0])
    t = time.perf_counter(); page.run(); out["slot_first_s"] = time.perf_counter() - t
    check(page, "the Slot page")
    renders = []
    for s in slots[1:] + slots[:1]:
        box = [b for b in page.number_input if b.label == "Slot id"]
        if not box:
            raise SystemExit(f"no 'Slot id' input on the Slot page: {[b.label for b in page.number_input]}")
        box[0].set_value(s)
        t = time.perf_counter(); page.run(); renders.append(time.perf_counter() - t)
        check(page, f"the Slot page (slot {s})")
    out["slot_renders_s"] = renders
json.dump(out, open(out_path, "w"))
"""


def overview_slots(ws, trace: str, n: int) -> list[int]:
    """The trace's most-read slot, then n - 1 random read slots (seed 0)."""
    from smviz.trace import Trace

    t = Trace.load(ws.trace(trace), verify=False)
    counts = t.slot_counts(t.layers[0])
    read = np.flatnonzero(counts)
    busiest = int(np.argmax(counts))
    rest = sorted(set(read.tolist()) - {busiest})
    return [busiest] + random.Random(0).sample(rest, min(n - 1, len(rest)))


def overview_child(app: Path, ws, trace: str | None, slots: list[int], preload: bool) -> dict:
    """One fresh process: the timings of CHILD for the app in `app` (Home.py, pages/1_Slot.py)."""
    fd, out_path = tempfile.mkstemp(prefix="bench_app_overview.", suffix=".json")
    os.close(fd)
    slot_page = app / "pages" / "1_Slot.py"
    arg = json.dumps([str(app / "Home.py"), str(slot_page) if slot_page.exists() else None, trace, slots,
                      list(PRELOADED) if preload else [], out_path])
    env = dict(os.environ, SMVIZ_WORKSPACE=str(ws.root), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               STREAMLIT_LOGGER_LEVEL="error", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    try:
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-c", CHILD, arg], env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise SystemExit(f"the timed process failed ({proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
        out = json.loads(Path(out_path).read_text())
        out["process_s"] = time.perf_counter() - t
        return out
    finally:
        Path(out_path).unlink(missing_ok=True)


def workspace_size(ws) -> dict:
    """How big the measured workspace is: models (weights bytes), traces (accesses), runs."""
    from smviz.trace import META_FILE

    size = {"models": {}, "traces": {}, "runs": sorted(p.name for p in ws.runs_dir.iterdir()) if ws.runs_dir.is_dir() else []}
    if ws.models_dir.is_dir():
        for d in sorted(ws.models_dir.iterdir()):
            size["models"][d.name] = sum(f.stat().st_size for f in d.glob("*.safetensors"))
    if ws.traces_dir.is_dir():
        for d in sorted(ws.traces_dir.iterdir()):
            if (d / META_FILE).is_file():
                size["traces"][d.name] = json.loads((d / META_FILE).read_text())["counts"]
    return size


def overview_main(args) -> int:
    from smviz.workspace import Workspace

    t_start = time.perf_counter()
    load_start = os.getloadavg()
    tmp = None
    if args.workspace is None:
        sys.path.insert(0, str(REPO / "tests"))
        from micro_workspace import build_micro_workspace

        tmp = Path(tempfile.mkdtemp(prefix="bench_app_overview."))
        log(f"building the micro workspace in {tmp / 'ws'} ...")
        t = time.perf_counter()
        ws = build_micro_workspace(tmp / "ws")
        log(f"  built in {time.perf_counter() - t:.0f}s")
    else:
        ws = Workspace(args.workspace.resolve())
    try:
        traces = sorted(p.name for p in ws.traces_dir.iterdir() if p.is_dir()) if ws.traces_dir.is_dir() else []
        trace = args.trace or (traces[0] if traces else None)
        slots = overview_slots(ws, trace, args.renders + 1) if trace else []
        size = workspace_size(ws)
        apps = {"app": (REPO / "app").resolve()}
        if args.compare_app:
            apps["compare"] = args.compare_app.resolve()
        kinds = [(a, preload) for a in apps for preload in (False, True)]
        runs: dict[str, list[dict]] = {f"{a}/{'imported' if p else 'cold'}": [] for a, p in kinds}
        for r in range(args.repeats):
            order = list(kinds)
            random.Random(r).shuffle(order)
            for a, preload in order:
                key = f"{a}/{'imported' if preload else 'cold'}"
                out = overview_child(apps[a], ws, trace, slots, preload)
                runs[key].append(out)
                log(f"  [{r + 1}/{args.repeats}] {key}: Overview first load {out['home_first_s']:.2f}s, rerun {out['home_rerun_s']:.3f}s"
                    + (f"; Slot page first {out['slot_first_s']:.2f}s, render median {statistics.median(out['slot_renders_s']):.3f}s"
                       if "slot_renders_s" in out else ""))
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp is not None:
            log(f"kept {tmp / 'ws'}")

    def med(key: str, field: str) -> float | None:
        vals = [o[field] for o in runs[key] if field in o]
        return float(statistics.median(vals)) if vals else None

    summary: dict = {}
    for key in runs:
        renders = [x for o in runs[key] for x in o.get("slot_renders_s", [])]
        summary[key] = {f: med(key, f) for f in ("streamlit_import_s", "streamlit_start_s", "preload_s", "home_first_s",
                                               "home_rerun_s", "slot_first_s", "process_s")}
        summary[key]["slot_render"] = quantiles(renders) if renders else None
    ratios = {"app_cold_over_imported": summary["app/cold"]["home_first_s"] / summary["app/imported"]["home_first_s"]}
    if "compare/cold" in summary:
        ratios["compare_over_app_cold"] = summary["compare/cold"]["home_first_s"] / summary["app/cold"]["home_first_s"]
        ratios["compare_over_app_imported"] = summary["compare/imported"]["home_first_s"] / summary["app/imported"]["home_first_s"]
    render = summary["app/cold"]["slot_render"]
    goals = {
        "overview_first_load_s": {"goal": OVERVIEW_GOAL_S, "value": summary["app/cold"]["home_first_s"],
                                  "pass": summary["app/cold"]["home_first_s"] <= OVERVIEW_GOAL_S},
        "overview_first_load_libraries_imported_s": {"goal": OVERVIEW_GOAL_S, "value": summary["app/imported"]["home_first_s"],
                                                     "pass": summary["app/imported"]["home_first_s"] <= OVERVIEW_GOAL_S},
        "slot_render_after_first_p95_s": {"goal": SLOT_RENDER_GOAL_S, "value": render["p95_s"] if render else None,
                                          "pass": bool(render) and render["p95_s"] <= SLOT_RENDER_GOAL_S},
    }

    print()
    print(f"workspace {ws.root}; trace for the Slot page: {trace}; {args.repeats} fresh processes per kind")
    print(f"{'fresh process (median over repeats)':<44} {'import st':>10} {'st start':>9} {'libs':>7} {'Overview':>9} {'rerun':>7} "
          f"{'Slot 1st':>9} {'render p50':>11} {'p95':>7}")
    print("-" * 122)
    for key, m in summary.items():
        r = m["slot_render"] or {}

        def f(v, w=8, d=2):
            return f"{v:>{w}.{d}f}s" if v is not None else f"{'-':>{w + 1}}"

        print(f"{key:<44} {f(m['streamlit_import_s'], 9)} {f(m['streamlit_start_s'])} {f(m['preload_s'], 6)} {f(m['home_first_s'])} "
              f"{f(m['home_rerun_s'], 6, 3)} {f(m['slot_first_s'])} {f(r.get('median_s'), 10, 3)} {f(r.get('p95_s'), 6, 3)}")
    print()
    for name, g in goals.items():
        value = "-" if g["value"] is None else f"{g['value']:.3f}s"
        print(f"goal {name} <= {g['goal']:g} s: {value} -> {'pass' if g['pass'] else 'FAIL'}")
    print("ratios: " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
    total = time.perf_counter() - t_start
    peak = print_totals(total, load_start)

    import streamlit

    payload = {
        "benchmark": "smviz app: the Overview's first load and a Slot page render after the first, fresh processes",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_record(load_start=load_start, streamlit=streamlit.__version__),
        "settings": {"workspace": "micro (built)" if args.workspace is None else str(args.workspace), "trace": trace,
                     "slots": slots, "repeats": args.repeats, "renders": args.renders, "preloaded": list(PRELOADED),
                     "apps": {k: str(v) for k, v in apps.items()}},
        "workspace": size,
        "goals": goals,
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
        "total_s": total,
        "peak_rss_mb": peak,
    }
    write_result(args.out, payload)
    log(f"wrote {args.out}")
    return 0


# --------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a 1M-access trace, fewer renders")
    p.add_argument("--trace-accesses", type=int, default=None,
                   help="accesses in the recorded trace (default 10,000,000; --quick: 1,000,000)")
    p.add_argument("--renders", type=int, default=None, help="renders after the first load (default 40; --quick: 10)")
    p.add_argument("--browser", action="store_true", help="also time the page served by `smviz app` in headless Chromium")
    p.add_argument("--direct", action="store_true",
                   help="with --browser: start `python -m streamlit run app/Home.py` (what `smviz app` runs) instead of `smviz app`")
    p.add_argument("--navigations", type=int, default=None, help="timed Chromium navigations / typed slots (default 10; --quick: 4)")
    p.add_argument("--threads", type=int, default=None, help="torch threads while recording (default os.cpu_count())")
    p.add_argument("--workdir", type=Path, default=None,
                   help="work directory (default: a new temporary directory); a trace already in WORKDIR/ws is reused")
    p.add_argument("--keep", action="store_true", help="keep the workspace in the work directory")
    p.add_argument("--out", type=Path, default=None,
                   help=f"JSON output (default {DEFAULT_OUT.relative_to(REPO)}; --quick: {QUICK_OUT.relative_to(REPO)}; "
                        f"--overview: {OVERVIEW_OUT.relative_to(REPO)})")
    p.add_argument("--overview", action="store_true", help="time the Overview's first load (app/Home.py) instead, in fresh processes")
    p.add_argument("--workspace", type=Path, default=None, help="with --overview: the workspace (default: a micro workspace built in a temp dir)")
    p.add_argument("--trace", default=None, help="with --overview: the trace the Slot page shows (default: the workspace's first)")
    p.add_argument("--repeats", type=int, default=3, help="with --overview: fresh processes per kind (default 3)")
    p.add_argument("--compare-app", type=Path, default=None,
                   help="with --overview: also time the app in this directory (Home.py, pages/), e.g. an older copy of app/")
    a = p.parse_args(argv)
    q = a.quick
    if a.overview:
        a.renders = a.renders or 10
        a.out = a.out or OVERVIEW_OUT
        return a
    a.trace_accesses = a.trace_accesses or (1_000_000 if q else 10_000_000)
    a.renders = a.renders or (10 if q else 40)
    a.navigations = a.navigations or (4 if q else 10)
    a.out = a.out or (QUICK_OUT if q else DEFAULT_OUT)
    return a


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("STREAMLIT_LOGGER_LEVEL", "error")  # AppTest's bare-mode warnings
    if args.overview:
        return overview_main(args)
    if not PAGE.exists():
        raise SystemExit(f"{PAGE} does not exist (the app is not there yet)")
    sys.path.insert(0, str(PAGE.parent.parent))  # app/ (for `_common`), as `streamlit run app/Home.py` has it
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    from smviz.workspace import Workspace

    own_workdir = args.workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="bench_app.")) if own_workdir else args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(workdir / "ws")
    os.environ["SMVIZ_WORKSPACE"] = str(ws.root)
    log(f"smviz app benchmark: workdir={workdir}, quick={args.quick}")
    results: dict = {}
    try:
        results["trace"], reused = ensure_trace(ws, args)
        results["trace"]["reused"] = reused
        slots, counts = pick_slots(ws, args.renders)
        results["trace"]["slots_with_reads"] = len(counts)
        log(f"trace: {results['trace']['accesses']:,} accesses, {len(counts):,} slots read; timing the Slot page ...")
        tokens = expected_tokens(ws, slots)
        results["apptest"] = section_apptest(ws, slots, tokens)
        if args.browser:
            if not Path(CHROMIUM).exists():
                raise SystemExit(f"--browser needs {CHROMIUM} (apt-get install chromium)")
            log("timing the served page in Chromium ...")
            results["browser"] = section_browser(ws, slots, tokens, args.navigations, args.direct)
    finally:
        if args.keep or not own_workdir:
            if args.keep:
                log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    a = results["apptest"]
    r = a["renders"]
    goal = {"value": r["p95_s"], "goal": f"< {GOAL_S:g} s", "pass": bool(r["p95_s"] < GOAL_S),
            "what": "Slot page render after the first load (AppTest, new slot id set, rerun), p95",
            "max_s": r["max_s"], "median_s": r["median_s"]}
    tr = results["trace"]
    print()
    print(f"trace: {tr['accesses']:,} accesses, {tr['tokens']:,} tokens, {tr['slots_with_reads']:,} slots read"
          + (f"; recorded in {tr['record_s']:.1f}s" if tr["record_s"] else "; reused")
          + ("  [smaller than the 10M-access default]" if tr["accesses"] < 10_000_000 else ""))
    print(f"{'Slot page (AppTest)':<58} {'n':>4} {'median':>9} {'p95':>9} {'max':>9}")
    print("-" * 93)
    print(f"{'first load, cold: trace loaded, slot index built':<58} {1:>4} {a['cold_index_built_s']:>8.3f}s")
    print(f"{'first load, cold: trace loaded, index cache opened':<58} {1:>4} {a['cold_index_cached_s']:>8.3f}s")
    print(f"{'first run of a new session (warm cache)':<58} {1:>4} {a['new_session_s']:>8.3f}s")
    print(f"{'render after the first load (new slot id, rerun)':<58} {r['n']:>4} {r['median_s']:>8.3f}s "
          f"{r['p95_s']:>8.3f}s {r['max_s']:>8.3f}s")
    if "browser" in results:
        b = results["browser"]
        print(f"{'Chromium: server start until /_stcore/health answers':<58} {1:>4} {b['server_start_s']:>8.3f}s")
        print(f"{'Chromium: first navigation (server loads the trace)':<58} {1:>4} {b['first_navigation_s']:>8.3f}s")
        for key, what in (("navigation", "Chromium: new tab, /Slot?trace=big&slot=N to contexts"),
                          ("typed_slot", "Chromium: slot id typed + Enter to its contexts")):
            q = b[key]
            print(f"{what:<58} {q['n']:>4} {q['median_s']:>8.3f}s {q['p95_s']:>8.3f}s {q['max_s']:>8.3f}s")
    print()
    print(f"goal: render after the first load p95 < {GOAL_S:g} s: {r['p95_s']:.3f}s -> {'pass' if goal['pass'] else 'FAIL'}")
    total = time.perf_counter() - t_start
    peak = print_totals(total, load_start)

    import streamlit

    payload = {
        "benchmark": "smviz app: Slot page render times on a large trace",
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_record(load_start=load_start, streamlit=streamlit.__version__),
        "settings": {"preset": PRESET, "seed": 0, "quick": args.quick, "trace_accesses_min": args.trace_accesses,
                     "renders": args.renders, "browser": args.browser, "browser_server": "streamlit run" if args.direct else "smviz app",
                     "navigations": args.navigations,
                     "world": WORLD, "page": str(PAGE.relative_to(REPO))},
        "goals": {"render_after_first_load_p95_s": goal},
        "results": results,
        "total_s": total,
        "peak_rss_mb": peak,
    }
    write_result(args.out, payload)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
