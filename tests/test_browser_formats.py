"""Prompt formats in a real browser: the base raw and the fine-tune in the base's chat template from the Compare
tab, each pane equal to that format run alone, and what each pane was given shown with its special tokens,
token count and the untrained-token warning; a broken custom template gives a message and leaves the page
working."""

import pytest

from tests.test_browser import WAIT_MS, browser, page, wait_for_app  # noqa: F401
from utils.core.prompt_format import PromptFormat, format_rows
from utils.core.seam import BASE, FINE_TUNED, GenerationSettings

pytestmark = pytest.mark.browser
PROMPT = "Name a colour of the sky."
TOKENS = 64  # the page's own budget: nothing typed into the settings (see test_browser.expected_default)


@pytest.fixture(scope="module")
def served(tiny_pair):
    from tests.test_app_api import serve
    from utils.runtime.engine import Engine

    engine = Engine(tiny_pair)
    demo, url = serve(engine)
    yield url, engine
    demo.close()


def _expected(engine):
    """Each pane run alone in its format (test_prompt_format.py checks these against plain peft runs)."""
    out = {}
    for key, fmt in ((BASE, PromptFormat()), (FINE_TUNED, PromptFormat("chat"))):
        rows = [row for row in engine.rows_for("both") if row.key == key]
        rows, rendered = format_rows(engine, PROMPT, rows, {key: fmt}, TOKENS)
        out[key] = engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=TOKENS)).text(key)
        out[key + "_tokens"] = len(rendered[key].ids)
    return out


def choose(page, label, option):  # noqa: F811
    """Pick a dropdown's option from its own list (another dropdown's list may still be in the page)."""
    from playwright.sync_api import expect

    box = page.get_by_label(label, exact=True)
    box.click()
    options = page.locator(f"#{box.get_attribute('aria-controls')}")  # this dropdown's own list
    options.get_by_role("option", name=option, exact=True).click()
    expect(box).to_have_value(option)


def test_panes_in_their_own_formats_from_the_compare_tab(page, served, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    url, engine = served
    expected = _expected(engine)
    page.goto(url)
    wait_for_app(page)
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    expect(page.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
    choose(page, "Prompt format", "Base chat template")
    choose(page, "Base pane's format", "Raw text (as typed)")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.locator("#lens-pane-base textarea")).to_have_value(expected[BASE], timeout=WAIT_MS)
    expect(page.locator("#lens-pane-tuned textarea")).to_have_value(expected[FINE_TUNED], timeout=WAIT_MS)
    page.get_by_text("What each pane was given").click()
    given = page.locator("#lens-given")
    expect(given).to_contain_text(f"Base chat template, template from the base's tokenizer, "
                                  f"{expected[FINE_TUNED + '_tokens']} tokens", timeout=WAIT_MS)  # fmt: skip
    expect(given).to_contain_text(f"Raw text (as typed), {expected[BASE + '_tokens']} tokens")
    expect(given.locator(".special").first).to_have_text("<|im_start|>")
    expect(given).to_contain_text("look untrained")
    page.screenshot(path=tmp_path / "formats.png", full_page=True)

    page.get_by_text("System message and custom template").first.click()
    choose(page, "Prompt format", "Custom template")
    editor = page.locator(".cm-content").first
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.type("{{ messages.__class__ }}")
    page.get_by_role("button", name="Compare", exact=True).click()
    expect(page.get_by_text("tried to reach something").first).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#lens-pane-tuned textarea")).to_have_value(expected[FINE_TUNED])  # left in place


def test_sweep_panes_typed_with_their_own_formats(page, served):  # noqa: F811
    """The same base model raw and in its chat template, beside the fine-tune in the template: three panes of
    one batch, each equal to its format run alone, the token lens across them, and what each was given."""
    from playwright.sync_api import expect

    from utils.core.panes import pane_formats, pane_rows, parse_pane_text

    url, engine = served
    panes = parse_pane_text("base@raw, base@chat, fine_tuned@chat", engine)
    rows = pane_rows(panes)
    settings = GenerationSettings(max_new_tokens=32)
    expected = {}
    for pane, row in zip(panes, rows, strict=True):
        alone, rendered = format_rows(engine, PROMPT, [row], pane_formats([pane], [row], PromptFormat()), 32)
        expected[row.key] = engine.run_rows(PROMPT, alone, settings).text(row.key)
        assert rendered[row.key].format == (
            "Raw text (as typed)" if "[raw]" in row.label else "Base chat template"
        )
    page.goto(url)
    wait_for_app(page)
    page.get_by_role("tab", name="Strength sweep").click()
    typed = page.locator("#lens-sweep-panes textarea, #lens-sweep-panes input").first
    typed.fill("base@raw, base@chat, fine_tuned@chat")
    expect(typed).to_have_value("base@raw, base@chat, fine_tuned@chat")
    page.locator("#lens-sweep-prompt textarea").fill(PROMPT)
    page.locator("#lens-sweep-run").click()
    for i, row in enumerate(rows):
        pane = page.locator(f"#lens-sweep-pane-{i}")
        expect(pane.locator("textarea")).to_have_value(expected[row.key], timeout=WAIT_MS)
        expect(pane).to_contain_text(row.label)
    expect(page.locator("#lens-sweep-lens .tl-pane")).to_have_count(3, timeout=WAIT_MS)
    page.get_by_text("What each pane was given").last.click()
    given = page.locator("#lens-sweep-given")
    expect(given).to_contain_text("Base [raw]: Raw text (as typed)", timeout=WAIT_MS)
    expect(given).to_contain_text("Base [chat]: Base chat template")
