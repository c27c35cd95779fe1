"""The Ship tab in a real browser: the merge check's verdict, table, heatmap and answers, a heatmap per route,
and an export downloaded from the page. Waits on what the page shows."""

import pytest

from tests.test_browser import WAIT_MS, browser, page, wait_for_app  # noqa: F401

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def url(tiny_pair):
    from tests.test_app_api import serve
    from utils.runtime.engine import Engine

    demo, address = serve(Engine(tiny_pair))
    yield address
    demo.close()


def test_the_merge_check_and_an_export_from_the_page(page, url, tmp_path):  # noqa: F811
    from playwright.sync_api import expect

    page.goto(url)
    wait_for_app(page)
    page.get_by_role("tab", name="Ship").click()
    items = page.get_by_label("number input for Catalog items answered under each copy")
    items.fill("2")
    items.press("Tab")
    expect(items).to_have_value("2")
    page.locator("#lens-ship-run").click()
    expect(page.locator("#lens-ship-verdict")).to_contain_text("Safest merge", timeout=WAIT_MS)
    expect(page.locator("#lens-ship-verdict")).to_contain_text("2 items")
    routes = page.locator("#lens-ship-routes")
    for route in ("nf4", "bf16", "fp16", "fp32", "original"):
        expect(routes).to_contain_text(route)
    expect(routes).to_contain_text("unmerged adapter on the 4-bit base")
    expect(page.locator("#lens-ship-heatmap img")).to_be_visible(timeout=WAIT_MS)
    expect(page.locator("#lens-ship-answers")).to_contain_text("item 2")
    first = page.locator("#lens-ship-heatmap img").get_attribute("src")
    page.get_by_label("bf16", exact=True).check()
    expect(page.locator("#lens-ship-heatmap img")).not_to_have_attribute("src", first, timeout=WAIT_MS)
    page.screenshot(path=tmp_path / "ship.png", full_page=True)

    page.get_by_label("GGUF LoRA for llama.cpp (f32)").check()
    page.locator("#lens-ship-export").click()
    link = page.locator("#lens-ship-file a[download]").first
    expect(link).to_have_attribute("download", "adapter-lora-f32.gguf", timeout=WAIT_MS)
    expect(page.get_by_role("cell", name="adapter-lora-f32.gguf")).to_be_visible()
    with page.expect_download() as download:
        link.click()
    path = tmp_path / "downloaded.gguf"
    download.value.save_as(path)
    assert path.read_bytes()[:4] == b"GGUF"
