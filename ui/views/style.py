"""What the views share: the panes' colours and short names, and escaping (every piece of HTML is built from
escaped text: prompts and model output never reach the page raw)."""

import html
import math

from utils.core.seam import BASE, FINE_TUNED

PANE_COLOURS = {BASE: "#8c8c8c", FINE_TUNED: "#4f46e5"}  # grey for the bare base, indigo for the fine-tune
SHORT_LABELS = {BASE: "Base", FINE_TUNED: "Fine-tuned"}


def escape(text) -> str:
    return html.escape(str(text), quote=True)


def money(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"${value:,.2f}"
