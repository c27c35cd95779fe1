"""Evaluation: mixed adapter batches route rows like separate runs; the report, table and plot."""

from __future__ import annotations

import pytest
import torch

from utils.core.errors import InputError
from utils.core.profiles import DEMO_ADAPTER_DIR
from utils.runtime.generation import separate_greedy_texts
from utils.task.catalog import load_split
from utils.task.evaluate import (
    METHODS,
    PANES,
    evaluate_items,
    metrics_table,
    mixed_batch_step,
    scatter_figure,
)
from utils.task.pricing import PriceMetrics, build_prompt


def _backend(model, tokenizer):
    """The in-process Backend over a model built here (a PeftModel, or its base model for the error case)."""
    from pathlib import Path

    from utils.runtime.engine import Engine
    from utils.runtime.loading import LoadedPair

    adapter_dir = Path(".") if hasattr(model, "disable_adapter") else None  # a PeftModel
    return Engine(LoadedPair(model, tokenizer, profile=None, report=None, adapter_dir=adapter_dir))


@pytest.fixture(scope="module")
def tiny_pair(cache_dir):
    """A random 2-layer Llama (hidden 32) with a random, non-zero LoRA named "default", in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from utils.runtime.embedded import ensure_cache

    tokenizer = AutoTokenizer.from_pretrained(ensure_cache(cache_dir))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    lora = LoraConfig(
        r=8, lora_alpha=64, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], init_lora_weights=False
    )
    model = get_peft_model(LlamaForCausalLM(config), lora)
    model.eval()
    return model, tokenizer


def _prompts(n: int) -> list[str]:
    return [build_prompt(item.description) for item in load_split("test", n)]


def test_mixed_batch_matches_separate_runs(tiny_pair):
    """Rows routed to "__base__" and "default" in one batch give the same greedy text as base under
    disable_adapter() and the adapter run on their own, and the adapter does change the text."""
    model, tokenizer = tiny_pair
    prompts = _prompts(5)
    mixed = mixed_batch_step(_backend(model, tokenizer), prompts)
    separate = separate_greedy_texts(model, tokenizer, prompts)
    for pane in PANES:
        assert [row[pane].text for row in mixed] == separate[pane]
    assert separate["base"] != separate["fine-tuned"]


def test_first_token_logits_are_the_last_prompt_position(tiny_pair):
    """The top-K candidates from generate()'s first-step logits equal those of a plain forward pass."""
    from utils.task.pricing import topk_price_estimate

    model, tokenizer = tiny_pair
    prompts = _prompts(3)
    mixed = mixed_batch_step(_backend(model, tokenizer), prompts, k=3)
    enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    ids, mask = torch.cat([enc["input_ids"]] * 2), torch.cat([enc["attention_mask"]] * 2)
    with torch.no_grad():
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=(mask.cumsum(1) - 1).clamp(min=0),
            adapter_names=["__base__"] * 3 + ["default"] * 3,
        ).logits[:, -1]
    for i in range(3):
        for pane, row in zip(PANES, (i, 3 + i), strict=True):
            expected = topk_price_estimate(logits[row], tokenizer, k=3)
            got = mixed[i][pane].topk
            assert [c[0] for c in got.candidates] == [c[0] for c in expected.candidates]
            assert [c[2] for c in got.candidates] == pytest.approx(
                [c[2] for c in expected.candidates], abs=1e-5
            )


def test_evaluate_items_reports_every_pane_and_method(tiny_pair, tmp_path):
    model, tokenizer = tiny_pair
    items = load_split("test", 5)
    calls: list[tuple[int, int]] = []
    report = evaluate_items(
        _backend(model, tokenizer), items, batch_size=2, progress=lambda d, t: calls.append((d, t))
    )

    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert report.truths() == [item.price for item in items]
    assert set(report.metrics) == set(PANES)
    assert all(
        set(by_method) == set(METHODS) and m.count == 5
        for by_method in report.metrics.values()
        for m in by_method.values()
    )
    table = report.markdown_table()
    rows = [line for line in table.splitlines() if line.startswith(("| base ", "| fine-tuned "))]
    assert len(rows) == len(PANES) * len(METHODS)
    path = tmp_path / "scatter.png"
    report.figure().savefig(path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_evaluate_items_needs_items_and_an_adapter(tiny_pair):
    model, tokenizer = tiny_pair
    with pytest.raises(InputError, match="no items"):
        evaluate_items(_backend(model, tokenizer), [])
    with pytest.raises(InputError, match="adapter"):
        evaluate_items(_backend(model.get_base_model(), tokenizer), load_split("test", 1))


def test_metrics_table_by_hand():
    """One pane, one method: MAE $30.00, RMSLE 0.123, hit rate 50.0%, nothing unparsed."""
    table = metrics_table({"fine-tuned": {"greedy": PriceMetrics(2, 30.0, 0.1234, 0.5, 0)}}, n=2, k=3)
    assert "| fine-tuned | greedy | 2 | $30.00 | 0.123 | 50.0% | 0 |" in table
    assert "synthetic catalog" in table


def test_scatter_figure_has_one_subplot_per_pane_and_tolerates_misses():
    figure = scatter_figure(
        [10.0, 100.0, 500.0], {"base": [None, 5.0, 2000.0], "fine-tuned": [11.0, 95.0, 480.0]}
    )
    assert len(figure.axes) == 2
    assert "1 unparsed" in figure.axes[0].get_title() and r"\$" in figure.axes[0].get_title()
    assert "hit rate 100%" in figure.axes[1].get_title()


@pytest.mark.slow
def test_shipped_adapter_changes_the_nf4_base_and_mixed_batches_match(cache_dir):
    """The committed adapter loads on the embedded base in NF4, changes its greedy answer on a test item,
    and the mixed batch gives each row the same tokens as separate runs."""
    from dataclasses import replace

    from utils.core.profiles import read_settings
    from utils.runtime.loading import load_model_pair

    settings = replace(
        read_settings(), profile="smollm2-pricer", adapter=str(DEMO_ADAPTER_DIR), precision="nf4"
    )
    pair = load_model_pair(settings)
    assert pair.has_adapter and getattr(pair.model.get_base_model(), "is_loaded_in_4bit", False)
    prompts = _prompts(4)
    mixed = mixed_batch_step(_backend(pair.model, pair.tokenizer), prompts)
    separate = separate_greedy_texts(pair.model, pair.tokenizer, prompts)
    for pane in PANES:
        assert [row[pane].text for row in mixed] == separate[pane]
    assert separate["base"] != separate["fine-tuned"]
    assert all(row["fine-tuned"].predictions["greedy"] is not None for row in mixed)
