"""The synthetic catalog: deterministic for a seed, disjoint splits, prices that follow the words."""

from __future__ import annotations

import pytest

from utils.core.errors import InputError
from utils.task.catalog import (
    CATEGORIES,
    MAX_PRICE,
    MIN_PRICE,
    SYNTHETIC_NOTICE,
    example_descriptions,
    load_split,
    rule_price,
    split_of,
)


def test_the_same_seed_gives_the_same_items():
    assert load_split("train", 50, seed=7) == load_split("train", 50, seed=7)
    assert load_split("train", 50, seed=7) != load_split("train", 50, seed=8)


def test_a_longer_split_extends_a_shorter_one():
    assert load_split("test", 40)[:10] == load_split("test", 10)


def test_splits_never_share_a_description():
    train = {item.description for item in load_split("train", 3000)}
    validation = {item.description for item in load_split("validation", 300)}
    test = {item.description for item in load_split("test", 300)}
    assert len(train) == 3000 and len(validation) == 300 and len(test) == 300
    assert not train & validation and not train & test and not validation & test


def test_items_sit_in_the_split_their_hash_names():
    assert all(split_of(item.description) == "test" for item in load_split("test", 50))


def test_prices_span_the_range_and_stay_inside_it():
    prices = [item.price for item in load_split("train", 2000)]
    assert min(prices) >= MIN_PRICE and max(prices) <= MAX_PRICE
    assert min(prices) < 5 and max(prices) > 500


def test_descriptions_name_every_price_driver():
    for item in load_split("train", 200):
        text = item.description.lower()
        assert item.category in text and item.tier in text and item.size in text and item.condition in text


def test_rule_price_by_hand():
    """Coffee mug (base $11), premium (x1.7), large (x1.3), new (x1), two features (x1.08): 26.2548."""
    mug = next(c for c in CATEGORIES if c.name == "coffee mug")
    assert rule_price(mug, "premium", "large", "new", 2) == pytest.approx(11 * 1.7 * 1.3 * 1.08)


def test_example_descriptions_come_from_the_test_split():
    examples = example_descriptions(4)
    assert examples == [item.description for item in load_split("test", 4)]
    assert all(split_of(text) == "test" for text in examples)


def test_the_notice_says_synthetic():
    assert "synthetic" in SYNTHETIC_NOTICE.lower()


@pytest.mark.parametrize(("split", "n"), [("holdout", 1), ("train", -1)])
def test_bad_arguments_raise_input_errors(split, n):
    with pytest.raises(InputError):
        load_split(split, n)
