"""The token lens: every score equals an independent plain forward pass (base with no adapter loaded, the
adapter alone), KL equals a direct computation, and the API and views hold up on edge cases."""

import math

import pytest
import torch

from ui.views.lens import lens_html, summary_markdown, token_colour
from utils.analysis.token_lens import MAX_SCORED_TOKENS, score_texts
from utils.runtime.engine import Engine

PROMPT = "How much does this cost to the nearest dollar?\n\nSteel water bottle, 750 ml\n\nPrice is $"


@pytest.fixture(scope="module")
def tiny_engine(tiny_pair):
    return Engine(tiny_pair)


def _plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def test_scores_equal_plain_forward_passes(tiny_engine, plain_models):
    base_model, tuned_model, tok = plain_models
    prompt_ids, _ = tiny_engine.encode(PROMPT, 16)
    texts = {"base": [101, 202, 303, 404, 505], "fine_tuned": [7, 8, 9]}  # of different lengths: padding
    scored = score_texts(tiny_engine, prompt_ids, texts)
    for key, ids in texts.items():
        full = prompt_ids + ids
        lp_base = _plain_logprobs(base_model, full)
        lp_tuned = _plain_logprobs(tuned_model, full)
        assert [t.token_id for t in scored[key].tokens] == ids
        for j, token in enumerate(scored[key].tokens):
            position = len(prompt_ids) - 1 + j  # the logits there predict ids[j]
            assert token.logprob_base == pytest.approx(float(lp_base[position, ids[j]]), abs=1e-4)
            assert token.logprob_fine_tuned == pytest.approx(float(lp_tuned[position, ids[j]]), abs=1e-4)
            p_tuned = lp_tuned[position].exp()
            kl = float((p_tuned * (lp_tuned[position] - lp_base[position])).sum())
            assert token.kl == pytest.approx(kl, abs=1e-4)
            top = lp_base[position].topk(5)
            assert [p for _, p in token.top_base] == pytest.approx(top.values.exp().tolist(), abs=1e-5)
        assert scored[key].logprob_base == pytest.approx(sum(t.logprob_base for t in scored[key].tokens))
    assert any(abs(t.shift) > 1e-3 for t in scored["base"].tokens), "the LoRA must move the scores"


def test_empty_pane_and_cut(tiny_engine, tiny_pair):
    prompt_ids, _ = tiny_engine.encode(PROMPT, 8)
    long = list(range(1000, 1000 + MAX_SCORED_TOKENS + 4))
    scored = score_texts(tiny_engine, prompt_ids, {"base": [], "x": long})
    assert scored["base"].tokens == [] and scored["base"].perplexity("base") is None
    assert len(scored["x"].tokens) == MAX_SCORED_TOKENS and scored["x"].cut_from == len(long)
    html = lens_html(scored, {"base": "Base"})
    assert "wrote no tokens" in html and f"first {MAX_SCORED_TOKENS} of {len(long)}" in html
    assert "| Base | 0 |" in summary_markdown(scored, {"base": "Base"})


def test_only_empty_panes_run_no_model(tiny_pair):
    class Forbidden:
        decode = tiny_pair.tokenizer.decode

        def score_rows(self, *args):
            raise AssertionError("no forward pass for empty texts")

    scored = score_texts(Forbidden(), [1, 2], {"base": [], "fine_tuned": []})
    assert all(not s.tokens for s in scored.values())


def test_special_tokens_stay_text(tiny_engine, tiny_pair):
    tok = tiny_pair.tokenizer
    prompt = "Price <|im_end|> is $"
    prompt_ids, _ = tiny_engine.encode(prompt, 4)
    special = set(tok.all_special_ids)
    assert not special & set(prompt_ids)
    text_ids = tok("<|im_start|>", add_special_tokens=False, split_special_tokens=True)["input_ids"]
    scored = score_texts(tiny_engine, prompt_ids, {"base": text_ids})
    assert "".join(t.token for t in scored["base"].tokens) == "<|im_start|>"
    assert "&lt;" in lens_html(scored, {})  # escaped pieces, never raw markup
    assert "<|im_start|>" not in lens_html(scored, {})


def test_colours_say_which_model_prefers_the_token():
    assert token_colour(0.0) == "transparent"
    assert token_colour(3.0).startswith("rgba(79, 70, 229")  # fine-tune prefers: indigo
    assert token_colour(-3.0).startswith("rgba(217, 119, 6")  # base prefers: orange
    assert token_colour(60.0) == token_colour(6.0)  # saturates


def test_token_lens_endpoint(tiny_pair):
    from tests.test_app_api import client_for, plain_greedy, serve

    demo, url = serve(Engine(tiny_pair))
    try:
        client = client_for(url)
        out = client.predict(prompt=PROMPT, max_new_tokens=12, api_name="/token_lens")
        base_text = plain_greedy(tiny_pair, PROMPT, 12, adapter=False)
        tuned_text = plain_greedy(tiny_pair, PROMPT, 12, adapter=True)
        assert out["panes"]["base"]["text"] == base_text
        assert out["panes"]["fine_tuned"]["text"] == tuned_text
        for pane in out["panes"].values():
            assert len(pane["tokens"]) == 12
            assert pane["logprob_base"] == pytest.approx(sum(t["logprob_base"] for t in pane["tokens"]))
            first = pane["tokens"][0]
            assert set(first) == {
                "token", "token_id", "logprob_base", "logprob_fine_tuned", "kl", "top_base", "top_fine_tuned"
            }  # fmt: skip
            assert len(first["top_base"]) == 5 and math.isfinite(first["kl"])
        # greedy: the base's own text is its argmax at every step, so its top-1 token is the written one
        assert all(t["top_base"][0][0] == t["token"] for t in out["panes"]["base"]["tokens"])
        from gradio_client.exceptions import AppError

        with pytest.raises(AppError, match="The prompt is empty"):
            client.predict(prompt=" ", api_name="/token_lens")
    finally:
        demo.close()


@pytest.mark.slow
def test_smollm2_scores_equal_plain_forward_passes(smollm2_pair):
    """The embedded default in NF4: the engine's scores equal the same model's plain passes, adapter off/on."""
    engine = Engine(smollm2_pair)
    if not engine.has_adapter:
        pytest.skip("the demo adapter did not load")
    model, tok = smollm2_pair.model, smollm2_pair.tokenizer
    prompt = "How much does this cost to the nearest dollar?\n\nOak bookshelf, five shelves\n\nPrice is $"
    prompt_ids, _ = engine.encode(prompt, 8)
    text = tok("129.99 for the set", add_special_tokens=False)["input_ids"]
    scored = score_texts(engine, prompt_ids, {"fine_tuned": text})
    with engine.exclusive():
        with model.disable_adapter():
            lp_base = _plain_logprobs(model, prompt_ids + text)
        lp_tuned = _plain_logprobs(model, prompt_ids + text)
    for j, token in enumerate(scored["fine_tuned"].tokens):
        position = len(prompt_ids) - 1 + j
        assert token.logprob_base == pytest.approx(float(lp_base[position, text[j]]), abs=1e-4)
        assert token.logprob_fine_tuned == pytest.approx(float(lp_tuned[position, text[j]]), abs=1e-4)
