"""What the UI shows, built from utils' objects: header, pane stats, divergence, price tables, charts, tables.

Pure functions returning text, HTML, pandas DataFrames or matplotlib Figures, so app.py stays a thin layer of
gradio wiring and all of this is unit-tested without a server. Gradio is never imported here. Every piece of
HTML is built from escaped text: prompts and model output never reach the page raw.
"""

from __future__ import annotations

import functools
import html
import json
import math
import re
import threading
from collections.abc import Callable
from pathlib import Path

from utils.engine import (
    BASE,
    FINE_TUNED,
    PANE_LABELS,
    NextTokenView,
    PaneState,
    first_divergence,
    parse_number,
)
from utils.errors import InputError
from utils.profiles import LoraSettings, ModelProfile

FREE_PROMPTS = (
    "The three primary colours are",
    "Write a haiku about autumn leaves.",
    "def fibonacci(n):",
)
TOPK = 3  # K of the lesson's top-K price estimate
CHART_TOKENS = 10  # tokens in the next-token bar chart
R_RANGE = (1, 1024)
ALPHA_RANGE = (0.0, 65536.0)  # exclusive low end: alpha must be positive
N_ITEMS_RANGE = (1, 200)
MAX_TARGETS = 32
_MODULE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
PANE_COLOURS = {BASE: "#8c8c8c", FINE_TUNED: "#4f46e5"}  # grey for the bare base, indigo for the fine-tune
SHORT_LABELS = {BASE: "Base", FINE_TUNED: "Fine-tuned"}
EVAL_PANES = {"base": BASE, "fine-tuned": FINE_TUNED}  # utils.evaluate's pane names -> the engine's keys

# Scoped CSS for the gr.HTML blocks (gradio's css_template); theme variables keep dark mode readable.
HEADER_CSS = """
.lens-header h1 { margin: 0 0 4px 0; font-size: 1.6em; }
.lens-header .tagline { margin: 0 0 10px 0; color: var(--body-text-color-subdued); }
.lens-cards { display: flex; flex-wrap: wrap; gap: 8px; }
.lens-card { flex: 1 1 200px; border: 1px solid var(--border-color-primary); border-radius: 8px;
  padding: 6px 10px; background: var(--block-background-fill); min-width: 0; }
.lens-card .k { font-size: 0.78em; text-transform: uppercase; letter-spacing: .04em;
  color: var(--body-text-color-subdued); }
.lens-card .v { font-weight: 600; overflow-wrap: anywhere; }
.lens-card .s { font-size: 0.85em; color: var(--body-text-color-subdued); overflow-wrap: anywhere; }
.lens-notice { margin-top: 8px; padding: 6px 10px; border-radius: 8px; border-left: 4px solid #d97706;
  background: rgba(217, 119, 6, 0.10); overflow-wrap: anywhere; }
"""
DIVERGENCE_CSS = """
.lens-div { border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 12px; }
.lens-div .title { font-weight: 600; margin-bottom: 4px; }
.lens-div pre { white-space: pre-wrap; overflow-wrap: anywhere; margin: 4px 0; font-size: 0.9em;
  background: var(--background-fill-secondary); padding: 6px 8px; border-radius: 6px; }
.lens-div .base { border-left: 4px solid #8c8c8c; }
.lens-div .tuned { border-left: 4px solid #4f46e5; }
.lens-div .muted { color: var(--body-text-color-subdued); }
"""


def _e(text) -> str:
    return html.escape(str(text), quote=True)


# ---------------------------------------------------------------------------------------------------
# Header


def format_count(n: int) -> str:
    """A parameter count with its magnitude. Example: format_count(8_030_261_248) == "8,030,261,248 (8.03 B)" """
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n:,} ({n / size:.2f} {unit})"
    return f"{n:,}"


def format_size(n_bytes: int) -> str:
    """Decimal units as in utils.sizing. Example: format_size(25_204_032) == "25.20 MB"; format_size(28_672) == "28.67 kB" """
    from utils.sizing import format_bytes

    return format_bytes(n_bytes)


def header_html(report, profile: ModelProfile | None = None) -> str:
    """The header: which base and adapter, on which device, in what precision, their footprints, notices.

    `report` is utils.loading.LoadReport. Everything is escaped; notices (fallbacks, base-only) are shown
    in a highlighted box so nobody mistakes a base-only run for a fine-tune.
    """
    precision = "NF4 4-bit (bitsandbytes, double quant)" if report.precision == "nf4" else "full precision"
    cards = [
        (
            "Base",
            report.base,
            f"{format_count(report.base_params)} params · {format_size(report.base_footprint_bytes)}",
        ),
    ]
    if report.adapter:
        cards.append(
            (
                "LoRA adapter",
                report.adapter,
                f"{format_count(report.adapter_params)} params · file {format_size(report.adapter_file_bytes)}",
            )
        )
        cards.append(
            (
                "Footprint",
                f"{format_size(report.footprint_with_adapter_bytes)} with the adapter",
                f"base alone {format_size(report.base_footprint_bytes)} · "
                f"adapter adds {format_size(report.footprint_with_adapter_bytes - report.base_footprint_bytes)}",
            )
        )
    else:
        cards.append(("LoRA adapter", "none: base-only", "only the base pane is available"))
    kernel = f" · {report.kernel}" if getattr(report, "kernel", "") else ""
    cards.append(("Device", report.device, f"{precision} · compute {report.compute_dtype}{kernel}"))
    title = profile.title if profile is not None else report.title
    parts = [
        '<div class="lens-header">',
        "<h1>LoRA Lens</h1>",
        f'<p class="tagline">What a LoRA fine-tune changes: base and fine-tuned side by side from one '
        f"4-bit model. Loaded: <b>{_e(title)}</b> (profile <code>{_e(report.profile)}</code>, "
        f"loaded in {report.load_seconds:.1f} s).</p>",
        '<div class="lens-cards">',
    ]
    for key, value, sub in cards:
        parts.append(
            f'<div class="lens-card"><div class="k">{_e(key)}</div><div class="v">{_e(value)}</div>'
            f'<div class="s">{_e(sub)}</div></div>'
        )
    parts.append("</div>")
    parts += [f'<div class="lens-notice">{_e(n)}</div>' for n in report.notices]
    parts.append("</div>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------------
# Compare: panes and divergence


def pane_stats(pane: PaneState | None) -> str:
    """The line under a pane: tokens, tokens/s, time to first token (and why it stopped, once done)."""
    if pane is None:
        return ""
    return pane.stats_line()


def divergence_html(base: PaneState | None, tuned: PaneState | None, decode: Callable, finished: bool) -> str:
    """Where the two outputs first differ: the token index, the shared text, and the two continuations.

    `decode` turns token ids into text (tokenizer.decode). While streaming, equal outputs so far read as
    "no difference yet"; once finished, as identical.
    Example: base [1, 2, 3], fine-tuned [1, 5] -> "first differ at token 1", shared text decode([1]).
    """
    if base is None or tuned is None:
        return ""
    a, b = base.token_ids, tuned.token_ids
    index = first_divergence(a, b)
    unequal_ends = index is not None and (index < min(len(a), len(b)) or finished)
    if index is None or not unequal_ends:
        n = min(len(a), len(b))
        if finished:
            text = (
                f"The two outputs are identical ({n} tokens): the adapter did not change this greedy answer."
            )
        else:
            text = f"No difference yet ({n} tokens so far)."
        return f'<div class="lens-div"><div class="muted">{_e(text)}</div></div>'
    shared = decode(a[:index]) if index else ""
    rest_a, rest_b = decode(a[index:]), decode(b[index:])
    shared_html = (
        f"<pre>{_e(shared)}</pre>"
        if shared
        else '<div class="muted">(nothing: they differ from the first token)</div>'
    )
    return (
        '<div class="lens-div">'
        f'<div class="title">The outputs first differ at token {index} (counting from 0).</div>'
        f'<div class="muted">Shared text up to there:</div>{shared_html}'
        f'<div class="muted">{_e(PANE_LABELS[BASE])} continues:</div>'
        f'<pre class="base">{_e(rest_a) or "(ends here)"}</pre>'
        f'<div class="muted">{_e(PANE_LABELS[FINE_TUNED])} continues:</div>'
        f'<pre class="tuned">{_e(rest_b) or "(ends here)"}</pre>'
        "</div>"
    )


class StopSignal:
    """The Stop button's flag for one browser session, kept in a gr.State.

    gr.State deep-copies its initial value for every new session, so the copy gets its own event; each run
    takes a fresh event with `start()`, so a Stop meant for an old run can never stop the next one.
    """

    def __init__(self):
        self.event = threading.Event()

    def __deepcopy__(self, memo):
        return StopSignal()

    def start(self) -> threading.Event:
        self.event = threading.Event()
        return self.event

    def stop(self) -> None:
        self.event.set()


# ---------------------------------------------------------------------------------------------------
# Pricer: prompts, price estimates, next-token chart


def task_tail(template: str | None) -> str:
    """What the pricer template ends with after the description. Example: the lesson's -> "Price is $"."""
    if not template or "{description}" not in template:
        return ""
    return template.split("{description}")[-1].strip()


def is_task_prompt(prompt: str, template: str | None) -> bool:
    """True when the prompt ends the way the pricer template does, so the next token is a price."""
    tail = task_tail(template)
    return bool(tail) and isinstance(prompt, str) and prompt.rstrip().endswith(tail)


def example_prompts(profile: ModelProfile, n: int = 4) -> list[tuple[str, str]]:
    """(label, prompt) pairs for the examples: test-split catalog items in the task prompt, then free text."""
    from utils.catalog import example_descriptions
    from utils.pricing import build_prompt

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
    tokenizer,
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
    from utils.pricing import blend_topk_with_greedy, extract_price, topk_price_estimate

    out = {}
    for key, view in views.items():
        text = texts.get(key, "")
        topk = topk_price_estimate(view.logits, tokenizer, k=k)
        out[key] = {
            "label": (labels or PANE_LABELS).get(key, key),
            "text": text,
            "extracted_price": extract_price(text),
            "topk_estimate": topk.estimate,
            "topk_price": blend_topk_with_greedy(topk, text),
            "candidates": [{"token": t, "value": v, "probability": p} for t, v, p in topk.candidates],
        }
    return out


def _money(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"${value:,.2f}"


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


@functools.lru_cache(maxsize=1)
def _test_prices() -> dict[str, float]:
    from utils.catalog import load_split

    return {item.description: item.price for item in load_split("test", N_ITEMS_RANGE[1])}


def catalog_truth(prompt: str, template: str | None) -> float | None:
    """The catalog price of the item a task prompt describes (test split, as in the examples and the
    evaluation), or None when the prompt is not a catalog item in the template."""
    if not template or "{description}" not in template or not isinstance(prompt, str):
        return None
    head, tail = template.split("{description}", 1)
    text = prompt.strip()
    if not text.startswith(head.strip()) or not text.endswith(tail.strip()):
        return None
    description = text[len(head.strip()) : len(text) - len(tail.strip())].strip()
    return _test_prices().get(description)


def display_token(text: str) -> str:
    """A token as a chart label: spaces, newlines and tabs made visible. Example: " 1" -> "␣1" """
    if text == "":
        return "(empty)"
    return text.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t")


def next_token_frame(views: dict[str, NextTokenView], top: int = CHART_TOKENS, labels: dict | None = None):
    """Long-format DataFrame (token, token_id, pane, probability) of the top next tokens of every pane.

    The tokens are the union of each pane's top ones, ordered by their highest probability in any pane and
    cut to `top`; every pane gets a row for every token (its probability from its own full logits), so the
    bars can be grouped.
    """
    import pandas as pd
    import torch

    probs = {key: torch.softmax(view.logits.float(), dim=-1) for key, view in views.items()}
    names: dict[int, str] = {}
    for view in views.values():
        for token_id, text in zip(view.token_ids, view.tokens, strict=True):
            names.setdefault(token_id, text)
    best = sorted(names, key=lambda t: -max(float(p[t]) for p in probs.values()))[:top]
    rows = [
        {
            "token": display_token(names[t]),
            "token_id": t,
            "pane": (labels or PANE_LABELS).get(key, key),
            "probability": float(probs[key][t]),
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


# ---------------------------------------------------------------------------------------------------
# Input validation for the UI and the API (generation settings are checked by GenerationSettings.checked)


def _number(name: str, value, integer: bool):
    return parse_number(name, value, integer)


def check_n_items(n_items) -> int:
    """The number of catalog items to evaluate, 1..200. Example: check_n_items(20.0) == 20"""
    n = _number("n_items", n_items, integer=True)
    lo, hi = N_ITEMS_RANGE
    if not lo <= n <= hi:
        raise InputError(f"n_items must be between {lo} and {hi}; got {n}.")
    return n


def check_flag(name: str, value) -> bool:
    """A yes/no argument: a bool, or 0 / 1 (what some clients send). Anything else is refused."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InputError(f"{name} must be true or false, not {value!r}.")


def parse_lora_inputs(r, alpha, target_modules) -> LoraSettings:
    """LoRA settings from UI / API values, validated: r 1..1024, 0 < alpha <= 65536, named linear layers.

    `target_modules` is a comma-separated string ("q_proj, v_proj"), a list of names, or "all-linear".
    Whether the names exist in a model is checked by utils.sizing against that model's layers.
    Example: parse_lora_inputs("32", 64, "q_proj,v_proj") -> LoraSettings(r=32, alpha=64, target_modules=(...))
    """
    r = _number("r", r, integer=True)
    if not R_RANGE[0] <= r <= R_RANGE[1]:
        raise InputError(f"r must be between {R_RANGE[0]} and {R_RANGE[1]}; got {r}.")
    alpha = _number("alpha", alpha, integer=False)
    if not ALPHA_RANGE[0] < alpha <= ALPHA_RANGE[1]:
        raise InputError(f"alpha must be greater than 0 and at most {ALPHA_RANGE[1]:g}; got {alpha:g}.")
    if alpha.is_integer():
        alpha = int(alpha)
    if isinstance(target_modules, str):
        names = target_modules.split(",")
    elif isinstance(target_modules, (list, tuple)) and all(isinstance(t, str) for t in target_modules):
        names = list(target_modules)
    else:
        raise InputError("target_modules must be text: module names separated by commas, or all-linear.")
    names = [n.strip() for n in names if n.strip()]
    if not names:
        raise InputError("Name at least one target module (e.g. q_proj,v_proj), or use all-linear.")
    if len(names) > MAX_TARGETS:
        raise InputError(f"At most {MAX_TARGETS} target modules; got {len(names)}.")
    bad = [n for n in names if not _MODULE_NAME.match(n)]
    if bad:
        raise InputError(
            f"{bad[0][:40]!r} is not a module name: use letters, digits, '_', '.' or '-' (e.g. q_proj)."
        )
    return LoraSettings(r=r, alpha=alpha, target_modules=tuple(dict.fromkeys(names)))


def adapter_lora(adapter_dir: str | Path | None, fallback: LoraSettings) -> LoraSettings:
    """The settings the loaded adapter was trained with, from its adapter_config.json (fallback if unreadable)."""
    if adapter_dir is None:
        return fallback
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        targets = config["target_modules"]
        targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
        return LoraSettings(
            r=int(config["r"]),
            alpha=config.get("lora_alpha", fallback.alpha),
            dropout=float(config.get("lora_dropout", fallback.dropout)),
            target_modules=targets,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return fallback


# ---------------------------------------------------------------------------------------------------
# Size math


def size_summary_frame(reports: dict):
    """The headline numbers of several SizeReports side by side: one row per quantity, one column per model."""
    import pandas as pd

    from utils.sizing import format_bytes

    def b(n):
        return f"{n:,} bytes = {format_bytes(n)}"

    rows = [
        (
            "LoRA r, alpha, targets",
            lambda s: f"{s.adapter.r}, {s.adapter.alpha:g}, {', '.join(s.adapter.target_modules)}",
        ),
        ("Adapter parameters", lambda s: f"{s.adapter.params:,}"),
        ("Adapter in fp32", lambda s: b(s.adapter.bytes_fp32)),
        ("Adapter in bf16", lambda s: b(s.adapter.bytes_bf16)),
        ("Adapter share of the base", lambda s: f"{100 * s.share_of_base:.3f} %"),
        ("Base parameters", lambda s: format_count(s.base.params)),
        ("Base in fp32", lambda s: b(s.base.bytes_fp32)),
        ("Base in bf16", lambda s: b(s.base.bytes_bf16)),
        ("Base in NF4 (weights)", lambda s: b(s.base.nf4_weight_bytes)),
        ("NF4 base + fp32 adapter", lambda s: b(s.nf4_with_adapter_bytes)),
    ]
    data = {"quantity": [name for name, _ in rows]}
    for name, report in reports.items():
        data[name] = [fn(report) for _, fn in rows]
    return pd.DataFrame(data)


def size_chart(reports: dict):
    """Base vs adapter bytes per dtype (fp32, bf16, NF4), one panel per model, log scale, labelled bars.

    In the NF4 group the adapter bar is its fp32 size: QLoRA keeps the adapter in full precision.
    """
    from matplotlib.figure import Figure

    from utils.sizing import format_bytes

    figure = Figure(figsize=(5.2 * max(len(reports), 1), 4.2), layout="constrained")
    axes = figure.subplots(1, max(len(reports), 1), squeeze=False)[0]
    groups = ("fp32", "bf16", "NF4 base\n(adapter fp32)")
    for axis, (name, s) in zip(axes, reports.items(), strict=False):
        base = (s.base.bytes_fp32, s.base.bytes_bf16, s.base.nf4_weight_bytes)
        adapter = (s.adapter.bytes_fp32, s.adapter.bytes_bf16, s.adapter.bytes_fp32)
        xs = range(len(groups))
        for offset, label, values, colour in (
            (-0.2, "base", base, PANE_COLOURS[BASE]),
            (0.2, "adapter", adapter, PANE_COLOURS[FINE_TUNED]),
        ):
            bars = axis.bar([x + offset for x in xs], values, width=0.38, label=label, color=colour)
            axis.bar_label(bars, labels=[format_bytes(v) for v in values], fontsize=7, padding=2)
        axis.set_yscale("log")
        axis.set_xticks(list(xs), groups)
        axis.set_ylabel("bytes (log scale)")
        axis.set_title(name, fontsize=10)
        axis.margins(y=0.25)
        axis.legend(fontsize=8, loc="upper right")
        axis.grid(True, axis="y", alpha=0.25)
    return figure


def cross_checks_frame(checks):
    """utils.sizing.CrossChecks as a DataFrame in its own column order."""
    import pandas as pd

    return pd.DataFrame(checks.table(), columns=list(checks.headers))


def cross_checks_markdown(checks, lora: LoraSettings) -> str:
    """One line on whether the three counts agree, with the settings used, then the notes."""
    verdict = "agree" if checks.agree else "DISAGREE"
    out = [
        f"**The three counts {verdict}** (r = {lora.r}, alpha = {lora.alpha:g}, targets "
        f"{', '.join(lora.target_modules)}, read from the adapter's adapter_config.json)."
    ]
    out += [f"- {note}" for note in checks.notes]
    return "\n".join(out)


def cross_checks_json(checks) -> dict:
    return {
        "agree": checks.agree,
        "rows": [
            dict(
                zip(
                    ("source", "tensors", "params", "bytes", "note"),
                    (r.source, r.tensors, r.params, r.bytes, r.note),
                    strict=True,
                )
            )
            for r in checks.rows
        ],
        "notes": list(checks.notes),
    }


# ---------------------------------------------------------------------------------------------------
# Architecture and evaluation


def architecture_json(views) -> dict:
    """utils.architecture.ArchitectureViews as plain JSON: the two printouts and the marked diff."""
    return {
        "base": views.base_text,
        "peft": views.peft_text,
        "diff": views.diff_text,
        "added_lines": views.added_lines,
    }


def _metrics_json(m) -> dict:
    return {"count": m.count, "mae": m.mae, "rmsle": m.rmsle, "hit_rate": m.hit_rate, "unparsed": m.unparsed}


def eval_json(report, notice: str = "", with_strengths: bool = False) -> dict:
    """utils.evaluate.EvaluationReport as JSON, panes keyed "base" / "fine_tuned" like the other endpoints;
    with_strengths adds "by_strength": [{"strength", "pane", "metrics": {method: ...}}] by increasing s."""
    out = {
        "n_items": len(report.items),
        "seconds": report.seconds,
        "k": report.k,
        "notice": notice,
        "metrics": {
            EVAL_PANES.get(pane, pane): {method: _metrics_json(m) for method, m in by_method.items()}
            for pane, by_method in report.metrics.items()
        },
        "items": [
            {
                "description": item.description,
                "price": item.truth,
                **{
                    EVAL_PANES.get(pane, pane): {"text": r.text, "predictions": dict(r.predictions)}
                    for pane, r in item.panes.items()
                },
            }
            for item in report.items
        ],
    }
    if with_strengths:
        out["by_strength"] = [
            {
                "strength": s,
                "pane": EVAL_PANES.get(pane, pane),
                "metrics": {method: _metrics_json(m) for method, m in report.metrics[pane].items()},
            }
            for pane, s in sorted(report.strengths.items(), key=lambda x: x[1])
        ]
    return out


def eval_items_frame(report, method: str = "greedy"):
    """One row per evaluated item: description, true price, and each pane's prediction by `method` (as text)."""
    import pandas as pd

    rows = []
    for item in report.items:
        row = {"description": item.description, "price": _money(item.truth)}
        for pane, result in item.panes.items():
            row[pane] = _money(result.predictions.get(method))
        rows.append(row)
    return pd.DataFrame(rows)
