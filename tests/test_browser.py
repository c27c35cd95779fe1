"""The app in a real browser: Debian's chromium driven by Playwright, on the tiny pair for speed.

Selects by role, label and element id and waits with Playwright's retrying `expect`, never a fixed sleep: each
page is typed into only once the app has mounted, and a typed value is re-entered until the page shows it (a
slow machine once lost one to the mount). Covers the Compare run (streamed panes equal plain runs, divergence,
prices, chart), Stop, an error message, the other tabs, a phone-width layout, and embedding: in an <iframe>
and as a <gradio-app> web component on another origin.
Screenshots go to tmp_path; set LORA_LENS_SCREENSHOT=path/to.png to also keep the Compare one.
"""

import functools
import http.server
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.test_app_api import PROMPT, free_port, plain_greedy, serve
from utils.runtime.engine import Engine

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TOKENS = 24
DEFAULT_TOKENS = 64  # the Max new tokens slider's own value
WAIT_MS = 90_000  # two shared CPU cores: generous, the retrying assertions return as soon as they pass


@pytest.fixture(scope="module")
def app_url(tiny_pair):
    demo, url = serve(Engine(tiny_pair))
    yield url
    demo.close()


@pytest.fixture(scope="module")
def expected(tiny_pair):
    return plain_greedy(tiny_pair, PROMPT, TOKENS, adapter=False), plain_greedy(
        tiny_pair, PROMPT, TOKENS, adapter=True
    )


@pytest.fixture(scope="module")
def expected_default(tiny_pair):
    """The panes at the page's own token budget, for the embedding tests: they type no settings, so a value
    typed while an embedded page is still settling (and put back to the default after the slider showed it,
    once in a loaded run) cannot change what they check."""
    return tuple(plain_greedy(tiny_pair, PROMPT, DEFAULT_TOKENS, adapter=a) for a in (False, True))


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=30_000)  # every retrying assertion: the CPU is shared with the model

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"), headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def host_page_server(tmp_path):
    """A tiny http.server on another loopback port, serving tmp_path (the embedding pages)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def wait_for_app(root) -> None:
    """Wait until gradio has fetched its config and mounted the app: the header and the Compare button are
    rendered only then. Typing into a page that is still mounting can be undone by the mount."""
    from playwright.sync_api import expect

    expect(root.locator("#lens-header")).to_contain_text("LoRA Lens", timeout=WAIT_MS)
    expect(root.get_by_role("button", name="Compare", exact=True)).to_be_enabled(timeout=WAIT_MS)


def set_max_new_tokens(root, n: int) -> None:
    """Type into the slider's number box until the slider itself holds the value.

    A value typed while the page or the opening accordion is still rendering can be replaced by the default
    (issue 10: the slider read 64 where 24 had been typed), so the box is filled again until the slider shows
    the value, with a deadline instead of a fixed wait.
    """
    from playwright.sync_api import expect

    box = root.get_by_label("number input for Max new tokens")
    slider = root.get_by_label("range slider for Max new tokens")
    if not box.is_visible():
        root.get_by_text("Generation settings").click()
    expect(box).to_be_visible()
    deadline = time.monotonic() + WAIT_MS / 1000
    while True:
        box.fill(str(n))
        box.press("Tab")
        try:
            expect(slider).to_have_value(str(n), timeout=5_000)
            expect(box).to_have_value(str(n), timeout=1_000)
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise


def wait_until_unchanged(locator, quiet_s: float = 2.0, timeout_s: float = WAIT_MS / 1000) -> str:
    """The locator's text once it has stopped changing for `quiet_s` (a stopped stream's last update)."""
    deadline = time.monotonic() + timeout_s
    last, since = locator.inner_text(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.2)  # polling interval only: the wait ends on what the page shows
        text = locator.inner_text()
        if text != last:
            last, since = text, time.monotonic()
        elif time.monotonic() - since >= quiet_s:
            return text
    raise AssertionError(f"{locator} kept changing for {timeout_s:.0f} s: {last!r}")


def run_compare(root, expected, tokens: int = TOKENS):
    """Type the pricer prompt, set the token budget (unless it is the page's own), press Compare, and wait for
    both panes to finish."""
    from playwright.sync_api import expect

    wait_for_app(root)
    root.get_by_label("Prompt", exact=True).fill(PROMPT)
    expect(root.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
    if tokens != DEFAULT_TOKENS:
        set_max_new_tokens(root, tokens)
    root.get_by_role("button", name="Compare", exact=True).click()
    expect(root.locator("#lens-pane-base textarea")).to_have_value(expected[0], timeout=WAIT_MS)
    expect(root.locator("#lens-pane-tuned textarea")).to_have_value(expected[1], timeout=WAIT_MS)
    expect(root.locator("#lens-stats-base")).to_contain_text(" tokens | ", timeout=WAIT_MS)
    if tokens != DEFAULT_TOKENS:
        expect(root.locator("#lens-stats-base")).to_contain_text(f"{tokens} tokens", timeout=WAIT_MS)
    expect(root.locator("#lens-stats-tuned")).to_contain_text("tok/s")
    expect(root.locator("#lens-stats-tuned")).to_contain_text("first token")
    expect(root.locator("#lens-divergence")).to_contain_text("first differ at token", timeout=WAIT_MS)
    expect(root.locator("#lens-prices")).to_contain_text("Price in the text", timeout=WAIT_MS)
    expect(root.locator("#lens-prices")).to_contain_text("Fine-tuned")
    expect(root.locator("#lens-next-token img")).to_be_visible(timeout=WAIT_MS)


def test_compare_and_tabs(page, app_url, expected, tmp_path):
    from playwright.sync_api import expect

    page.goto(app_url)
    expect(page.locator("#lens-header")).to_contain_text("LoRA adapter")
    expect(page.locator("#lens-header")).to_contain_text("NF4 4-bit")
    run_compare(page, expected)
    # The token lens scores both panes after the run: one coloured span per generated token of each pane.
    expect(page.locator("#lens-token-lens .tl-pane")).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator("#lens-token-lens .tl-tok")).to_have_count(2 * TOKENS)
    expect(page.locator("#lens-token-summary")).to_contain_text("Perplexity")
    page.locator("#lens-token-lens .tl-tok").first.focus()  # selecting a token shows both models' top 5
    expect(page.locator("#lens-token-lens .tl-tok").first.locator(".tl-tip")).to_contain_text("base top 5")
    page.screenshot(path=tmp_path / "compare.png", full_page=True)
    if os.environ.get("LORA_LENS_SCREENSHOT"):
        shutil.copy(tmp_path / "compare.png", os.environ["LORA_LENS_SCREENSHOT"])

    page.get_by_role("tab", name="Architecture").click()
    expect(page.locator("#lens-arch-base")).to_contain_text("Linear4bit(in_features=64")
    expect(page.locator("#lens-arch-peft")).to_contain_text("lora.Linear4bit")
    expect(page.locator("#lens-arch-peft")).to_contain_text("lora_A")
    expect(page.locator("#lens-ref-base")).to_contain_text("Embedding(128256, 4096)", timeout=WAIT_MS)
    expect(page.locator("#lens-ref-peft")).to_contain_text("32 x LlamaDecoderLayer")
    page.screenshot(path=tmp_path / "architecture.png", full_page=True)
    page.get_by_role("button", name="Open in Adapter anatomy").click()  # the first module: layer 0 q_proj
    expect(page.locator("#lens-anatomy-summary")).to_contain_text("dimensions on average", timeout=WAIT_MS)
    expect(page.locator("#lens-anatomy-heatmap img")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#lens-anatomy-sv img")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#lens-anatomy-ranks")).to_contain_text("q_proj")

    page.get_by_role("tab", name="Size math").click()
    summary = page.locator("#lens-size-summary")
    expect(summary).to_contain_text("27,262,976")
    expect(summary).to_contain_text("109,051,904 bytes = 109.05 MB")
    expect(summary).to_contain_text("5,591,539,712 bytes = 5.59 GB")
    expect(page.locator("#lens-cross-checks")).to_contain_text("7,168")
    page.get_by_label("r (rank)").fill("16")
    page.get_by_label("Target modules (comma-separated, or all-linear)").fill("q_proj,v_proj")
    page.get_by_role("button", name="Recompute").click()
    expect(summary).to_contain_text("6,815,744", timeout=WAIT_MS)  # 32 x 16 x (8192 + 5120)
    page.get_by_label("r (rank)").fill("0")
    page.get_by_role("button", name="Recompute").click()
    expect(page.get_by_text("r must be between 1 and 1024")).to_be_visible(timeout=WAIT_MS)
    expect(summary).to_contain_text("6,815,744")  # a bad value leaves the last good results in place
    page.screenshot(path=tmp_path / "size_math.png", full_page=True)

    page.get_by_role("tab", name="Evaluate").click()
    expect(page.get_by_text("The product catalog is synthetic").first).to_be_visible()
    page.get_by_role("button", name="Evaluate", exact=True).click()
    expect(page.locator("#lens-eval-metrics")).to_contain_text("Hit rate", timeout=WAIT_MS)
    page.screenshot(path=tmp_path / "evaluate.png", full_page=True)
    assert all((tmp_path / f"{name}.png").stat().st_size > 10_000 for name in ("compare", "architecture"))


def test_stop_ends_a_long_run_and_errors_are_readable(page, app_url):
    from playwright.sync_api import expect

    page.goto(app_url)
    wait_for_app(page)
    page.get_by_label("Prompt", exact=True).fill("Once upon a time")
    set_max_new_tokens(page, 512)
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#lens-stats-base")).to_contain_text("tok/s", timeout=WAIT_MS)
    page.get_by_role("button", name="Stop").click()
    stats = wait_until_unchanged(page.locator("#lens-stats-base"))
    match = re.search(r"(\d+) tokens", stats)
    assert match and int(match.group(1)) < 512, stats

    # single pane, fine-tuned: the adapter toggle switches the pane
    toggle = page.get_by_role("checkbox", name="Adapter attached")
    page.get_by_role("radio", name="Base only (adapter detached)").check()
    expect(toggle).not_to_be_checked()
    toggle.check()
    expect(page.get_by_role("radio", name="Fine-tuned only (adapter attached)")).to_be_checked()
    set_max_new_tokens(page, 4)
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#lens-stats-tuned")).to_contain_text("4 tokens", timeout=WAIT_MS)
    expect(page.locator("#lens-pane-base")).to_be_hidden()
    # The run ends with the token lens of its one pane (same GPU call); a click before that is ignored, as
    # gradio ignores any click on a button whose event is still running.
    expect(page.locator("#lens-token-lens .tl-tok")).to_have_count(4, timeout=WAIT_MS)

    page.get_by_label("Prompt", exact=True).fill("   ")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("   ")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text("The prompt is empty")).to_be_visible(timeout=WAIT_MS)


def test_phone_width_wraps_the_columns(browser, app_url, tmp_path):
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        page.goto(app_url)
        wait_for_app(page)
        expect(page.locator("#lens-pane-tuned")).to_be_visible()
        assert page.evaluate("document.documentElement.scrollWidth") <= 390  # nothing wider than the screen
        base, tuned = (
            page.locator("#lens-pane-base").bounding_box(),
            page.locator("#lens-pane-tuned").bounding_box(),
        )
        assert tuned["y"] >= base["y"] + base["height"] - 1, "the panes stack on a phone"
        prompt, run = page.locator("#lens-prompt").bounding_box(), page.locator("#lens-run").bounding_box()
        assert run["y"] > prompt["y"] and run["width"] <= 390
        page.screenshot(path=tmp_path / "phone.png", full_page=True)
    finally:
        context.close()


CELL_LINES = """(selector) => Array.from(document.querySelectorAll(selector + " th, " + selector + " td"))
    .filter((cell) => cell.innerText.trim())
    .map((cell) => {
        const walker = document.createTreeWalker(cell, NodeFilter.SHOW_TEXT);
        const tops = new Set();
        for (let node = walker.nextNode(); node; node = walker.nextNode()) {
            if (!node.textContent.trim()) continue;
            const range = document.createRange();
            range.selectNodeContents(node);
            for (const rect of range.getClientRects()) tops.add(Math.round(rect.top));
        }
        return [cell.innerText.trim(), tops.size];  // lines the cell's text takes
    })"""


def test_phone_width_tables_scroll_sideways(browser, app_url, expected):
    """At 390 px the price table, the token lens's totals and the anatomy's rank table keep every cell on one
    line and scroll inside their block, instead of breaking words into letters (or widening the page)."""
    from playwright.sync_api import expect

    context = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True)
    page = context.new_page()
    try:
        page.goto(app_url)
        run_compare(page, expected)
        expect(page.locator("#lens-token-summary")).to_contain_text("Perplexity", timeout=WAIT_MS)
        summary = page.locator("#lens-token-summary table")
        assert summary.evaluate("t => t.scrollWidth > t.clientWidth")  # wider than the phone: it scrolls
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.get_by_role("button", name="More tabs").click()  # at 390 px only the open tab fits in the bar
        page.locator(".overflow-dropdown").get_by_role("button", name="Adapter anatomy").click()
        expect(page.locator("#lens-anatomy-ranks")).to_contain_text("q_proj", timeout=WAIT_MS)
        for selector in ("#lens-prices", "#lens-token-summary", "#lens-anatomy-ranks"):
            cells = page.evaluate(CELL_LINES, selector)
            assert cells, selector
            assert [cell for cell in cells if cell[1] > 1] == [], selector
    finally:
        context.close()


def test_embedded_in_an_iframe(page, app_url, expected_default, host_page_server, tmp_path):
    (tmp_path / "iframe.html").write_text(
        "<!doctype html><html><body><h1>A page that embeds LoRA Lens</h1>"
        f'<iframe id="lens" src="{app_url}" width="100%" height="2200" style="border:0"></iframe></body></html>'
    )
    page.goto(f"{host_page_server}/iframe.html")
    run_compare(page.frame_locator("#lens"), expected_default, DEFAULT_TOKENS)
    page.screenshot(path=tmp_path / "iframe.png", full_page=True)


def test_embedded_as_a_web_component(page, app_url, host_page_server, tmp_path):
    """<gradio-app src=...> on another origin, with the web component script the app itself serves.

    On a real page the script is https://gradio.s3-us-west-2.amazonaws.com/6.31.0/gradio.js; it imports
    the same ./assets/index-*.js that this gradio install serves, so the test stays offline.
    """
    import gradio
    from playwright.sync_api import expect

    gradio_js = Path(gradio.__file__).parent / "templates" / "frontend" / "gradio.js"
    entry = re.search(r'import\("\./(assets/[^"]+\.js)"\)', gradio_js.read_text()).group(1)
    (tmp_path / "component.html").write_text(
        f'<!doctype html><html><head><script type="module" src="{app_url}{entry}"></script></head>'
        f'<body><h1>A page that embeds LoRA Lens</h1><gradio-app src="{app_url}"></gradio-app></body></html>'
    )
    page.goto(f"{host_page_server}/component.html")
    wait_for_app(page.locator("gradio-app"))
    page.get_by_label("Prompt", exact=True).fill("Once upon a time")
    expect(page.get_by_label("Prompt", exact=True)).to_have_value("Once upon a time")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#lens-stats-tuned")).to_contain_text("tokens", timeout=WAIT_MS)
    page.screenshot(path=tmp_path / "component.png", full_page=True)


def choose_file(page, selector: str, path) -> None:
    """Pick a file in a gr.File block as a visitor does: its upload area opens the browser's file chooser."""
    with page.expect_file_chooser() as chooser:
        page.locator(selector).get_by_role("button", name="Click to upload or drop files").click()
    chooser.value.set_files(str(path))


def test_evaluate_your_own_data_from_the_page(page, app_url, tmp_path):
    """Upload a JSONL file in the Evaluate tab: the totals and one row per example appear, and a file that is
    not JSONL gets its message while the last results stay."""
    from playwright.sync_api import expect

    data = tmp_path / "my_data.jsonl"
    data.write_text(
        '{"prompt": "Once upon a time", "answer": " there"}\n{"prompt": "The sky is", "answer": " blue"}\n'
    )
    page.goto(app_url)
    wait_for_app(page)
    page.get_by_role("tab", name="Evaluate").click()
    choose_file(page, "#lens-own-file", data)
    expect(page.locator("#lens-own-file")).to_contain_text("my_data", timeout=WAIT_MS)
    page.get_by_role("button", name="Evaluate my data").click()
    totals = page.locator("#lens-own-totals")
    expect(totals).to_contain_text("Scored 2 items", timeout=WAIT_MS)
    expect(totals).to_contain_text("Mean log p(answer)")
    expect(page.locator("#lens-own-items")).to_contain_text("Once upon a time")

    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    page.locator("#lens-own-file").get_by_role("button", name="Clear").click()
    choose_file(page, "#lens-own-file", bad)
    expect(page.locator("#lens-own-file")).to_contain_text("bad", timeout=WAIT_MS)
    page.get_by_role("button", name="Evaluate my data").click()
    expect(page.get_by_text("Line 1 is not a JSON object")).to_be_visible(timeout=WAIT_MS)
    expect(totals).to_contain_text("Scored 2 items")
