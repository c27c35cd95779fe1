"""Takes the README's screenshot of the Compare tab: the app on the embedded default, one real compare run.

python scripts/screenshot.py [--out docs/screenshot_compare.png] [--width 1280]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv=None) -> int:
    from playwright.sync_api import expect, sync_playwright

    from utils.task.catalog import example_descriptions
    from utils.task.pricing import build_prompt

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/screenshot_compare.png")
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--tokens", type=int, default=12)
    args = parser.parse_args(argv)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "LORA_LENS_PROFILE": "smollm2-pricer", "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen(
        [sys.executable, "app.py", "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL
    )
    try:
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/config", timeout=5)
                break
            except OSError:
                time.sleep(1)
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=shutil.which("chromium"),
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"],
            )
            page = browser.new_page(viewport={"width": args.width, "height": 900})
            page.goto(url)
            page.get_by_text("Generation settings").click()
            box = page.get_by_label("number input for Max new tokens")
            box.fill(str(args.tokens))
            box.press("Enter")
            page.get_by_label("Prompt", exact=True).fill(build_prompt(example_descriptions(1)[0]))
            page.get_by_role("button", name="Compare", exact=True).click()
            expect(page.locator("#lens-stats-tuned")).to_contain_text("first token", timeout=300_000)
            expect(page.locator("#lens-next-token img")).to_be_visible(timeout=300_000)
            token = page.locator("#lens-token-lens .tl-tok").nth(2)
            expect(token).to_be_visible(timeout=300_000)
            expect(page.locator("#lens-token-kl img")).to_be_visible(timeout=300_000)
            token.hover()  # the screenshot shows one token's card: both models' top next tokens
            expect(token.locator(".tl-tip")).to_be_visible()
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
