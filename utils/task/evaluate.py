"""Score base and fine-tuned on held-out catalog items: `python -m utils.task.evaluate [--n 200] [--plot PNG]`.

Each chunk runs as ONE batch through the seam (Backend.evaluate_chunk): the rows are the prompts once per
adapter strength (0 = base, 1 = fine-tune, and any others asked for), so every pane shares one forward pass
per token and one set of 4-bit weights. The top-K estimate uses the logits generate() returns for the first new token,
which are the logits at the last prompt position, so it costs no extra pass.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from utils.core.errors import InputError, LoraLensError
from utils.core.profiles import DEMO_ADAPTER_DIR, PRICER_PROMPT
from utils.core.seam import Backend
from utils.task.catalog import SYNTHETIC_NOTICE, CatalogItem, load_split
from utils.task.pricing import (
    PriceMetrics,
    TopKEstimate,
    blend_topk_with_greedy,
    build_prompt,
    extract_price,
    hit_colour,
    price_metrics,
    topk_from_candidates,
)

PANES = ("base", "fine-tuned")
PANE_STRENGTHS = {"base": 0.0, "fine-tuned": 1.0}
# greedy: parse the greedy text; top-k: the lesson's top-K estimate of the first token, placed at the greedy
# number's magnitude (blend_topk_with_greedy); top-k first token: the lesson's estimate as it is.
METHODS = ("greedy", "top-k", "top-k first token")
PRICE_SCAN = 64  # next-token candidates the top-K estimate walks (as topk_price_estimate's scan)
MAX_NEW_TOKENS = 6  # "999.99" is six digit-tokens; the price is read from the start of the text


@dataclass(frozen=True)
class PaneResult:
    """One item as one pane (base or fine-tuned) answered it."""

    text: str  # greedy continuation after the prompt
    topk: TopKEstimate  # the lesson's top-K estimate of the first new token
    predictions: dict[str, float | None]  # METHODS -> price read by that method


@dataclass(frozen=True)
class ItemResult:
    """One catalog item and both panes' answers."""

    description: str  # the product description
    truth: float  # the catalog price
    panes: dict[str, PaneResult]  # PANES -> that pane's answer


@dataclass(frozen=True)
class EvaluationReport:
    """Per-item answers and, per pane and method, the error metrics."""

    items: list[ItemResult]  # in the order evaluated
    metrics: dict[str, dict[str, PriceMetrics]]  # pane -> method -> metrics
    seconds: float  # wall time of the evaluation
    k: int  # K of the top-K estimate
    strengths: dict[str, float] = field(default_factory=lambda: dict(PANE_STRENGTHS))  # pane -> strength s

    def truths(self) -> list[float]:
        return [item.truth for item in self.items]

    def predictions(self, pane: str, method: str = "greedy") -> list[float | None]:
        return [item.panes[pane].predictions[method] for item in self.items]

    def markdown_table(self) -> str:
        """The metrics as a markdown table (one row per pane and method)."""
        return metrics_table(self.metrics, len(self.items), self.k)

    def strength_curve(self, method: str = "greedy") -> list[tuple[float, PriceMetrics]]:
        """(strength, metrics) for every pane of the primary adapter, by increasing strength: how the error
        moves with s."""
        curve = [
            (s, self.metrics[p][method]) for p, s in self.strengths.items() if isinstance(s, (int, float))
        ]
        return sorted(curve, key=lambda x: x[0])

    def strength_figure(self, method: str = "greedy"):
        """MAE and hit rate against the adapter strength (s = 1 is the adapter as trained)."""
        return strength_figure(self.strength_curve(method), len(self.items), method)

    def figure(self, method: str = "greedy"):
        """Truth against prediction, one subplot per pane, points coloured by hit_colour."""
        return scatter_figure(self.truths(), {pane: self.predictions(pane, method) for pane in PANES}, method)


def _fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def metrics_table(metrics: dict[str, dict[str, PriceMetrics]], n: int, k: int) -> str:
    """A markdown table of the metrics, with a line on what the methods mean.

    Example: one row reads "| fine-tuned | greedy | 200 | $21.40 | 0.231 | 78.5% | 0 |"
    """
    lines = [
        "| Pane | Method | N | MAE | RMSLE | Hit rate | Unparsed |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for pane, by_method in metrics.items():
        for method, m in by_method.items():
            lines.append(
                f"| {pane} | {method} | {m.count} | {_fmt(m.mae, '${:,.2f}')} | {_fmt(m.rmsle, '{:.3f}')} "
                f"| {m.hit_rate:.1%} | {m.unparsed} |"
            )
    lines.append("")
    lines.append(
        f"N = {n} test items of the synthetic catalog. Hit: off by less than $40 or 20%. greedy: the number "
        f"at the start of the greedy text; top-k first token: the probability-weighted mean of the {k} most "
        "likely numeric first tokens (for SmolLM2, which writes one digit per token, that is the leading "
        "digit); top-k: that expectation put in place of the greedy number's leading token."
    )
    return "\n".join(lines)


def _plain(text: str) -> str:
    """Escape dollar signs, which matplotlib would read as mathtext delimiters."""
    return text.replace("$", r"\$")


def scatter_figure(
    truths: Sequence[float], predictions: dict[str, Sequence[float | None]], method: str = "greedy"
):
    """A matplotlib Figure (Agg, no pyplot state) with one truth-vs-prediction subplot per pane, log axes."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(11, 5.2), layout="constrained")
    axes = figure.subplots(1, len(predictions), sharex=True, sharey=True, squeeze=False)[0]
    low, high = 1, 1000
    for axis, (pane, preds) in zip(axes, predictions.items(), strict=True):
        metrics = price_metrics(truths, preds)
        parsed = [(t, p) for t, p in zip(truths, preds, strict=True) if p is not None and math.isfinite(p)]
        colours = [hit_colour(t, p) for t, p in parsed]
        axis.scatter(
            [t for t, _ in parsed], [min(max(p, low), high) for _, p in parsed], c=colours, s=14, alpha=0.75
        )
        axis.plot([low, high], [low, high], color="0.4", linewidth=1, linestyle="--", label="y = x")
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlim(low, high)
        axis.set_ylim(low, high)
        axis.set_xlabel(_plain("true price ($)"))
        axis.set_title(
            _plain(
                f"{pane}: MAE {_fmt(metrics.mae, '${:,.0f}')}, hit rate {metrics.hit_rate:.0%}"
                + (f", {metrics.unparsed} unparsed" if metrics.unparsed else "")
            )
        )
        axis.grid(True, which="both", alpha=0.2)
    axes[0].set_ylabel(_plain(f"predicted price ($, {method})"))
    axes[0].legend(loc="upper left")
    figure.suptitle(
        _plain(
            f"Synthetic catalog, {len(truths)} test items: green hit (<$40 or <20%), orange <$80 or <40%, red miss"
        )
    )
    return figure


def strength_panes(strengths: Sequence[float] = (), adapters: Sequence[str] = ()) -> dict:
    """The panes of an evaluation: base and fine-tuned, then every other strength of the primary adapter,
    then every other adapter (by name, at s = 1), in order. A pane's value is its strength, or a seam.Use.

    Example: strength_panes([0, 0.5, 1, 2]) -> {"base": 0.0, "fine-tuned": 1.0, "s = 0.5": 0.5, "s = 2": 2.0}
    """
    from utils.core.seam import Use

    panes: dict = dict(PANE_STRENGTHS)
    for s in strengths:
        if float(s) not in panes.values():
            panes[f"s = {float(s):g}"] = float(s)
    for name in adapters:
        panes.setdefault(name, Use(name, 1.0))
    return panes


def strength_figure(curve: Sequence[tuple[float, PriceMetrics]], n: int, method: str = "greedy"):
    """A matplotlib Figure: MAE (left axis) and hit rate (right axis) against the strength s."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.2), layout="constrained")
    axis = figure.subplots()
    xs = [s for s, _ in curve]
    maes = [m.mae if m.mae is not None else float("nan") for _, m in curve]
    axis.plot(xs, maes, marker="o", color="#4f46e5", label="MAE")
    axis.set_xlabel("adapter strength s  (0 = base, 1 = as trained)")
    axis.set_ylabel(_plain("MAE ($, lower is better)"), color="#4f46e5")
    axis.axvline(1.0, color="0.5", linestyle=":", linewidth=1)
    hits = axis.twinx()
    hits.plot(xs, [100 * m.hit_rate for _, m in curve], marker="s", color="#d97706", label="hit rate")
    hits.set_ylabel("hit rate (%)", color="#d97706")
    hits.set_ylim(0, 100)
    axis.grid(True, alpha=0.2)
    figure.suptitle(_plain(f"{n} test items of the synthetic catalog, {method} prices, by adapter strength"))
    return figure


def mixed_batch_step(
    backend: Backend,
    prompts: Sequence[str],
    k: int = 3,
    max_new_tokens: int = MAX_NEW_TOKENS,
    panes: dict[str, float] | None = None,
) -> list[dict[str, PaneResult]]:
    """Every pane for a few prompts in one batch (Backend.evaluate_chunk): `panes` maps pane names to
    strengths (default base and fine-tuned); the top-K estimate reads each row's first next-token candidates."""
    panes = panes or dict(PANE_STRENGTHS)
    answers = backend.evaluate_chunk(list(prompts), list(panes.values()), max_new_tokens, PRICE_SCAN)
    results: list[dict[str, PaneResult]] = []
    for i in range(len(prompts)):
        by_pane = {}
        for p, pane in enumerate(panes):
            answer = answers[p][i]
            topk = topk_from_candidates(answer.first.tokens, answer.first.probabilities, k=k)
            predictions = {
                "greedy": extract_price(answer.text),
                "top-k": blend_topk_with_greedy(topk, answer.text),
                "top-k first token": topk.estimate,
            }
            by_pane[pane] = PaneResult(answer.text, topk, predictions)
        results.append(by_pane)
    return results


def evaluate_items(
    backend: Backend,
    items: Sequence[CatalogItem],
    k: int = 3,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    template: str = PRICER_PROMPT,
    strengths: Sequence[float] = (),
) -> EvaluationReport:
    """Run `items` through base, fine-tuned and any other adapter `strengths` (one batch of panes x
    batch_size rows per chunk) and score them.

    `backend` holds the base and the adapter; `progress(done, total)` is called after each chunk.
    """
    for step in evaluation_steps(backend, items, k, batch_size, template, strengths):
        if isinstance(step, EvaluationReport):
            return step
        if progress is not None:
            progress(*step)
    raise AssertionError("evaluation_steps ends with its report")


def evaluation_steps(
    backend: Backend,
    items: Sequence[CatalogItem],
    k: int = 3,
    batch_size: int = 16,
    template: str = PRICER_PROMPT,
    strengths: Sequence[float] = (),
) -> Iterator[tuple[int, int] | EvaluationReport]:
    """evaluate_items as a generator: (done, total) after each chunk, then the EvaluationReport.

    A generator rather than a callback, so progress can cross a process boundary (a ZeroGPU worker) as values.
    """
    if not items:
        raise InputError("There are no items to evaluate; pass at least one.")
    if not backend.has_adapter:
        raise InputError("The evaluation compares base and fine-tuned: load the model with its adapter.")
    started = time.perf_counter()
    panes = strength_panes(strengths)
    results: list[ItemResult] = []
    for batch in score_items(backend, items, k, batch_size, template, panes):
        results += batch
        yield len(results), len(items)
    yield build_report(results, panes, k, time.perf_counter() - started)


def score_items(
    backend: Backend,
    items: Sequence[CatalogItem],
    k: int = 3,
    batch_size: int = 16,
    template: str = PRICER_PROMPT,
    panes: dict[str, float] | None = None,
) -> Iterator[list[ItemResult]]:
    """Each batch of `items` through every pane (one generate() per batch): that batch's results."""
    if batch_size < 1:
        raise InputError(f"The batch size must be at least 1, not {batch_size}.")
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        prompts = [build_prompt(item.description, template) for item in chunk]
        answers = mixed_batch_step(backend, prompts, k, panes=panes)
        yield [
            ItemResult(item.description, item.price, answer)
            for item, answer in zip(chunk, answers, strict=True)
        ]


def build_report(
    results: list[ItemResult], panes: dict[str, float], k: int, seconds: float
) -> EvaluationReport:
    """The metrics of every pane and method over the scored items."""
    truths = [r.truth for r in results]
    metrics = {
        pane: {
            method: price_metrics(truths, [r.panes[pane].predictions[method] for r in results])
            for method in METHODS
        }
        for pane in panes
    }
    return EvaluationReport(results, metrics, seconds, k, panes)


def _load(adapter: Path):
    """The app's model pair (NF4 base + adapter) through the project's loader."""
    from utils.core.profiles import read_settings
    from utils.runtime.loading import load_model_pair

    settings = replace(read_settings(), profile="smollm2-pricer", adapter=str(adapter))
    pair = load_model_pair(settings)
    if not pair.has_adapter:
        raise InputError(f"The adapter in {adapter} did not load: " + "; ".join(pair.report.notices))
    return pair


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.task.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=200, help="test items (default 200)")
    parser.add_argument("--k", type=int, default=3, help="K of the top-K estimate")
    parser.add_argument("--batch-size", type=int, default=16, help="items per mixed batch (rows = 2x)")
    parser.add_argument("--adapter", type=Path, default=DEMO_ADAPTER_DIR)
    parser.add_argument("--plot", type=Path, default=None, help="save the scatter plot here (PNG)")
    parser.add_argument("--plot-method", choices=METHODS, default="greedy")
    parser.add_argument("--table", type=Path, default=None, help="save the markdown table here")
    parser.add_argument(
        "--check-mixed",
        type=int,
        default=0,
        metavar="N",
        help="also check on N items that the mixed batch matches separate runs",
    )
    args = parser.parse_args(argv)
    try:
        import torch

        torch.set_num_threads(2)
        from utils.runtime.engine import Engine
        from utils.runtime.generation import separate_greedy_texts

        pair = _load(args.adapter)
        print(pair.report.as_text(), flush=True)
        engine = Engine(pair)
        items = load_split("test", args.n)
        if args.check_mixed:
            prompts = [build_prompt(item.description) for item in items[: args.check_mixed]]
            mixed = mixed_batch_step(engine, prompts)
            separate = separate_greedy_texts(pair.model, pair.tokenizer, prompts)
            same = all(m[p].text == separate[p][i] for i, m in enumerate(mixed) for p in PANES)
            print(
                f"Mixed batch vs separate runs on {len(prompts)} items: {'identical' if same else 'DIFFERENT'}"
            )
        report = evaluate_items(
            engine,
            items,
            k=args.k,
            batch_size=args.batch_size,
            progress=lambda done, total: print(f"{done}/{total} items", flush=True),
        )
    except LoraLensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = report.markdown_table()
    print(
        f"\n{SYNTHETIC_NOTICE}\nEvaluated in {report.seconds:.0f} s on {pair.report.precision.upper()} "
        f"({pair.report.compute_dtype} compute).\n\n{table}"
    )
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        header = (
            f"Base: SmolLM2-135M-Instruct in {pair.report.precision.upper()} ({pair.report.compute_dtype} "
            f"compute); adapter: {args.adapter.name}. Command: `python -m utils.task.evaluate --n {args.n}`.\n\n"
        )
        args.table.write_text(header + table + "\n")
    if args.plot:
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        report.figure(args.plot_method).savefig(args.plot, dpi=110)
        print(f"Saved the plot to {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
