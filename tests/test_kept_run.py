"""A generation kept for its scoring (utils/runtime/kept_run.py): the token lens after a run computes only its
cross rows, over the texts, after the prompt's cached keys and values; and every score still equals an
independent plain forward pass (the base with no adapter loaded, the adapter alone with peft), whatever the
padding, sampling, strength or row order."""

from dataclasses import replace

import pytest

from tests.test_token_lens import PROMPT, _plain_logprobs
from utils.analysis.token_lens import score_texts
from utils.core.seam import BASE, FINE_TUNED, GenerationSettings
from utils.runtime import kept_run
from utils.runtime.engine import Engine


@pytest.fixture
def engine(tiny_pair):
    engine = Engine(tiny_pair)
    yield engine
    engine.release_kept_run()


class ModelCalls(list):
    """Each model call's (input_ids shape, cached tokens before it) during a scoring."""


@pytest.fixture
def model_calls(engine, monkeypatch):
    calls = ModelCalls()
    model = engine.model
    real = type(model).__call__

    def counted(self, *args, **kwargs):
        if self is model:
            past = kwargs.get("past_key_values")
            calls.append((tuple(kwargs["input_ids"].shape), past.get_seq_length() if past is not None else 0))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", counted)
    return calls


def _run(engine, rows, tokens=6, **settings):
    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True, keep_for_scoring=True, **settings)
    result = engine.run_rows(PROMPT, rows, settings)
    return {key: list(state.token_ids) for key, state in result.panes.items()}


def _assert_plain(scored, prompts, texts, plain_models):
    """Every score equals the plain models' own forward pass over that model's prompt + the text."""
    base_model, tuned_model, _ = plain_models
    for key, ids in texts.items():
        for model, attribute, prompt in (
            (base_model, "logprob_base", prompts[BASE]),
            (tuned_model, "logprob_fine_tuned", prompts[FINE_TUNED]),
        ):
            expected = _plain_logprobs(model, prompt + ids)
            for j, token in enumerate(scored[key].tokens):
                assert getattr(token, attribute) == pytest.approx(
                    float(expected[len(prompt) - 1 + j, ids[j]]), abs=1e-4
                )


def test_the_lens_after_a_run_computes_only_the_cross_rows_over_the_texts(engine, model_calls, plain_models):
    texts = _run(engine, engine.rows_for("both"))
    prompt_ids, _ = engine.encode(PROMPT, 6)
    assert engine.kept is not None and engine.kept.tokens[0][: len(prompt_ids)] == prompt_ids
    model_calls.clear()
    scored = score_texts(engine, prompt_ids, texts)
    # one call: the base under the fine-tune's text and the fine-tune under the base's, after the prompt's
    # first len - 1 tokens from the generation's cache (the prompt's last position is the first one scored)
    assert model_calls == [((2, 1 + 6), len(prompt_ids) - 1)]
    _assert_plain(scored, {BASE: prompt_ids, FINE_TUNED: prompt_ids}, texts, plain_models)
    for key in texts:  # KL from a direct computation over the plain models' distributions
        full = prompt_ids + texts[key]
        lp_base = _plain_logprobs(plain_models[0], full)
        lp_tuned = _plain_logprobs(plain_models[1], full)
        for j, token in enumerate(scored[key].tokens):
            p = len(prompt_ids) - 1 + j
            kl = float((lp_tuned[p].exp() * (lp_tuned[p] - lp_base[p])).sum())
            assert token.kl == pytest.approx(kl, abs=1e-4)
    engine.release_kept_run()
    assert engine.kept is None
    model_calls.clear()
    again = score_texts(engine, prompt_ids, texts)
    assert len(model_calls) == 1 and model_calls[0][1] == 0, "without the kept run: one plain pass"
    for key in texts:
        assert [t.logprob_base for t in again[key].tokens] == pytest.approx(
            [t.logprob_base for t in scored[key].tokens], abs=1e-4
        )


def test_panes_with_prompts_of_different_lengths_reuse_their_own_rows_cache(
    engine, model_calls, plain_models
):
    """Left-padded generation rows (the fine-tune's prompt longer): each cross row takes its model's own
    prompt from the cache, past that row's padding."""
    prompt_ids, _ = engine.encode(PROMPT, 6)
    longer = prompt_ids[:3] + prompt_ids  # another "format" for the fine-tune's pane
    base_row, tuned_row = engine.rows_for("both")
    rows = [replace(base_row, prompt_ids=prompt_ids), replace(tuned_row, prompt_ids=longer)]
    texts = _run(engine, rows)
    assert engine.kept.pads == [3, 0]
    model_calls.clear()
    scored = score_texts(engine, {BASE: prompt_ids, FINE_TUNED: longer}, texts)
    assert sorted(model_calls) == sorted([((1, 7), len(prompt_ids) - 1), ((1, 7), len(longer) - 1)])
    _assert_plain(scored, {BASE: prompt_ids, FINE_TUNED: longer}, texts, plain_models)


def test_a_sampled_run_scores_its_texts_under_the_raw_models(engine, plain_models):
    texts = _run(engine, engine.rows_for("both"), temperature=1.3, top_p=0.9, seed=3)
    prompt_ids, _ = engine.encode(PROMPT, 6)
    _assert_plain(
        score_texts(engine, prompt_ids, texts),
        {BASE: prompt_ids, FINE_TUNED: prompt_ids},
        texts,
        plain_models,
    )


def test_a_lens_at_another_strength_computes_what_the_run_did_not(engine, model_calls):
    texts = _run(engine, engine.rows_for("both"))
    prompt_ids, _ = engine.encode(PROMPT, 6)
    model_calls.clear()
    at_half = score_texts(engine, prompt_ids, texts, strength=0.5)
    engine.release_kept_run()
    plain = score_texts(engine, prompt_ids, texts, strength=0.5)
    assert len(model_calls) == 3, (
        "the base row from the cache, the s = 0.5 rows by a plain pass; then one pass"
    )
    for key in texts:
        got = [v for t in at_half[key].tokens for v in (t.logprob_base, t.logprob_fine_tuned, t.kl)]
        expected = [v for t in plain[key].tokens for v in (t.logprob_base, t.logprob_fine_tuned, t.kl)]
        assert got == pytest.approx(expected, abs=1e-4)


def test_next_tokens_after_a_run_are_its_first_steps(engine, model_calls):
    rows = engine.rows_for("both")
    _run(engine, rows)
    model_calls.clear()
    views = engine.next_tokens(PROMPT, rows, 5)
    assert model_calls == []
    engine.release_kept_run()
    plain = engine.next_tokens(PROMPT, rows, 5)
    for key, view in views.items():
        assert view.token_ids == plain[key].token_ids
        assert view.probabilities == pytest.approx(plain[key].probabilities, abs=1e-5)


def test_nothing_is_kept_unless_asked_on_the_cpu_within_the_budget(engine, monkeypatch):
    engine.run_rows(PROMPT, engine.rows_for("both"), GenerationSettings(max_new_tokens=4))
    assert engine.kept is None
    _run(engine, engine.rows_for("both"))
    assert engine.kept is not None
    assert engine.kept.logits.shape == (2, 6, engine.vocabulary_size())
    engine.run_rows(PROMPT, engine.rows_for("both"), GenerationSettings(max_new_tokens=4))
    assert engine.kept is None, "a later run frees the last one's"
    monkeypatch.setattr(kept_run, "KEPT_LOGITS_BUDGET_BYTES", 2 * 6 * engine.vocabulary_size() * 4 - 1)
    _run(engine, engine.rows_for("both"))
    assert engine.kept is None


def test_the_lens_view_keeps_and_releases(tiny_pair, monkeypatch):
    """The Compare view's lens asks the run to keep what it computed, and frees it once scored."""
    from ui.lens import After, afterwards, kept_for

    engine = Engine(tiny_pair)
    settings = kept_for(GenerationSettings(max_new_tokens=4), After(lens_strength=1.0))
    assert settings.keep_for_scoring
    assert not kept_for(GenerationSettings(max_new_tokens=4), After()).keep_for_scoring
    rows = engine.rows_for("both")
    update = engine.run_rows(PROMPT, rows, settings)
    assert engine.kept is not None
    out = afterwards(engine, PROMPT, rows, settings, update, After(lens_strength=1.0))
    assert set(out.scored) == {BASE, FINE_TUNED}
    assert engine.kept is None
