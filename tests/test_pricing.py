"""Prompt, price extraction, the top-K estimate and the metrics, on hand-made inputs."""

from __future__ import annotations

import math

import pytest
import torch

from utils.core.errors import InputError
from utils.task.pricing import (
    PriceMetrics,
    TopKEstimate,
    blend_topk_with_greedy,
    build_prompt,
    extract_price,
    hit_colour,
    price_metrics,
    topk_price_estimate,
)


class StubTokenizer:
    """decode([id]) -> a fixed string per id, like a real tokenizer's single-token decode."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def decode(self, ids):
        return "".join(self.vocab[int(i)] for i in ids)


def _logits_for(probabilities: list[float]) -> torch.Tensor:
    return torch.log(torch.tensor(probabilities))


def test_build_prompt_fills_the_lesson_template():
    assert (
        build_prompt("  Red mug ")
        == "How much does this cost to the nearest dollar?\n\nRed mug\n\nPrice is $"
    )
    assert build_prompt("x", template="Item: {description} ->") == "Item: x ->"


@pytest.mark.parametrize("bad", ["", "   ", None])
def test_build_prompt_rejects_an_empty_description(bad):
    with pytest.raises(InputError, match="description"):
        build_prompt(bad)


def test_build_prompt_needs_the_placeholder():
    with pytest.raises(InputError, match="{description}"):
        build_prompt("x", template="no placeholder")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("149.99 and more", 149.99),
        ("1,299", 1299.0),
        ("1,299.99", 1299.99),
        ("149", 149.0),
        (" 42.", 42.0),  # a trailing dot is the end of the sentence
        ("$ 7", 7.0),
        ("12,5", 12.0),  # a comma not followed by three digits ends the number
        ("0.5", 0.5),
        ("abc", None),
        ("", None),
        ("about 20", None),  # the number must come first
        ("How much?\n\nPrice is $349<|im_end|>", 349.0),  # a full text: read after the marker
    ],
)
def test_extract_price(text, expected):
    assert extract_price(text) == expected


def test_topk_skips_non_numbers_and_renormalises():
    """Probabilities "1" 0.5, "x" 0.3, " 2" 0.2, k=2: the numbers are 1 and 2, weights 0.5 and 0.2,
    so the estimate is (1 x 0.5 + 2 x 0.2) / 0.7 = 0.9 / 0.7 = 1.2857."""
    tokenizer = StubTokenizer(["1", "x", " 2"])
    result = topk_price_estimate(_logits_for([0.5, 0.3, 0.2]), tokenizer, k=2)
    assert result.estimate == pytest.approx(0.9 / 0.7)
    assert [(text, value) for text, value, _ in result.candidates] == [("1", 1.0), (" 2", 2.0)]
    assert [p for _, _, p in result.candidates] == pytest.approx([0.5, 0.2])


def test_topk_keeps_only_the_first_k_numbers_in_probability_order():
    """Llama-3-like tokens "149" 0.4, "150" 0.3, "99" 0.2, "1" 0.1, k=2 -> (149 x 0.4 + 150 x 0.3) / 0.7 = 149.43."""
    tokenizer = StubTokenizer(["99", "149", "1", "150"])
    result = topk_price_estimate(_logits_for([0.2, 0.4, 0.1, 0.3]), tokenizer, k=2)
    assert result.estimate == pytest.approx((149 * 0.4 + 150 * 0.3) / 0.7)
    assert [text for text, _, _ in result.candidates] == ["149", "150"]


def test_topk_without_numbers_has_no_estimate():
    result = topk_price_estimate(_logits_for([0.6, 0.4]), StubTokenizer(["a", "b"]), k=3)
    assert result == TopKEstimate(None, [])


def test_topk_rejects_k_below_one():
    with pytest.raises(InputError):
        topk_price_estimate(torch.zeros(3), StubTokenizer(["1", "2", "3"]), k=0)


def test_blend_puts_the_leading_digit_estimate_at_the_greedy_magnitude():
    """Greedy "149", leading digit expectation 1.4 -> 149 + (1.4 - 1) x 100 = 189."""
    topk = TopKEstimate(1.4, [("1", 1.0, 0.6), ("2", 2.0, 0.4)])
    assert blend_topk_with_greedy(topk, "149") == pytest.approx(189.0)
    # A whole-number token (Llama 3): the estimate is the price itself.
    assert blend_topk_with_greedy(TopKEstimate(149.4, [("149", 149.0, 0.6)]), "149") == pytest.approx(149.4)
    # No estimate: the greedy price; nothing parses: None.
    assert blend_topk_with_greedy(TopKEstimate(None, []), "12") == 12.0
    assert blend_topk_with_greedy(TopKEstimate(None, []), "n/a") is None


@pytest.mark.parametrize(
    ("truth", "prediction", "colour"),
    [
        (100, 139, "green"),  # $39 < $40
        (300, 350, "green"),  # $50 but 16.7% < 20%
        (100, 150, "orange"),  # $50 and 50%: < $80
        (500, 690, "orange"),  # $190 but 38% < 40%
        (100, 190, "red"),  # $90 and 90%
        (10, None, "red"),  # no prediction
        (10, math.nan, "red"),
    ],
)
def test_hit_colour(truth, prediction, colour):
    assert hit_colour(truth, prediction) == colour


def test_price_metrics_by_hand():
    """truths [100, 200], predictions [110, 150]: errors $10 and $50 -> MAE 30; the first is a hit,
    the second ($50, 25%) is not -> hit rate 0.5. RMSLE = sqrt(((ln 111 - ln 101)^2 + (ln 151 - ln 201)^2) / 2)."""
    expected_rmsle = math.sqrt(((math.log(111 / 101)) ** 2 + (math.log(151 / 201)) ** 2) / 2)
    assert price_metrics([100, 200], [110, 150]) == PriceMetrics(
        count=2, mae=30.0, rmsle=pytest.approx(expected_rmsle), hit_rate=0.5, unparsed=0
    )


def test_price_metrics_counts_unparsed_as_misses_outside_mae():
    """truths [100, 200, 50], predictions [100, None, 60]: MAE over the two parsed = (0 + 10) / 2 = 5;
    hit rate 2/3 (None is a miss); one unparsed."""
    m = price_metrics([100, 200, 50], [100, None, 60])
    assert (m.count, m.mae, m.unparsed) == (3, 5.0, 1)
    assert m.hit_rate == pytest.approx(2 / 3)


def test_price_metrics_with_nothing_parsed():
    m = price_metrics([10, 20], [None, None])
    assert (m.mae, m.rmsle, m.hit_rate, m.unparsed) == (None, None, 0.0, 2)


def test_price_metrics_needs_matching_lengths():
    with pytest.raises(InputError, match="2 true prices but 1"):
        price_metrics([1, 2], [1])
