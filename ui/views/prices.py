"""The pricer's views: example prompts, price estimates per pane, the price table, the next-token chart."""

from __future__ import annotations

from ui.views.style import PANE_COLOURS, SHORT_LABELS
from ui.views.style import money as _money
from utils.core.profiles import ModelProfile
from utils.core.seam import PANE_LABELS, NextTokenView

FREE_PROMPTS = (
    "The three primary colours are",
    "Write a haiku about autumn leaves.",
    "def fibonacci(n):",
)
TOPK = 3  # K of the lesson's top-K price estimate
CHART_TOKENS = 10  # tokens in the next-token bar chart
PRICE_SCAN = 64  # next-token candidates a price estimate walks for its K numeric ones (topk_price_estimate)


def example_prompts(profile: ModelProfile, n: int = 4) -> list[tuple[str, str]]:
    """(label, prompt) pairs for the examples: test-split catalog items in the task prompt, then free text."""
    from utils.task.catalog import example_descriptions
    from utils.task.pricing import build_prompt

    out = []
    if profile.is_pricer:
        for description in example_descriptions(n):
            label = description if len(description) <= 60 else description[:57] + "..."
            out.append((f"Price: {label}", build_prompt(description, profile.task_prompt)))
    out += [(f"Free: {p}", p) for p in FREE_PROMPTS]
    return out


def price_estimates(
    texts: dict[str, str],
    views: dict[str, NextTokenView],
    k: int = TOPK,
    labels: dict[str, str] | None = None,
) -> dict:
    """Per pane: the price parsed from the greedy text and the top-K estimates from the next-token logits.

    extracted_price: the number the pane's text starts with (None when it wrote no number).
    topk_estimate: the lesson's probability-weighted mean of the K most likely numeric next tokens; with a
    digit-per-token tokenizer (SmolLM2) that is the expected leading digit, not a price.
    topk_price: that expectation put in place of the greedy number's leading token (= topk_estimate where a
    whole price is one token, as with Llama 3).
    """
    from utils.task.pricing import blend_topk_with_greedy, extract_price, topk_from_candidates

    out = {}
    for key, view in views.items():
        text = texts.get(key, "")
        topk = topk_from_candidates(view.tokens, view.probabilities, k=k)
        out[key] = {
            "label": (labels or PANE_LABELS).get(key, key),
            "text": text,
            "extracted_price": extract_price(text),
            "topk_estimate": topk.estimate,
            "topk_price": blend_topk_with_greedy(topk, text),
            "candidates": [{"token": t, "value": v, "probability": p} for t, v, p in topk.candidates],
        }
    return out


def price_table_markdown(estimates: dict, k: int = TOPK, truth: float | None = None) -> str:
    """The price estimates as a small markdown table, one row per pane; with the catalog's true price, each
    pane's error too, so a visitor sees which pane was right."""
    lines = [
        f"| Pane | Price in the text | Top-{k} token | Top-{k} price |"
        + (" Error of the text |" if truth else ""),
        "|---|---:|---:|---:|" + ("---:|" if truth else ""),
    ]
    for key, est in estimates.items():
        raw = "n/a" if est["topk_estimate"] is None else f"{est['topk_estimate']:,.2f}"
        row = (
            f"| {est['label'] if key not in SHORT_LABELS else SHORT_LABELS[key]} | "
            f"{_money(est['extracted_price'])} | {raw} | {_money(est['topk_price'])} |"
        )
        if truth:
            price = est["extracted_price"]
            row += " n/a |" if price is None else f" {_money(abs(price - truth))} |"
        lines.append(row)
    lines.append("")
    if truth:
        lines.append(f"**True price of this catalog item: {_money(truth)}** (synthetic catalog, test split).")
        lines.append("")
    lines.append(
        f"Top-{k} token: the probability-weighted mean of the {k} most likely numeric tokens after "
        f'"Price is $" (one digit for tokenizers that write a digit per token). Top-{k} price: that '
        "expectation in place of the leading token of the number the pane wrote."
    )
    return "\n".join(lines)


def display_token(text: str) -> str:
    """A token as a chart label: spaces, newlines and tabs made visible. Example: " 1" -> "␣1" """
    if text == "":
        return "(empty)"
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")


def next_token_frame(views: dict[str, NextTokenView], top: int = CHART_TOKENS, labels: dict | None = None):
    """Long-format DataFrame (token, token_id, pane, probability) of the top next tokens of every pane.

    The tokens are the union of each pane's top ones, ordered by their highest probability in any pane and
    cut to `top`; every pane gets a row for every token (its probability over the whole vocabulary, 0 where
    the token is below the pane's listed candidates), so the bars can be grouped.
    """
    import pandas as pd

    names: dict[int, str] = {}
    for view in views.values():
        for token_id, text in zip(view.token_ids, view.tokens, strict=True):
            names.setdefault(token_id, text)
    best = sorted(names, key=lambda t: -max(view.probability_of(t) for view in views.values()))[:top]
    rows = [
        {
            "token": display_token(names[t]),
            "token_id": t,
            "pane": (labels or PANE_LABELS).get(key, key),
            "probability": views[key].probability_of(t),
        }
        for t in best
        for key in views
    ]
    return pd.DataFrame(rows, columns=["token", "token_id", "pane", "probability"])


def next_token_figure(frame, title: str = 'Next token after "Price is $"'):
    """Grouped horizontal bars: one group per token, one bar per pane (base grey, fine-tuned indigo)."""
    from matplotlib.figure import Figure

    tokens = list(dict.fromkeys(frame["token"]))
    panes = list(dict.fromkeys(frame["pane"]))
    figure = Figure(figsize=(7.5, 0.42 * max(len(tokens), 3) + 1.3), layout="constrained")
    axis = figure.subplots()
    height = 0.8 / max(len(panes), 1)
    colours = {PANE_LABELS[k]: c for k, c in PANE_COLOURS.items()}
    for j, pane in enumerate(panes):
        sub = frame[frame["pane"] == pane].set_index("token").reindex(tokens)
        ys = [i + (j - (len(panes) - 1) / 2) * height for i in range(len(tokens))]
        bars = axis.barh(
            ys, sub["probability"].fillna(0.0), height=height, label=pane, color=colours.get(pane)
        )
        axis.bar_label(
            bars,
            labels=[f"{p:.0%}" if p >= 0.005 else "" for p in sub["probability"].fillna(0.0)],
            padding=2,
            fontsize=8,
        )
    axis.set_yticks(range(len(tokens)), tokens)
    axis.invert_yaxis()
    top_probability = float(frame["probability"].max()) if len(frame) else 1.0
    axis.set_xlim(0, min(1.0, max(top_probability * 1.3, 1e-6)))
    axis.set_xlabel("probability")
    axis.set_title(title)
    axis.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(panes), fontsize=8, frameon=False)
    axis.grid(True, axis="x", alpha=0.25)
    return figure
