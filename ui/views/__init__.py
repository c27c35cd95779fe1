"""What the UI shows, built without gradio: pure functions returning text, HTML, pandas DataFrames, matplotlib
Figures or JSON, unit-tested without a server. Every piece of HTML is built from escaped text.

One module per part of the page: `header`, `compare` (panes, divergence, Stop), `prices` (the pricer's
tables and chart), `sizes` (size math), `reports` (architecture and evaluation JSON), `sweep`, `lens` (the
token lens), `anatomy`; `style` holds what they share. The names the tabs use are gathered here.
"""

from ui.views.compare import DIVERGENCE_CSS, StopSignal, divergence_html, pane_stats
from ui.views.header import HEADER_CSS, format_count, format_size, header_html
from ui.views.prices import (
    CHART_TOKENS,
    FREE_PROMPTS,
    PRICE_SCAN,
    TOPK,
    display_token,
    example_prompts,
    next_token_figure,
    next_token_frame,
    price_estimates,
    price_table_markdown,
)
from ui.views.reports import (
    architecture_json,
    eval_items_frame,
    eval_json,
    own_data_frame,
    own_data_json,
    own_data_markdown,
)
from ui.views.sizes import (
    cross_checks_frame,
    cross_checks_json,
    cross_checks_markdown,
    size_chart,
    size_summary_frame,
)

__all__ = [
    "CHART_TOKENS",
    "DIVERGENCE_CSS",
    "FREE_PROMPTS",
    "HEADER_CSS",
    "PRICE_SCAN",
    "TOPK",
    "StopSignal",
    "architecture_json",
    "cross_checks_frame",
    "cross_checks_json",
    "cross_checks_markdown",
    "display_token",
    "divergence_html",
    "eval_items_frame",
    "eval_json",
    "example_prompts",
    "format_count",
    "format_size",
    "header_html",
    "next_token_figure",
    "next_token_frame",
    "own_data_frame",
    "own_data_json",
    "own_data_markdown",
    "pane_stats",
    "price_estimates",
    "price_table_markdown",
    "size_chart",
    "size_summary_frame",
]
