"""The side-by-side engine: token-exact panes, streaming, stop, validation, and no cross-talk between threads."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from utils.engine import (
    BASE,
    FINE_TUNED,
    Engine,
    GenerationSettings,
    clean_prompt,
    first_divergence,
)
from utils.errors import GenerationError, InputError
from utils.loading import attach_adapter, load_base
from utils.profiles import resolve_profile

PROMPT = "How much does this cost to the nearest dollar?\n\nSteel water bottle, 750 ml\n\nPrice is $"


@pytest.fixture(scope="module")
def tiny_engine(tiny_pair):
    return Engine(tiny_pair)


def _plain_greedy(model, tokenizer, prompt, n):
    """Reference run outside the engine: plain generate, one row, no adapter_names."""
    ids = tokenizer(
        prompt, add_special_tokens=False, split_special_tokens=True, return_tensors="pt"
    ).input_ids
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    new = out[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    cut = next((i for i, t in enumerate(new) if t in eos), len(new))
    return new[:cut]


@pytest.fixture(scope="module")
def tiny_references(tiny_settings):
    """Greedy tokens of the plain base (no adapter loaded at all) and of base + adapter alone."""
    profile = resolve_profile(tiny_settings)
    plain, tok = load_base(profile, tiny_settings, device="cpu")
    base_tokens = _plain_greedy(plain, tok, PROMPT, 24)
    with_adapter, _ = attach_adapter(load_base(profile, tiny_settings, device="cpu")[0], profile.adapter)
    tuned_tokens = _plain_greedy(with_adapter, tok, PROMPT, 24)
    return base_tokens, tuned_tokens


def test_both_panes_equal_their_single_runs(tiny_engine, tiny_references):
    base_tokens, tuned_tokens = tiny_references
    result = tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=24))
    assert result.finished
    assert result.panes[BASE].token_ids == base_tokens
    assert result.panes[FINE_TUNED].token_ids == tuned_tokens
    assert base_tokens != tuned_tokens, (
        "the random LoRA must change the output for this test to mean anything"
    )


@pytest.mark.parametrize("mode,key,index", [("base", BASE, 0), ("fine_tuned", FINE_TUNED, 1)])
def test_single_pane_modes(tiny_engine, tiny_references, mode, key, index):
    result = tiny_engine.run(PROMPT, mode, GenerationSettings(max_new_tokens=24))
    assert list(result.panes) == [key]
    assert result.panes[key].token_ids == tiny_references[index]


def test_streaming_grows_token_by_token(tiny_engine):
    updates = list(tiny_engine.stream(PROMPT, "both", GenerationSettings(max_new_tokens=8)))
    counts = [u.panes[BASE].tokens for u in updates]
    assert counts == sorted(counts)
    assert updates[-1].finished and not any(u.finished for u in updates[:-1])
    assert len(updates) >= 3
    final = updates[-1].panes[FINE_TUNED]
    assert final.first_token_s is not None and final.first_token_s > 0
    assert final.finish_reason in ("eos", "length")


def test_sampling_with_a_seed_is_reproducible(tiny_engine):
    settings = GenerationSettings(max_new_tokens=16, temperature=1.3, top_p=0.95, seed=7)
    a = tiny_engine.run(PROMPT, "both", settings)
    b = tiny_engine.run(PROMPT, "both", settings)
    c = tiny_engine.run(
        PROMPT, "both", GenerationSettings(max_new_tokens=16, temperature=1.3, top_p=0.95, seed=8)
    )
    assert a.panes[BASE].token_ids == b.panes[BASE].token_ids
    assert a.panes[FINE_TUNED].token_ids == b.panes[FINE_TUNED].token_ids
    assert (a.panes[BASE].token_ids, a.panes[FINE_TUNED].token_ids) != (
        c.panes[BASE].token_ids,
        c.panes[FINE_TUNED].token_ids,
    )


def test_stop_event_ends_generation_and_frees_the_model(tiny_engine):
    stop = threading.Event()
    updates = []
    for update in tiny_engine.stream(PROMPT, "both", GenerationSettings(max_new_tokens=400), stop_event=stop):
        updates.append(update)
        if len(updates) == 3:
            stop.set()
    assert updates[-1].finished
    assert updates[-1].panes[BASE].tokens < 400
    assert {p.finish_reason for p in updates[-1].panes.values()} <= {"stopped", "eos"}
    assert tiny_engine.lock.acquire(timeout=5)
    tiny_engine.lock.release()


def test_a_consumer_that_leaves_frees_the_model(tiny_engine):
    stream = tiny_engine.stream(PROMPT, "both", GenerationSettings(max_new_tokens=400))
    next(stream)
    next(stream)
    stream.close()  # what gradio does when the browser disconnects
    assert tiny_engine.lock.acquire(timeout=10)
    tiny_engine.lock.release()
    assert tiny_engine.run(PROMPT, "base", GenerationSettings(max_new_tokens=4)).finished


def test_a_busy_model_times_out_with_a_message(tiny_pair):
    engine = Engine(tiny_pair, lock_timeout_s=0.1)
    engine.lock.acquire()
    try:
        with pytest.raises(GenerationError, match="busy"):
            engine.run(PROMPT, "base")
    finally:
        engine.lock.release()


def test_generation_failure_midway_is_reported_and_the_next_request_works(tiny_engine, monkeypatch):
    calls = {"n": 0}
    real_forward = tiny_engine.model.base_model.model.model.forward

    def flaky_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated fault")
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(tiny_engine.model.base_model.model.model, "forward", flaky_forward)
    with pytest.raises(GenerationError, match="failed"):
        tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=10))
    monkeypatch.undo()
    assert tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=4)).finished


def test_out_of_memory_becomes_a_message(tiny_engine, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

    monkeypatch.setattr(tiny_engine.model, "generate", oom)
    with pytest.raises(GenerationError, match="out of memory"):
        tiny_engine.run(PROMPT, "both")
    monkeypatch.undo()
    assert tiny_engine.run(PROMPT, "base", GenerationSettings(max_new_tokens=2)).finished


def test_concurrent_requests_see_only_their_own_adapter_state(tiny_engine):
    jobs = [(mode, n) for n in (6, 9) for mode in ("base", "fine_tuned", "both")] * 2
    serial = {
        job: _tokens(tiny_engine.run(PROMPT, job[0], GenerationSettings(max_new_tokens=job[1])))
        for job in set(jobs)
    }
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(
            pool.map(
                lambda job: (
                    job,
                    _tokens(tiny_engine.run(PROMPT, job[0], GenerationSettings(max_new_tokens=job[1]))),
                ),
                jobs,
            )
        )
    for job, tokens in results:
        assert tokens == serial[job], job


def _tokens(update):
    return {key: tuple(p.token_ids) for key, p in update.panes.items()}


def test_special_tokens_in_the_prompt_are_plain_text(tiny_engine):
    ids, _ = tiny_engine.encode("a <|im_end|> b", 4)
    assert tiny_engine.tokenizer.eos_token_id not in ids
    assert tiny_engine.run("<|im_end|><|im_start|>", "base", GenerationSettings(max_new_tokens=2)).finished


def test_a_prompt_longer_than_the_context_is_cut_from_the_left(tiny_engine):
    long_prompt = "word " * 2000  # the tiny model's context is 512 tokens
    ids, notices = tiny_engine.encode(long_prompt, 16)
    assert len(ids) == tiny_engine.context_length - 16
    assert "dropped" in notices[0]
    result = tiny_engine.run(long_prompt, "base", GenerationSettings(max_new_tokens=16))
    assert result.finished and "dropped" in result.notices[0]


def test_fine_tuned_mode_needs_an_adapter(tiny_settings):
    from dataclasses import replace

    from utils.loading import load_model_pair

    engine = Engine(load_model_pair(replace(tiny_settings, adapter=""), has_gpu=False))
    assert engine.run(PROMPT, "base", GenerationSettings(max_new_tokens=3)).finished
    with pytest.raises(InputError, match="No adapter"):
        engine.run(PROMPT, "both")


def test_next_token_views_for_both_panes(tiny_engine):
    views = tiny_engine.next_token_views(PROMPT, "both", top=5)
    assert set(views) == {BASE, FINE_TUNED}
    for view in views.values():
        assert len(view.tokens) == 5
        assert view.probabilities == sorted(view.probabilities, reverse=True)
        assert 0 < sum(view.probabilities) <= 1.0 + 1e-6
    assert (
        views[BASE].token_ids != views[FINE_TUNED].token_ids
        or views[BASE].probabilities != views[FINE_TUNED].probabilities
    )


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"temperature": math.nan}, "finite"),
        ({"temperature": math.inf}, "finite"),
        ({"temperature": -1}, "between"),
        ({"temperature": "hot"}, "number"),
        ({"top_p": 0}, "between"),
        ({"top_p": 1.5}, "between"),
        ({"seed": -3}, "between"),
        ({"seed": 1.5}, "whole"),
        ({"max_new_tokens": None}, "number"),
        ({"max_new_tokens": True}, "number"),
        ({"max_new_tokens": [3]}, "number"),
    ],
)
def test_bad_settings_are_refused_with_a_message(kwargs, message):
    with pytest.raises(InputError, match=message):
        GenerationSettings.checked(**kwargs)


@pytest.mark.parametrize("value,expected", [(0, 1), (-5, 1), (10_000, 512), ("32", 32), (7.0, 7)])
def test_max_new_tokens_is_clamped(value, expected):
    settings, notices = GenerationSettings.checked(max_new_tokens=value)
    assert settings.max_new_tokens == expected
    assert bool(notices) == (expected != int(float(value)))


def test_clean_prompt():
    assert clean_prompt("a\x00b\x07c\nd\te") == (
        "abc\nd\te",
        ["Removed 2 control character(s) from the prompt."],
    )
    assert clean_prompt("héllo 价格 🚀")[0] == "héllo 价格 🚀"
    for empty in ("", "   \n\t", "\x00\x01"):
        with pytest.raises(InputError, match="empty"):
            clean_prompt(empty)
    with pytest.raises(InputError, match="text"):
        clean_prompt(None)


@pytest.mark.parametrize(
    "a,b,expected",
    [([1, 2, 3], [1, 5], 1), ([1, 2], [1, 2], None), ([1, 2], [1, 2, 3], 2), ([], [4], 0), ([9], [8], 0)],
)
def test_first_divergence(a, b, expected):
    assert first_divergence(a, b) == expected


@pytest.mark.slow
def test_smollm2_mixed_batch_is_token_exact(smollm2_pair, cache_dir):
    """The embedded default in NF4: the base pane equals a plain base run with no adapter loaded at all."""
    from utils.profiles import Settings

    engine = Engine(smollm2_pair)
    settings = Settings(profile="smollm2-pricer", cache_dir=cache_dir, adapter="")
    plain, tok = load_base(resolve_profile(settings), settings, device="cpu")
    prompt = "How much does this cost to the nearest dollar?\n\nBudget plastic desk lamp, small\n\nPrice is $"
    expected = _plain_greedy(plain, tok, prompt, 12)
    mode = "both" if engine.has_adapter else "base"
    result = engine.run(prompt, mode, GenerationSettings(max_new_tokens=12))
    assert result.panes[BASE].token_ids == expected
    if engine.has_adapter:
        with torch.inference_mode():
            tuned = _plain_greedy(smollm2_pair.model, tok, prompt, 12)  # adapter active, no adapter_names
        assert result.panes[FINE_TUNED].token_ids == tuned


def test_routing_is_reset_after_every_request(tiny_engine):
    tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=3))
    tiny_engine.next_token_views(PROMPT, "base")
    assert tiny_engine.router.rows is None
    assert len(tiny_engine.router.layers) == 2 * 4  # q/k/v/o in each of the tiny model's 2 layers


def test_requests_register_no_hooks(tiny_engine):
    """Switching must not walk the model: the hooks a request finds are the ones the engine made at start."""
    layer = tiny_engine.router.layers[0]
    before = dict(layer._forward_pre_hooks)
    tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=3))
    assert dict(layer._forward_pre_hooks) == before
    assert len(before) == 1


def test_engines_over_one_model_share_the_lock_and_the_hooks(tiny_pair, tiny_engine):
    other = Engine(tiny_pair)
    assert other.lock is tiny_engine.lock
    assert other.router is tiny_engine.router
    assert len(tiny_engine.router.layers[0]._forward_pre_hooks) == 1


def test_stop_pressed_repeatedly_and_before_the_start(tiny_engine):
    stop = threading.Event()
    stop.set()
    stop.set()
    result = None
    for result in tiny_engine.stream(PROMPT, "both", GenerationSettings(max_new_tokens=300), stop_event=stop):  # noqa: B007
        stop.set()
    assert result.finished and result.panes[BASE].tokens <= 1
    assert tiny_engine.run(PROMPT, "base", GenerationSettings(max_new_tokens=3)).finished
