"""The training loop on a tiny random Llama with the real SmolLM2 tokenizer: seconds, not minutes."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from utils.core.errors import InputError
from utils.core.profiles import PRICER_PROMPT, LoraSettings
from utils.task.catalog import load_split
from utils.task.train_adapter import TrainConfig, train
from utils.task.training_data import (
    IGNORE_INDEX,
    batch_indices,
    collate,
    completion_loss,
    completion_text,
    encode_example,
    lr_factor,
)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory, cache_dir):
    """A random 2-layer Llama (hidden 32) saved with the embedded model's tokenizer (vocab 49,152)."""
    from utils.runtime.embedded import ensure_cache
    from utils.runtime.tiny import build_random_llama

    return build_random_llama(
        tmp_path_factory.mktemp("tiny-llama"),
        ensure_cache(cache_dir),
        hidden_size=32,
        intermediate_size=64,
        head_dim=8,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )


def _config(tiny_base, tmp_path, **overrides) -> TrainConfig:
    base = TrainConfig(
        steps=12,
        batch_size=4,
        lr=1e-2,
        warmup_steps=2,
        train_size=8,
        val_size=4,
        base=str(tiny_base),
        output=tmp_path / "adapter",
        checkpoint_dir=tmp_path / "checkpoints",
        checkpoint_every=100,
        eval_every=100,
        log_every=100,
        lora=LoraSettings(r=8, alpha=16, dropout=0.0),
    )
    return replace(base, **overrides)


def test_lr_factor_warms_up_then_decays_to_the_floor():
    """Warmup 10: step 0 -> 1/10, step 9 -> 10/10; the cosine ends at the 10% floor."""
    assert lr_factor(0, 100, 10) == pytest.approx(0.1)
    assert lr_factor(9, 100, 10) == pytest.approx(1.0)
    assert lr_factor(10, 100, 10) == pytest.approx(1.0)
    assert lr_factor(100, 100, 10) == pytest.approx(0.1)
    assert lr_factor(55, 100, 10) == pytest.approx(0.55)  # half-way: 0.1 + 0.9 * 0.5


def test_batch_indices_cover_each_epoch_once_and_are_pure():
    """10 items, batches of 4: steps 0-1 and half of step 2 are epoch 0, a permutation of 0..9."""
    first = (
        batch_indices(0, 4, 10, seed=1)
        + batch_indices(1, 4, 10, seed=1)
        + batch_indices(2, 4, 10, seed=1)[:2]
    )
    assert sorted(first) == list(range(10))
    assert batch_indices(5, 4, 10, seed=1) == batch_indices(5, 4, 10, seed=1)
    assert batch_indices(0, 4, 10, seed=1) != batch_indices(0, 4, 10, seed=2)


def test_completion_is_the_rounded_dollar_price():
    assert completion_text(149.49) == "149"
    assert completion_text(149.5) == "150"
    assert completion_text(0.4) == "1"


def test_labels_cover_price_and_eos_only(tiny_base):
    """ "Price is $" + "52" + EOS: the prompt is masked, the digits and EOS are the targets."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    item = load_split("train", 1)[0]
    ids, labels = encode_example(item, tokenizer, PRICER_PROMPT, 96)
    targets = [x for x in labels if x != IGNORE_INDEX]
    assert tokenizer.decode(targets[:-1]) == completion_text(item.price)
    assert targets[-1] == tokenizer.eos_token_id
    assert ids[-len(targets) :] == targets
    assert tokenizer.decode(ids[: -len(targets)]) == PRICER_PROMPT.replace("{description}", item.description)


def test_completion_loss_equals_the_full_label_loss(tiny_base):
    """Logits for the last `keep` positions only give the same loss as scoring every position."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    examples = [encode_example(item, tokenizer, PRICER_PROMPT, 96) for item in load_split("train", 5)]
    batch = collate(examples, tokenizer.pad_token_id)
    full = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        labels=batch["labels"],
    ).loss
    assert completion_loss(model, batch).item() == pytest.approx(full.item(), rel=1e-5)


def test_short_run_lowers_the_loss_and_saves_a_loadable_adapter(tiny_base, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lines: list[str] = []
    result = train(_config(tiny_base, tmp_path), log=lines.append)

    assert result.step == 12 and len(result.losses) == 12
    assert sum(result.losses[-3:]) / 3 < sum(result.losses[:3]) / 3
    assert any("trainable parameters" in line for line in lines)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert sum(t.numel() for t in saved.values()) == result.trainable_params
    log = json.loads((tmp_path / "adapter" / "training_log.json").read_text())
    assert log["steps"] == 12 and log["data_seed"] == 1234 and len(log["losses"]) == 12
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_base) and config["r"] == 8

    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter")
    name, tensor = next(iter(saved.items()))
    module_name = name.replace(".weight", ".default.weight")
    assert torch.equal(dict(loaded.named_parameters())[module_name], tensor)


def test_resume_continues_at_the_checkpoint_step_with_the_same_losses(tiny_base, tmp_path):
    """Stopped after step 3 and resumed, the run's steps 4-6 match an uninterrupted run's exactly."""
    straight = train(
        _config(tiny_base, tmp_path / "a", steps=6, lora=LoraSettings(r=8, alpha=16, dropout=0.1)),
        log=lambda _: None,
    )

    interrupted = _config(
        tiny_base, tmp_path / "b", steps=6, checkpoint_every=3, lora=LoraSettings(r=8, alpha=16, dropout=0.1)
    )
    first = train(replace(interrupted, stop_at=3), log=lambda _: None)
    assert first.step == 3 and not (tmp_path / "b" / "adapter").exists()
    lines: list[str] = []
    second = train(replace(interrupted, resume=True), log=lines.append)

    assert any("at step 3" in line for line in lines)
    assert second.step == 6 and len(second.losses) == 6
    assert second.losses == pytest.approx(straight.losses, rel=1e-5)


def test_resume_refuses_a_checkpoint_with_other_settings(tiny_base, tmp_path):
    config = _config(tiny_base, tmp_path, steps=4, stop_at=2)
    train(config, log=lambda _: None)
    with pytest.raises(InputError, match="other settings"):
        train(replace(config, lr=1e-3, resume=True, stop_at=None), log=lambda _: None)


def test_resume_without_a_checkpoint_says_what_to_do(tiny_base, tmp_path):
    with pytest.raises(InputError, match="without --resume"):
        train(_config(tiny_base, tmp_path, resume=True), log=lambda _: None)


def test_warm_start_begins_from_the_earlier_adapter(tiny_base, tmp_path):
    """With a vanishing learning rate, a warm-started run saves (almost) the adapter it started from."""
    from safetensors.torch import load_file

    first = _config(tiny_base, tmp_path / "first", steps=4)
    train(first, log=lambda _: None)
    second = _config(
        tiny_base, tmp_path / "second", steps=2, lr=1e-12, init_adapter=first.output, train_size=4, seed=7
    )
    train(second, log=lambda _: None)

    before = load_file(str(first.output / "adapter_model.safetensors"))
    after = load_file(str(second.output / "adapter_model.safetensors"))
    assert before.keys() == after.keys()
    assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
    log = json.loads((second.output / "training_log.json").read_text())
    assert log["warm_start"]["from"] == str(first.output) and log["warm_start"]["steps"] == 4


def test_warm_start_needs_an_adapter_file(tiny_base, tmp_path):
    with pytest.raises(InputError, match="warm-start"):
        train(_config(tiny_base, tmp_path, init_adapter=tmp_path / "missing"), log=lambda _: None)


def test_the_cli_writes_to_the_cache_unless_asked_to_replace_the_demo_adapter(capsys):
    from utils.core.profiles import DEMO_ADAPTER_DIR
    from utils.task.train_adapter import parse_args

    assert parse_args([]).output is None  # train() then writes to CACHE/training/adapter
    assert parse_args(["--replace-demo-adapter"]).output == DEMO_ADAPTER_DIR
    with pytest.raises(SystemExit) as raised:
        parse_args(["--output", str(DEMO_ADAPTER_DIR)])
    assert raised.value.code == 2 and "--replace-demo-adapter" in capsys.readouterr().err
