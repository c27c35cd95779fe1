"""The pricer task: the prompt, reading a price out of model text, the top-K estimate, and error metrics.

Two ways to read a price, as in the lesson: parse the greedy continuation, or average the K most likely
next tokens that are numbers, weighted by probability. The top-K estimate looks at ONE next token, so it
is a full price only where the tokenizer writes a price as one token (Llama 3: up to 3 digits per token);
with a digit-per-token tokenizer (SmolLM2) it estimates the leading digit, and
`blend_topk_with_greedy` puts it back at the magnitude of the greedy number.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from utils.core.errors import InputError
from utils.core.profiles import PRICER_PROMPT

PRICE_MARKER = "Price is $"
# A number at the very start: optional spaces and "$", digits with optional thousands commas, decimals.
_LEADING_NUMBER = re.compile(r"\s*\$?\s*(\d{1,3}(?:,\d{3})+|\d+)(\.\d+)?")
_NUMBER_TOKEN = re.compile(r"\d+(?:\.\d*)?|\.\d+")
HIT_DOLLARS = 40.0  # a prediction is a hit when it is off by less than this many dollars ...
HIT_FRACTION = 0.20  # ... or by less than this fraction of the true price
NEAR_DOLLARS = 80.0  # orange (near miss) thresholds: twice the hit thresholds
NEAR_FRACTION = 0.40


@dataclass(frozen=True)
class TopKEstimate:
    """The probability-weighted next-token number, and the candidates it was made from."""

    estimate: float | None  # sum(value * p) / sum(p) over the candidates; None when no candidate is a number
    candidates: list[
        tuple[str, float, float]
    ]  # (token text, its value, model probability), most likely first


@dataclass(frozen=True)
class PriceMetrics:
    """Errors of a list of predictions against the true prices."""

    count: int  # number of items, parsed or not
    mae: float | None  # mean absolute error in $, over parsed predictions only (None when none parsed)
    rmsle: float | None  # root mean squared log error, sqrt(mean((ln(1+p) - ln(1+t))^2)), parsed only
    hit_rate: float  # fraction of ALL items that are hits; an unparsed prediction counts as a miss
    unparsed: int  # predictions that were None (no number in the output)


def build_prompt(description: str, template: str = PRICER_PROMPT) -> str:
    """The task prompt for one product description.

    Example: build_prompt("Red mug") == "How much does this cost to the nearest dollar?\\n\\nRed mug\\n\\nPrice is $"
    """
    if not isinstance(description, str) or not description.strip():
        raise InputError("Enter a product description to price.")
    if "{description}" not in template:
        raise InputError("The task prompt template must contain {description}.")
    return template.replace("{description}", description.strip())


def extract_price(text: str) -> float | None:
    """The number at the start of a model's continuation after "Price is $"; None when there is none.

    Where the text still holds the prompt, only what follows the last "Price is $" is read.
    Example: extract_price("1,299.99 and up") == 1299.99; extract_price("149") == 149.0;
    extract_price("abc") is None
    """
    if not text:
        return None
    if PRICE_MARKER in text:
        text = text.rsplit(PRICE_MARKER, 1)[1]
    match = _LEADING_NUMBER.match(text)
    if match is None:
        return None
    whole, fraction = match.group(1), match.group(2) or ""
    return float(whole.replace(",", "") + fraction)


def _token_number(text: str) -> float | None:
    stripped = text.strip()
    return float(stripped) if _NUMBER_TOKEN.fullmatch(stripped) else None


def topk_price_estimate(logits_1d, tokenizer, k: int = 3, scan: int = 64) -> TopKEstimate:
    """The lesson's top-K estimate from the logits of the next token after the prompt.

    Softmax over the vocabulary; walk the `scan` most likely tokens in probability order and keep the first
    `k` whose decoded text, stripped, is a number; the estimate is their probability-weighted mean, the
    weights renormalised over those k. With a digit-per-token tokenizer this is the expected LEADING digit
    (e.g. "1" 0.6, "2" 0.4 -> 1.4 for a true price of $149), not a price.
    Example: probabilities {"1": 0.5, "x": 0.3, "2": 0.2}, k=2 -> (1*0.5 + 2*0.2) / 0.7 = 1.2857...
    """
    import torch

    if k < 1:
        raise InputError(f"k must be at least 1, not {k}.")
    logits = torch.as_tensor(logits_1d).detach().float().reshape(-1)
    probs = torch.softmax(logits, dim=-1)
    top_probs, top_ids = probs.topk(min(max(scan, k), probs.numel()))
    texts = [tokenizer.decode([token_id]) for token_id in top_ids.tolist()]
    return topk_from_candidates(texts, top_probs.tolist(), k)


def topk_from_candidates(tokens: Sequence[str], probabilities: Sequence[float], k: int = 3) -> TopKEstimate:
    """topk_price_estimate from the next-token candidates already ranked (a NextTokenView's tokens and their
    probabilities over the whole vocabulary, most likely first): what crosses the seam instead of logits.

    Example: topk_from_candidates(["1", "x", "2"], [0.5, 0.3, 0.2], k=2).estimate == 1.2857...
    """
    if k < 1:
        raise InputError(f"k must be at least 1, not {k}.")
    candidates: list[tuple[str, float, float]] = []
    for text, prob in zip(tokens, probabilities, strict=True):
        value = _token_number(text)
        if value is not None:
            candidates.append((text, value, prob))
            if len(candidates) == k:
                break
    total = sum(p for _, _, p in candidates)
    if not candidates or total <= 0:
        return TopKEstimate(None, candidates)
    return TopKEstimate(sum(v * p for _, v, p in candidates) / total, candidates)


def blend_topk_with_greedy(topk: TopKEstimate, greedy_text: str) -> float | None:
    """The greedy price with its leading token's value replaced by the top-K expectation.

    For tokenizers that write a whole price as one token this is the top-K estimate itself; for digit-per-
    token ones it scales the expected leading digit to the greedy number's magnitude and keeps the greedy
    tail. Falls back to the greedy price where there is no estimate, and to None where neither parses.
    Example: greedy "149", top-K over {"1": 0.6, "2": 0.4} = 1.4 -> 149 + (1.4 - 1) * 100 = 189.0
    """
    greedy = extract_price(greedy_text)
    if topk.estimate is None or not topk.candidates:
        return greedy
    if greedy is None:
        return topk.estimate
    digits = str(int(greedy))
    lead = len(topk.candidates[0][0].strip().split(".")[0])
    if lead == 0 or len(digits) <= lead:
        return topk.estimate
    scale = 10 ** (len(digits) - lead)
    return greedy + (topk.estimate - int(digits[:lead])) * scale


def is_hit(truth: float, prediction: float | None) -> bool:
    """Off by less than $40 or less than 20% of the truth.

    Example: is_hit(100, 130) is True ($30); is_hit(300, 350) is True (16.7%); is_hit(100, 150) is False
    """
    return hit_colour(truth, prediction) == "green"


def hit_colour(truth: float, prediction: float | None) -> str:
    """green: error < $40 or < 20%; orange: < $80 or < 40%; red otherwise (and for no prediction).

    Example: hit_colour(100, 150) == "orange" ($50, 50%); hit_colour(100, 190) == "red" ($90, 90%)
    """
    if prediction is None or not math.isfinite(prediction):
        return "red"
    error = abs(prediction - truth)
    relative = error / truth if truth > 0 else math.inf
    if error < HIT_DOLLARS or relative < HIT_FRACTION:
        return "green"
    if error < NEAR_DOLLARS or relative < NEAR_FRACTION:
        return "orange"
    return "red"


def price_metrics(truths: Sequence[float], predictions: Sequence[float | None]) -> PriceMetrics:
    """MAE and RMSLE over the parsed predictions, hit rate over all items, and the unparsed count.

    Negative predictions are clipped to 0 inside the log. Example: truths [100, 200], predictions
    [110, 150] -> MAE (10 + 50) / 2 = 30, hit rate 1/2 (the second is off by $50 and 25%).
    """
    if len(truths) != len(predictions):
        raise InputError(f"{len(truths)} true prices but {len(predictions)} predictions.")
    pairs = [(t, p) for t, p in zip(truths, predictions, strict=True) if p is not None and math.isfinite(p)]
    hits = sum(is_hit(t, p) for t, p in zip(truths, predictions, strict=True))
    mae = rmsle = None
    if pairs:
        mae = sum(abs(p - t) for t, p in pairs) / len(pairs)
        squared = [(math.log1p(max(p, 0.0)) - math.log1p(max(t, 0.0))) ** 2 for t, p in pairs]
        rmsle = math.sqrt(sum(squared) / len(pairs))
    return PriceMetrics(
        count=len(truths),
        mae=mae,
        rmsle=rmsle,
        hit_rate=hits / len(truths) if truths else 0.0,
        unparsed=len(truths) - len(pairs),
    )


def task_tail(template: str | None) -> str:
    """What the pricer template ends with after the description. Example: the lesson's -> "Price is $"."""
    if not template or "{description}" not in template:
        return ""
    return template.split("{description}")[-1].strip()


def is_task_prompt(prompt: str, template: str | None) -> bool:
    """True when the prompt ends the way the pricer template does, so the next token is a price."""
    tail = task_tail(template)
    return bool(tail) and isinstance(prompt, str) and prompt.rstrip().endswith(tail)


@functools.lru_cache(maxsize=1)
def _test_prices() -> dict[str, float]:
    from utils.core.inputs import N_ITEMS_RANGE
    from utils.task.catalog import load_split

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
