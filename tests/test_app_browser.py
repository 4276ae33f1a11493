"""The app in a real browser: `smviz app` serves a micro workspace on 127.0.0.1, headless Chromium
(Debian's `chromium`, driven by Playwright) opens the Slot page, a slot id is typed into the "Slot id"
input, and the page must render that slot's top contexts (`.smviz-context` blocks with the accessing
token in `mark.smviz-focus`) as the library computes them, with no "Deploy" button in the toolbar (a
local tool); then a sentence typed into the Probe page is read live (each token's strongest slot as
`read_text` gives it) and the Search page finds a token's rows as `token_search` does. Screenshots
are saved in the test's tmp dir.

`make test` installs /usr/bin/chromium when it is missing and the user is root. Where it is missing
the test is skipped, the skip reason giving the install command; under CI (`CI` set, as `.ci/run`
does) a missing chromium is a failure instead, so CI never skips the browser silently."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
SERVER_START_S = 60.0  # interpreter + torch + streamlit start-up, on a busy 2-core machine
FIRST_RENDER_S = 60.0  # first render of the page: the trace is loaded and its slot index built
RENDER_S = 30.0  # later renders


INSTALL = "apt-get update && apt-get install -y chromium"


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium executable; checked before the workspace and server fixtures start anything."""
    if Path(CHROMIUM).exists():
        return CHROMIUM
    install = INSTALL if os.geteuid() == 0 else f"sudo sh -c '{INSTALL}'"
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing under CI; `make test` installs it as root, or run `{install}`")
    pytest.skip(f"{CHROMIUM} is not installed: `make test` installs it when run as root, or run `{install}`")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The shared micro workspace with the new facts recorded into WS/traces/new (no run: the Slot
    page needs none)."""
    from micro_workspace import build_micro_workspace

    return build_micro_workspace(tmp_path_factory.mktemp("app") / "ws", stats_batches=4, runs=())


@pytest.fixture(scope="module")
def server(workspace, tmp_path_factory):
    """`smviz app --workspace WS --port P` in its own process group, terminated (group and all) at the end."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("app-log") / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "smviz", "app", "--workspace", str(workspace.root), "--port", str(port),
           "--host", "127.0.0.1"]
    log = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def logs() -> str:
        log.flush()
        return log_path.read_text(errors="replace")[-4000:]

    try:
        from smviz.serve import wait_until_serving

        url = f"http://127.0.0.1:{port}"
        why = wait_until_serving(url, proc, SERVER_START_S)
        if why is not None:
            pytest.fail(f"`{' '.join(cmd)}` {why}:\n{logs()}")
        yield url, logs
    finally:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the group: smviz app and the streamlit it starts
            except ProcessLookupError:
                pass
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


def _norm(text: str) -> str:
    return " ".join(text.split())


def test_slot_page_renders_contexts_in_chromium(chromium, workspace, server, tmp_path):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    from smviz.trace import Trace

    trace = Trace.load(workspace.trace("new"))
    slot = int(trace.to_pandas()["slot"].value_counts().index[0])  # the most-read slot
    top = trace.slot_index().contexts(slot, n=5, window=4).iloc[0]
    token = _norm(top["token"])
    before = _norm(top["window"][top["focus"] - 1]) if top["focus"] > 0 else ""
    assert token, f"the top context of slot {slot} is a whitespace token {top['token']!r}: pick another slot"

    url, logs = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"{url}/Slot?trace=new", timeout=FIRST_RENDER_S * 1000)
            box = page.locator('input[aria-label="Slot id"]')
            try:
                box.wait_for(state="visible", timeout=FIRST_RENDER_S * 1000)
            except PlaywrightTimeout:
                page.screenshot(path=str(tmp_path / "slot_page_no_input.png"), full_page=True)
                pytest.fail(f"no 'Slot id' number input on {url}/Slot?trace=new within {FIRST_RENDER_S:.0f}s; page text:\n"
                            f"{page.inner_text('body')[:2000]}\nserver log:\n{logs()}")
            box.fill(str(slot))
            box.press("Enter")
            # Rendered: the first context's focus token is the library's rank-0 token of this slot,
            # and the input holds the slot id.
            try:
                page.wait_for_function(
                    """([slot, token]) => {
                        const box = document.querySelector('input[aria-label="Slot id"]');
                        const first = document.querySelector('.smviz-context mark.smviz-focus');
                        return box && box.value === String(slot) && first
                            && first.textContent.split(/\\s+/).filter(Boolean).join(' ') === token;
                    }""",
                    arg=[slot, token], timeout=FIRST_RENDER_S * 1000,
                )
            except PlaywrightTimeout:
                page.screenshot(path=str(tmp_path / "slot_page_timeout.png"), full_page=True)
                pytest.fail(f"slot {slot}'s contexts (top token {token!r}) did not render within {FIRST_RENDER_S:.0f}s; "
                            f"page text:\n{page.inner_text('body')[:2000]}\nserver log:\n{logs()}")
            # let the rest of the script run finish (Streamlit shows its status widget while it runs),
            # so the screenshot shows the whole page; not an assertion
            try:
                page.wait_for_function("""() => !document.querySelector('[data-testid="stStatusWidget"]')""",
                                       timeout=RENDER_S * 1000)
            except PlaywrightTimeout:
                pass
            contexts = page.locator(".smviz-context")
            assert contexts.count() >= 1
            assert "Top contexts" in page.inner_text("body")
            first = contexts.first.text_content() or ""
            assert token in _norm(first), (token, first)
            if before:
                assert before in _norm(first), f"the token before the focus ({before!r}) is not in {first!r}"
            focus = [_norm(t) for t in page.locator(".smviz-context mark.smviz-focus").all_text_contents()]
            assert len(focus) == contexts.count(), "every context marks exactly one focus token"
            # a local analysis tool: the toolbar is minimal (app/.streamlit/config.toml), no "Deploy" button
            assert page.locator('[data-testid="stAppDeployButton"]').count() == 0, "the toolbar shows a Deploy button"
            shot = tmp_path / "slot_page.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert shot.exists() and shot.stat().st_size > 0


def _wait_idle(page) -> None:
    """Let the script run finish (Streamlit shows its status widget while it runs); not an assertion."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function("""() => !document.querySelector('[data-testid="stStatusWidget"]')""", timeout=RENDER_S * 1000)
    except PlaywrightTimeout:
        pass


def test_probe_and_search_in_chromium(chromium, workspace, server, tmp_path):
    """Probe: a sentence typed into the text box is read live and each token's strongest slot is the
    library's (`read_text` → `text_top_slots`). Search: ?q=TOKEN finds as many token rows as
    `token_search` does."""
    from urllib.parse import quote

    from playwright.sync_api import sync_playwright

    from smviz.analysis import read_text, text_top_slots, token_search
    from smviz.model import MemoryModel
    from smviz.trace import Trace

    sentence = "Maribel keeps an orange kayak beside the old pier."
    model = MemoryModel.from_pretrained(workspace.model("micro"))
    per_token = text_top_slots(read_text(model, sentence), 5)
    first = per_token[per_token["position"] == 0].sort_values("rank")
    want = f"#0: {int(first['slot'].iloc[0])} ({float(first['weight'].iloc[0]):.2f})"

    trace = Trace.load(workspace.trace("new"))
    token = _norm(trace.slot_index().contexts(int(trace.to_pandas()["slot"].value_counts().index[0]), n=1)["token"].iloc[0])
    rows = token_search(trace.slot_index(), token).attrs["rows"]

    url, logs = server
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1400})
            page.goto(f"{url}/Probe", timeout=FIRST_RENDER_S * 1000)
            box = page.locator('textarea[aria-label="Text"]')
            box.wait_for(state="visible", timeout=FIRST_RENDER_S * 1000)
            box.fill(sentence)
            box.press("Control+Enter")
            page.wait_for_function(
                """(want) => { const t = document.querySelector('.smviz-tok');
                               return t && t.getAttribute('title').startsWith(want); }""",
                arg=want, timeout=FIRST_RENDER_S * 1000)
            _wait_idle(page)
            strip = "".join(page.locator(".smviz-tok").all_text_contents())
            assert _norm(strip) == _norm(sentence), (strip, sentence)
            page.screenshot(path=str(tmp_path / "probe.png"), full_page=True)

            page.goto(f"{url}/Search?trace=new&q={quote(token)}", timeout=FIRST_RENDER_S * 1000)
            page.get_by_text(f"{rows:,} token rows equal").wait_for(timeout=FIRST_RENDER_S * 1000)
            page.locator('[data-testid="stDataFrame"]').first.wait_for(timeout=RENDER_S * 1000)  # the results table
            page.screenshot(path=str(tmp_path / "search.png"), full_page=True)
        except Exception as err:
            page.screenshot(path=str(tmp_path / "failed.png"), full_page=True)
            raise AssertionError(f"{err}\npage text:\n{page.inner_text('body')[:2000]}\nserver log:\n{logs()}") from err
        finally:
            browser.close()
