"""The forgetting check: the sample is real licensed prose of over 20,000 tokens; each model's cross-entropy
equals a plain forward pass of that model alone; a zero adapter shows zero change; /forgetting's shape and
messages."""

from __future__ import annotations

import hashlib
import math
from dataclasses import replace

import pytest
import torch

from tests.test_app_api import client_for, serve
from utils.core.seam import Use
from utils.runtime.engine import Engine
from utils.runtime.loading import load_model_pair
from utils.task import forgetting

SAMPLE_SHA256 = (
    "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"  # sentencepiece 0.2.3's file
)


def test_the_sample_is_the_licensed_book_unchanged():
    text = forgetting.SAMPLE_FILE.read_bytes()
    assert hashlib.sha256(text).hexdigest() == SAMPLE_SHA256
    head = text[:2000].decode("utf-8-sig")
    assert "Project Gutenberg" in head and "EBook #8868" in head
    assert "*** START: FULL LICENSE ***" in text.decode("utf-8-sig")
    body = forgetting.sample_text()
    assert body.lstrip().startswith("Produced by") and "*** END" not in body


def test_the_sample_holds_over_20000_tokens_in_passages_of_at_most_256(tiny_pair):
    engine = Engine(tiny_pair)  # SmolLM2's tokenizer
    passages = forgetting.load_passages(engine)
    assert len(passages) == forgetting.SAMPLE_PASSAGES
    assert sum(len(p.token_ids) for p in passages) > 20_000
    assert all(1 < len(p.token_ids) <= forgetting.PASSAGE_TOKENS for p in passages)
    assert [p.index for p in passages] == list(range(len(passages)))
    assert passages[1].text.split()[0] in forgetting.sample_text()


@pytest.fixture(scope="module")
def fp32_engine(tiny_settings, extra_adapter_dirs):
    extras = (("second", str(extra_adapter_dirs["second"])),)
    settings = replace(tiny_settings, adapters=extras, compute_dtype="float32")
    return Engine(load_model_pair(settings, has_gpu=False)), settings, extra_adapter_dirs


def test_cross_entropy_equals_a_plain_forward_pass_of_each_model_alone(fp32_engine, tiny_adapter_dir):
    from peft import PeftModel

    from utils.core.profiles import resolve_profile
    from utils.runtime.loading import load_base

    engine, settings, dirs = fp32_engine
    passages = forgetting.load_passages(engine, 6)
    models = {"base": Use(None, 0.0), "fine_tuned": Use("fine_tuned", 1.0), "second": Use("second", 1.0)}
    scored = [p for batch in forgetting.score_passages(engine, passages, models) for p in batch]
    report = forgetting.build_report(scored, models, 0.0)
    folders = {"base": None, "fine_tuned": tiny_adapter_dir, "second": dirs["second"]}
    for name, folder in folders.items():
        model, _ = load_base(resolve_profile(settings), settings, device="cpu")
        if folder is not None:
            model = PeftModel.from_pretrained(model, str(folder)).eval()
        total, count = 0.0, 0
        for passage, score in zip(passages, scored, strict=True):
            ids = torch.tensor([passage.token_ids])
            with torch.inference_mode():
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            expected = logp.gather(1, ids[0, 1:].unsqueeze(1)).squeeze(1)
            assert score.logprobs[name] == pytest.approx(
                expected.tolist(), abs=2e-3
            )  # bf16 inside bitsandbytes' CPU kernel; the mean is checked to 1e-4
            total -= float(expected.sum())
            count += len(expected)
        assert report.totals[name]["cross_entropy"] == pytest.approx(total / count, abs=1e-4)
        assert report.totals[name]["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-4)
    assert report.totals["base"]["change_vs_base"] == 0.0
    assert report.totals["fine_tuned"]["mean_kl_vs_base"] > 0


def test_a_zero_adapter_shows_zero_change(tiny_settings, tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )  # peft's default init: B = 0, so B A = 0
    model.save_pretrained(tmp_path / "zero")
    engine = Engine(
        load_model_pair(replace(tiny_settings, adapter=str(tmp_path / "zero"), adapters=()), has_gpu=False)
    )
    models = {"base": Use(None, 0.0), "fine_tuned": Use("fine_tuned", 1.0)}
    passages = forgetting.load_passages(engine, 3)
    scored = [p for batch in forgetting.score_passages(engine, passages, models) for p in batch]
    report = forgetting.build_report(scored, models, 0.0)
    assert report.totals["fine_tuned"]["change_vs_base"] == 0.0
    assert report.totals["fine_tuned"]["mean_kl_vs_base"] == 0.0
    assert all(p.logprobs["fine_tuned"] == p.logprobs["base"] for p in scored)


@pytest.fixture(scope="module")
def client(fp32_engine):
    demo, url = serve(fp32_engine[0])
    yield client_for(url)
    demo.close()


def test_the_forgetting_endpoint(client):
    from gradio_client.exceptions import AppError

    out = client.predict(n_passages=3, strengths="0.5", adapters="second", api_name="/forgetting")
    assert [m["model"] for m in out["models"]] == ["base", "fine_tuned", "s = 0.5", "second"]
    assert out["sample"]["passages"] == 3 and "Botchan" in out["sample"]["source"]
    assert len(out["passages"]) == 3 and len(out["most_forgotten"]) == 3
    tokens = sum(p["tokens"] - 1 for p in out["passages"])
    base = next(m for m in out["models"] if m["model"] == "base")
    assert base["tokens"] == tokens and base["change_vs_base"] == 0
    for n, message in [(0, "n_passages must be between 1 and 96"), (97, "between 1 and 96")]:
        with pytest.raises(AppError, match=message):
            client.predict(n_passages=n, api_name="/forgetting")
    with pytest.raises(AppError, match="No adapter is called 'nope'"):
        client.predict(n_passages=1, adapters="nope", api_name="/forgetting")
