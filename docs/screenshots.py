"""docs/screenshots.py — the app's screenshots in docs/ (docs/*.png, shown by docs/README.md): this
script owns them and is the only thing that writes them.

It serves the Streamlit app for a workspace (as `smviz app` does, bound to 127.0.0.1 on a free
port), opens every page in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright),
gives the pages that need it their input — a slot taken from the Overview's first entry list (the
trace's TF-IDF rank 1 against its model's background), a sentence typed into Probe, a token typed
into Search, the slot forced on Steer — waits for each script run to finish (the app's script state
not running, no spinner, every chart drawn) and saves one PNG per page, and one per tab of the Slot
page.
Each PNG is at most --width × --max-height pixels, quantised to a palette (Pillow) to stay small. A
page that shows a Python exception fails the run with its text. The files are written into a
temporary directory and moved into --out only when every page succeeded.

Run it from the repository root on the demo workspace (`make demo`):

    python docs/screenshots.py --workspace workspace [--out docs]

Options: --trace, --slot (default: the trace's TF-IDF rank 1), --probe-text, --search-query,
--width, --max-height, --colours, --timeout; `--help` lists them."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # as tests/test_app_browser.py launches it
INSTALL = "apt-get update && apt-get install -y chromium"

PROBE_TEXT = "Marisol Vantongeren was born in Lisbon and later worked for the Royal Society."
SEARCH_QUERY = "worked"  # a token of PROBE_TEXT that the demo trace holds (" Lisbon" is not in it)
SLOT_TABS = ["Histograms", "Logit effects", "Ablation", "Neighbours", "Key map", "Runs", "Entities"]

# Busy: the script is running (the app's root carries data-test-script-state; the "Running…" status
# widget is not drawn with the minimal toolbar), or a spinner, a skeleton, a stale element or a Plotly
# chart not drawn yet is on the page. A Python exception shown on the page is reported, not photographed.
BUSY_JS = """() => { const app = document.querySelector('[data-testid="stApp"]');
    return !app || app.dataset.testScriptState !== 'notRunning'
        || !!document.querySelector('[data-testid="stStatusWidget"], [data-testid="stSpinner"], [data-testid="stSkeleton"], [data-stale="true"]')
        || [...document.querySelectorAll('[data-testid="stPlotlyChart"]')].some(e => !e.querySelector('.main-svg')); }"""
EXCEPTIONS_JS = """() => [...document.querySelectorAll('[data-testid="stException"]')].map(e => e.innerText)"""
CONTENT_JS = """() => { const block = document.querySelector('[data-testid="stMainBlockContainer"]');
    const main = document.querySelector('[data-testid="stMain"]');
    return block ? Math.ceil(block.getBoundingClientRect().bottom + (main ? main.scrollTop : 0))
                 : document.documentElement.scrollHeight; }"""  # the page's height, whichever element scrolls
TOP_JS = """() => { document.querySelectorAll('[data-testid="stMain"], [data-testid="stAppViewContainer"]')
    .forEach(e => { e.scrollTop = 0; }); window.scrollTo(0, 0); }"""


class ScreenshotError(RuntimeError):
    """A page that did not render as expected (its text in the message)."""


# ---------------------------------------------------------------- choosing the inputs


def default_slot(workspace: Path, trace_name: str) -> int:
    """The first slot of the Overview's "Most specific to a trace" list (the trace's reads ranked by
    TF-IDF against its model's background, `smviz.stats.top_slots`); the most-read slot where the
    trace's model or its background statistics are missing."""
    import numpy as np
    import torch

    from smviz.model import CONFIG_FILE, hash_files
    from smviz.model.format import read_manifest
    from smviz.stats import SlotStats, top_slots
    from smviz.trace import Trace

    trace = Trace.load(workspace / "traces" / trace_name, verify=False)
    layer = trace.layers[0]
    counts = trace.slot_counts(layer)
    for model_dir in sorted((workspace / "models").glob(f"*/{CONFIG_FILE}")):
        try:
            if hash_files(read_manifest(model_dir.parent)) != trace.model_hash:
                continue
            stats = SlotStats.load_for_model(model_dir.parent)
        except Exception as err:  # noqa: BLE001 - a model being written, or one without statistics
            print(f"screenshots: {model_dir.parent.name}: {err}", file=sys.stderr)
            continue
        slots, _ = top_slots(torch.from_numpy(counts), stats, layer, 1)
        return int(slots[0])
    print("screenshots: no TF-IDF ranking for the trace (its model or statistics are missing); the most-read slot",
          file=sys.stderr)
    return int(np.argmax(counts))


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """The app's server for `workspace` on a free 127.0.0.1 port, in its own process group, its output
    in `log`; stopped (the group) by `stop`. The command line is `smviz app`'s (`smviz.serve.
    app_command`), with the file watcher off: a source file edited while the screenshots are taken
    would otherwise make Streamlit re-import modules under objects it has cached."""

    def __init__(self, workspace: Path, log: Path, start_s: float):
        from smviz.serve import app_command, wait_until_serving

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.cmd = [*app_command(self.port, "127.0.0.1"), "--server.fileWatcherType", "none"]
        env = dict(os.environ, SMVIZ_WORKSPACE=str(workspace), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                   PYTHONUNBUFFERED="1")
        self.log = open(log, "wb")
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                     start_new_session=True)
        why = wait_until_serving(self.url, self.proc, start_s)
        if why is not None:
            self.stop()
            raise ScreenshotError(f"`{' '.join(self.cmd)}` {why}:\n{self.logs()}")

    def logs(self) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self.log.close()


# ---------------------------------------------------------------- driving the pages


class Shooter:
    """One browser page and what it has saved; every wait bounded by `timeout` seconds."""

    def __init__(self, page, url: str, out: Path, args: argparse.Namespace, logs):
        self.page, self.url, self.out, self.args, self.logs = page, url, out, args, logs
        self.timeout = float(args.timeout)
        self.saved: list[Path] = []

    def fail(self, what: str) -> ScreenshotError:
        text = ""
        try:
            text = self.page.inner_text("body")[:3000]
            self.page.screenshot(path=str(self.out / "_failed.png"))
            (self.out / "_failed.html").write_text(self.page.content())
        except Exception:  # noqa: BLE001 - the page itself may be gone
            pass
        return ScreenshotError(f"{what} ({self.page.url})\npage text:\n{text}\nserver log:\n{self.logs()}")

    def settle(self, quiet_s: float = 1.5) -> None:
        """Wait until nothing has been busy for `quiet_s` seconds (a rerun can start a moment after an
        input changes, so one idle look is not enough); then raise on any exception the page shows."""
        deadline = time.monotonic() + self.timeout
        quiet_since = None
        while True:
            now = time.monotonic()
            if self.page.evaluate(BUSY_JS):
                quiet_since = None
            elif quiet_since is None:
                quiet_since = now
            elif now - quiet_since >= quiet_s:
                break
            if now > deadline:
                raise self.fail(f"the page was still running after {self.timeout:.0f}s")
            time.sleep(0.25)
        errors = self.page.evaluate(EXCEPTIONS_JS)
        if errors:
            raise self.fail("the page shows an exception:\n" + "\n---\n".join(errors))

    def goto(self, path: str) -> None:
        self.page.set_viewport_size({"width": self.args.width, "height": 1000})
        self.page.goto(self.url + path, timeout=self.timeout * 1000)
        self.page.locator('[data-testid="stApp"]').wait_for(timeout=self.timeout * 1000)
        self.page.locator("h1").first.wait_for(timeout=self.timeout * 1000)  # the page's title: the script started
        self.settle()

    def wait_text(self, text: str) -> None:
        try:
            self.page.get_by_text(text).first.wait_for(timeout=self.timeout * 1000)
        except Exception as err:
            raise self.fail(f"{text!r} did not appear: {err}") from err

    def keyed(self, key: str):
        """The element container of the widget or element with `key` (Streamlit's st-key-KEY class)."""
        return self.page.locator(f".st-key-{key}")

    def choose(self, key: str, option: str) -> None:
        """Pick `option` in the selectbox with `key`."""
        box = self.keyed(key).get_by_role("combobox")  # a react-aria combobox: type to filter, then pick
        box.click()
        box.fill(option)
        self.page.get_by_role("option", name=option, exact=True).click()
        self.settle()

    def switch_on(self, key: str) -> None:
        box = self.keyed(key).locator('input[type="checkbox"]')
        if not box.is_checked():
            self.keyed(key).locator("label").first.click()
        self.settle()

    def click_radio(self, key: str, option: str) -> None:
        self.keyed(key).get_by_text(option, exact=True).click()
        self.settle()

    def tab(self, name: str) -> None:
        self.page.get_by_role("tab", name=name, exact=True).click()
        self.settle()

    def shoot(self, name: str, top_of=None, max_height: int | None = None) -> Path:
        """Save `name`.png: the page from its top (or from the top of the element `top_of`), at most
        `max_height` (default --max-height) pixels of it. The viewport is made as tall as the page, so
        nothing scrolls and every chart and table is drawn where it is shown."""
        page, width = self.page, self.args.width
        page.mouse.move(0, 0)  # no hover label
        page.evaluate("() => document.activeElement && document.activeElement.blur()")  # no focus ring
        tall = 1000
        for _ in range(4):  # a taller viewport can draw more (table rows, charts): until the page fits it
            page.evaluate(TOP_JS)
            height = int(page.evaluate(CONTENT_JS))
            if height <= tall:
                break
            tall = min(height + 200, 16000)
            page.set_viewport_size({"width": width, "height": tall})
            self.settle(0.75)
        page.evaluate(TOP_JS)
        height = min(int(page.evaluate(CONTENT_JS)), tall)
        y = 0 if top_of is None else max(0, int(top_of.bounding_box()["y"]) - 12)
        shown = max(1, min(height - y, max_height or self.args.max_height))
        path = self.out / f"{name}.png"
        page.screenshot(path=str(path), clip={"x": 0, "y": y, "width": width, "height": shown})
        compress(path, self.args.colours)
        self.saved.append(path)
        print(f"screenshots: {path.name} ({path.stat().st_size / 1024:.0f} KiB, {width}x{shown})", flush=True)
        page.set_viewport_size({"width": width, "height": 1000})
        return path

def compress(path: Path, colours: int, budget: int = 300 * 1024) -> None:
    """Quantise a screenshot to a palette of `colours` (fewer while it is over `budget` bytes), where
    Pillow is installed; left as Chromium wrote it otherwise."""
    try:
        from PIL import Image
    except ImportError:
        return
    with Image.open(path) as im:
        rgb = im.convert("RGB")
    n = colours
    while True:
        rgb.quantize(colors=n, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)
        if path.stat().st_size <= budget or n <= 32:
            return
        n //= 2


def shoot_all(s: Shooter, trace: str, slot: int, args: argparse.Namespace) -> None:
    t = quote(trace, safe="")

    # Overview: the runs scatter and memory health are there at once; the ‖ΔV‖ and entity lists load on demand
    s.goto("/")
    s.wait_text("Learning against forgetting")
    runs = sorted(p.parent.name for p in (Path(args.workspace) / "runs").glob("*/summary.json"))
    if runs:
        s.choose("home_delta_run", "sparse" if "sparse" in runs else runs[0])
    s.choose("home_entity_trace", trace)
    s.shoot("home", max_height=max(args.max_height, 4200))  # the entry lists are at its foot

    # Slot: entities on first (the card's entity label and q-value), then the contexts, then each tab
    s.goto(f"/Slot?trace={t}&slot={slot}")
    s.page.locator(".smviz-context mark.smviz-focus").first.wait_for(state="attached", timeout=s.timeout * 1000)
    s.tab("Entities")
    s.switch_on("entities_on")
    s.tab("Contexts")
    s.shoot("slot")  # the card and the top contexts
    s.shoot("slot-intervals", top_of=s.page.get_by_role("heading", name="Weight intervals"))
    tabs = s.page.locator('[data-testid="stTabs"]').first
    for name in SLOT_TABS:
        s.tab(name)
        if name == "Ablation":
            s.keyed("ablate_slot").locator("button").click()
            s.settle()
            s.wait_text("Δ log-prob")
        s.shoot("slot-" + name.lower().replace(" ", "-"), top_of=tabs)

    s.goto(f"/Fact?trace={t}")
    s.wait_text("Answers before and after")
    s.shoot("fact", max_height=max(args.max_height, 4200))  # down to the answers before and after

    s.goto("/Entities")
    s.wait_text("Entity profile of a slot")
    s.shoot("entities")

    s.goto("/Steps")
    s.wait_text("Selected slots across steps and facts")
    s.shoot("steps")

    s.goto("/Diff")
    runs_all = sorted(p.parent.name for p in (Path(args.workspace) / "runs").glob("*/config.json"))
    if "sparse" in runs_all:
        s.choose("run", "sparse")
    s.shoot("diff")

    # Probe: a sentence typed in, read live; done when the token strip spells it
    s.goto("/Probe")
    box = s.page.locator('textarea[aria-label="Text"]')
    box.fill(args.probe_text)
    box.press("Control+Enter")
    try:
        s.page.wait_for_function(
            """(want) => { const toks = [...document.querySelectorAll('.smviz-tok')];
                           return toks.length && toks.map(t => t.textContent).join('').split(/\\s+/).join(' ').trim()
                                  === want.split(/\\s+/).join(' ').trim(); }""",
            arg=args.probe_text, timeout=s.timeout * 1000)
    except Exception as err:
        raise s.fail(f"the probe text was not read: {err}") from err
    s.settle()
    s.shoot("probe")

    # Search: a token by ?q=, and the entity search switched on
    s.goto(f"/Search?trace={t}&q={quote(args.search_query, safe='')}")
    s.wait_text("token rows equal")
    s.switch_on("entities_on")
    s.wait_text("Labels found")
    s.shoot("search")

    # Steer: the slot forced into every head's top-k at full weight, before and after side by side
    s.goto(f"/Steer?slot={slot}")
    s.click_radio("mode", "force")
    thumb = s.keyed("force_weight").get_by_role("slider")
    thumb.focus()
    thumb.press("End")
    s.settle()
    s.keyed("generate").locator("button").click()
    s.settle()
    s.wait_text("log p(answer) after")
    s.shoot("steer")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workspace", required=True, type=Path, help="the workspace to serve (e.g. the demo's, `make demo`)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="where the PNGs go (default: docs/)")
    p.add_argument("--trace", help="the trace the Slot, Fact and Search pages open (default: the first)")
    p.add_argument("--slot", type=int, help="the slot shown (default: the trace's TF-IDF rank 1, as the Overview lists it)")
    p.add_argument("--probe-text", default=PROBE_TEXT, help="the sentence typed into Probe")
    p.add_argument("--search-query", default=SEARCH_QUERY, help="the token typed into Search")
    p.add_argument("--width", type=int, default=1400, help="viewport width in pixels")
    p.add_argument("--max-height", type=int, default=2500, help="the most of a page kept, in pixels from its top")
    p.add_argument("--colours", type=int, default=256, help="palette size of the saved PNGs")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds any one wait may take (a busy machine is slow)")
    args = p.parse_args(argv)

    if not Path(CHROMIUM).exists():
        print(f"screenshots: {CHROMIUM} is missing; install it with `{INSTALL}` (as root)", file=sys.stderr)
        return 2
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        print("screenshots: Playwright is missing; `pip install playwright` in the project's venv", file=sys.stderr)
        return 2
    workspace = args.workspace.resolve()
    traces = sorted(d.name for d in (workspace / "traces").glob("*") if (d / "meta.json").is_file())
    if not traces:
        print(f"screenshots: {workspace} has no traces; build the demo workspace with `make demo`", file=sys.stderr)
        return 2
    trace = args.trace or traces[0]
    if trace not in traces:
        print(f"screenshots: no trace {trace!r} in {workspace} (there are {', '.join(traces)})", file=sys.stderr)
        return 2
    sys.path.insert(0, str(REPO))
    slot = args.slot if args.slot is not None else default_slot(workspace, trace)
    print(f"screenshots: workspace {workspace}, trace {trace}, slot {slot}", flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="smviz-screenshots-"))
    server = None
    try:
        server = Server(workspace, tmp / "_server.log", start_s=args.timeout)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": args.width, "height": 1000})
                page.set_default_timeout(args.timeout * 1000)
                shooter = Shooter(page, server.url, tmp, args, server.logs)
                shoot_all(shooter, trace, slot, args)
            finally:
                browser.close()
    except Exception as err:  # noqa: BLE001 - reported with where the partial output is
        print(f"screenshots: failed: {err}\n(partial output kept in {tmp})", file=sys.stderr)
        if server is not None:
            server.stop()
        return 1
    server.stop()
    for path in shooter.saved:
        shutil.move(path, args.out / path.name)
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"screenshots: {len(shooter.saved)} PNGs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
