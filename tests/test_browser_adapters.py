"""Several adapters in a real browser (Debian's chromium through Playwright), on the tiny Llama with three
adapters: a sweep over adapters with the token lens across its panes, the Adapters tab's comparison, the
anatomy of another adapter, and an evaluation of several adapters. Waits on what the page shows, never on time.
"""

from __future__ import annotations

import pytest

from tests.test_adapters_api import multi_app  # noqa: F401 - the app with three adapters
from tests.test_app_api import PROMPT
from tests.test_browser import WAIT_MS, browser, page, wait_for_app  # noqa: F401 - fixtures
from utils.core.panes import Pane, pane_rows
from utils.core.seam import GenerationSettings

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def url(multi_app):  # noqa: F811
    client, _ = multi_app
    return client.src


def test_a_sweep_over_adapters_with_the_lens_across_its_panes(page, url, multi_app):  # noqa: F811
    from playwright.sync_api import expect

    engine = multi_app[1]
    rows = pane_rows([Pane(None, 0.0), Pane("second"), Pane("third")])
    expected = engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=32))
    page.goto(url)
    wait_for_app(page)
    expect(page.locator("#lens-header")).to_contain_text("2 more adapters")
    page.get_by_role("tab", name="Strength sweep").click()
    models = page.locator("#lens-sweep-models")
    models.get_by_label(engine.adapter_names[0]).uncheck()
    for name in ("Base", "second", "third"):
        models.get_by_label(name, exact=True).check()
    strengths = page.locator("#lens-sweep-strengths textarea, #lens-sweep-strengths input").first
    strengths.fill("1")
    expect(strengths).to_have_value("1")
    page.locator("#lens-sweep-prompt textarea").fill(PROMPT)
    page.locator("#lens-sweep-run").click()
    for i, row in enumerate(rows):
        pane = page.locator(f"#lens-sweep-pane-{i}")
        expect(pane.locator("textarea")).to_have_value(expected.panes[row.key].text, timeout=WAIT_MS)
        expect(pane).to_contain_text(row.label)
    expect(page.locator("#lens-sweep-divergence")).to_contain_text("Against Base", timeout=WAIT_MS)
    expect(page.locator("#lens-sweep-lens-table")).to_contain_text("log p under third", timeout=WAIT_MS)
    expect(page.locator("#lens-sweep-lens .tl-pane")).to_have_count(3)
    expect(page.locator("#lens-sweep-lens-summary")).to_contain_text("KL(third || Base)")
    page.locator("#lens-sweep-lens .tl-tok").first.focus()
    expect(page.locator("#lens-sweep-lens .tl-tok").first.locator(".tl-tip")).to_contain_text("third top 5")


def test_the_adapters_tab_anatomy_and_evaluate_take_several_adapters(page, url):  # noqa: F811
    from playwright.sync_api import expect

    page.goto(url)
    wait_for_app(page)
    page.get_by_role("tab", name="Adapters").click()
    expect(page.locator("#lens-adapters-table")).to_contain_text("second")
    expect(page.locator("#lens-adapters-table")).to_contain_text("primary: fine_tuned")
    page.locator("#lens-sim-run").click()
    expect(page.locator("#lens-sim-summary")).to_contain_text("cos(ΔW_third", timeout=WAIT_MS)
    expect(page.locator("#lens-sim-heatmaps img")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#lens-sim-table")).to_contain_text("q_proj")

    page.get_by_role("tab", name="Adapter anatomy").click()
    expect(page.locator("#lens-anatomy-summary")).to_contain_text("dimensions on average", timeout=WAIT_MS)
    page.locator("#lens-anatomy-adapter input").click()
    page.get_by_role("option", name="second", exact=True).click()
    expect(page.locator("#lens-anatomy-summary")).to_contain_text("Adapter second", timeout=WAIT_MS)
    expect(page.locator("#lens-anatomy-summary")).to_contain_text("r = 4")

    page.get_by_role("tab", name="Evaluate").click()
    page.locator("#lens-eval-adapters").get_by_label("second", exact=True).check()
    page.get_by_role("button", name="Evaluate", exact=True).click()
    expect(page.locator("#lens-eval-metrics")).to_contain_text("second", timeout=WAIT_MS)
    expect(page.locator("#lens-eval-flips")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#lens-eval-adapters-chart img")).to_be_visible(timeout=WAIT_MS)


def test_the_forgetting_check_from_the_page(page, url):  # noqa: F811
    from playwright.sync_api import expect

    page.goto(url)
    wait_for_app(page)
    page.get_by_role("tab", name="Evaluate").click()
    expect(page.get_by_text("What the fine-tune forgot")).to_be_visible()
    page.locator("#lens-forget-run").click()
    totals = page.locator("#lens-forget-totals")
    expect(totals).to_contain_text("24 passages", timeout=WAIT_MS)
    expect(totals).to_contain_text("fine_tuned")
    expect(page.locator("#lens-forget-chart img")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#lens-forget-worst")).to_contain_text("rise")
    expect(page.locator("#lens-forget-tokens .tl-tok").first).to_be_visible()
