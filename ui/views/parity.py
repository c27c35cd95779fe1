"""Serving parity's tables: each pane's figures on both backends, the tokens where they differ most, the
evaluation items' summary."""

from __future__ import annotations

from ui.views.style import escape as _e

PANE_NAMES = {"base": "Base", "fine_tuned": "Fine-tuned"}


def parity_markdown(parity) -> str:
    """The per-pane table: greedy match, first divergence, largest and mean |Δ log p|, tokens scored."""
    lines = [
        f"Reference: **{_e(parity.reference)}** · served: **{_e(parity.served)}** · prompt "
        f"{parity.prompt_tokens} tokens, up to {parity.max_new_tokens} new tokens per pane.",
        "",
        "| pane | greedy outputs | largest \\|Δ log p\\| (nats) | mean \\|Δ log p\\| | tokens scored |",
        "|---|---|---:|---:|---:|",
    ]
    for key, pane in parity.panes.items():
        match = "match" if pane.greedy_match else f"differ from token {pane.first_divergence}"
        lines.append(
            f"| {PANE_NAMES.get(key, _e(key))} | {match} | {pane.max_gap:.4f} | {pane.mean_gap:.4f} | "
            f"{pane.tokens_scored} |"
        )
    return "\n".join(lines)


def texts_markdown(parity) -> str:
    """Each pane's greedy text on the reference and on the server."""
    parts = []
    for key, pane in parity.panes.items():
        parts.append(
            f"**{PANE_NAMES.get(key, _e(key))}**  \nreference: `{_e(pane.reference_text)!s}`  \n"
            f"served: `{_e(pane.served_text)!s}`"
        )
    return "\n\n".join(parts)


def largest_rows(parity) -> list[list]:
    """Rows of the table of the tokens where the two backends differ most, largest first."""
    rows = []
    for key, pane in parity.panes.items():
        for gap in pane.largest:
            rows.append(
                [PANE_NAMES.get(key, key), gap.position, gap.token, round(gap.reference, 4), round(gap.served, 4),
                 round(gap.gap, 4)]
            )  # fmt: skip
    return sorted(rows, key=lambda row: -abs(row[5]))


LARGEST_HEADERS = ["pane", "position", "token", "log p reference", "log p served", "served - reference"]


def items_markdown(items) -> str:
    lines = [
        f"{items.items} evaluation items, each pane greedy on both backends.",
        "",
        "| pane | greedy answers equal | largest \\|Δ log p\\| | mean \\|Δ log p\\| |",
        "|---|---:|---:|---:|",
    ]
    for key in items.matches:
        lines.append(
            f"| {PANE_NAMES.get(key, _e(key))} | {items.matches[key]} of {items.items} | "
            f"{items.max_gap[key]:.4f} | {items.mean_gap[key]:.4f} |"
        )
    return "\n".join(lines)
