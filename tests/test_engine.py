"""The side-by-side engine: token-exact panes, streaming, stop, validation, and no cross-talk between threads."""

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from utils.core.errors import GenerationError, InputError
from utils.core.inputs import clean_prompt, parse_strengths
from utils.core.profiles import resolve_profile
from utils.core.seam import BASE, FINE_TUNED, GenerationSettings, Row, first_divergence
from utils.runtime import greedy_loop
from utils.runtime.engine import Engine
from utils.runtime.loading import attach_adapter, load_base

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
    # greedy runs on a CPU take the engine's own loop
    monkeypatch.setattr(greedy_loop, "greedy_generate", oom)
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

    from utils.runtime.loading import load_model_pair

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
    from utils.core.profiles import Settings

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


@pytest.mark.slow
def test_smollm2_strength_sweep_is_token_exact(smollm2_pair):
    """The embedded default in NF4: a 0 / 0.5 / 1 sweep equals base, peft's rescale by 0.5, and the adapter."""
    from peft.helpers import rescale_adapter_scale

    engine = Engine(smollm2_pair)
    if not engine.has_adapter:
        pytest.skip("the demo adapter did not load")
    prompt = "How much does this cost to the nearest dollar?\n\nOak bookshelf, five shelves\n\nPrice is $"
    tok = smollm2_pair.tokenizer
    with engine.exclusive(), torch.inference_mode():
        with smollm2_pair.model.disable_adapter():
            base = _plain_greedy(smollm2_pair.model, tok, prompt, 10)
        with rescale_adapter_scale(smollm2_pair.model, 0.5):
            half = _plain_greedy(smollm2_pair.model, tok, prompt, 10)
        tuned = _plain_greedy(smollm2_pair.model, tok, prompt, 10)
    rows = engine.sweep_rows([0.0, 0.5, 1.0])
    result = engine.run_rows(prompt, rows, GenerationSettings(max_new_tokens=10))
    assert [result.panes[row.key].token_ids for row in rows] == [base, half, tuned]


def test_strength_plan_is_reset_after_every_request(tiny_engine):
    tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=3))
    tiny_engine.next_token_views(PROMPT, "base")
    assert tiny_engine.router.plan is None
    assert len(tiny_engine.router.layers) == 2 * 4  # q/k/v/o in each of the tiny model's 2 layers


def test_requests_wrap_nothing_and_register_no_hooks(tiny_engine):
    """Switching must not walk the model: each layer's forward is the one the engine installed at start."""
    layer = tiny_engine.router.layers[0]
    forward, hooks = layer.__dict__["forward"], dict(layer._forward_pre_hooks)
    tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=3), strength=0.5)
    assert layer.__dict__["forward"] is forward
    assert dict(layer._forward_pre_hooks) == hooks == {}


def test_engines_over_one_model_share_the_lock_and_the_router(tiny_pair, tiny_engine):
    other = Engine(tiny_pair)
    assert other.lock is tiny_engine.lock
    assert other.router is tiny_engine.router
    assert other.router.names[0].endswith("layers.0.self_attn.q_proj")


# ---------------------------------------------------------------------------------------------------
# Adapter strength per row: base(x) + s * (alpha / r) * B A x


@pytest.fixture(scope="module")
def tiny_half_strength(tiny_settings):
    """Greedy tokens of base + adapter alone under peft's own rescale_adapter_scale(model, 0.5)."""
    from peft.helpers import rescale_adapter_scale

    profile = resolve_profile(tiny_settings)
    plain, tok = load_base(profile, tiny_settings, device="cpu")
    model, _ = attach_adapter(plain, profile.adapter)
    with rescale_adapter_scale(model, 0.5):
        return _plain_greedy(model, tok, PROMPT, 24)


def _sweep(engine, strengths, n=24, **kwargs):
    rows = engine.sweep_rows(strengths)
    result = engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=n, **kwargs))
    return [result.panes[row.key].token_ids for row in rows]


def test_strengths_in_one_batch_equal_their_reference_runs(tiny_engine, tiny_references, tiny_half_strength):
    """s = 0 is the plain base (no adapter loaded), s = 1 the adapter alone, s = 0.5 peft's rescale."""
    base_tokens, tuned_tokens = tiny_references
    got = _sweep(tiny_engine, [0.0, 0.5, 1.0])
    assert got == [base_tokens, tiny_half_strength, tuned_tokens]
    assert len({tuple(t) for t in got}) == 3, "the three strengths must give three different outputs"


def test_compare_strength_moves_only_the_fine_tuned_pane(tiny_engine, tiny_references, tiny_half_strength):
    result = tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=24), strength=0.5)
    assert result.panes[BASE].token_ids == tiny_references[0]
    assert result.panes[FINE_TUNED].token_ids == tiny_half_strength
    assert result.panes[FINE_TUNED].label == "Fine-tuned (s = 0.5)"


def test_strength_factor_is_applied_to_the_lora_update(tiny_pair, tiny_engine):
    """One layer's output at strength s equals base(x) + s * scaling * B A x computed by hand."""
    from utils.runtime.router import row_strengths

    layer = tiny_engine.router.layers[0]
    x = torch.randn(3, 5, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    a, b = layer.lora_A["default"].weight.float(), layer.lora_B["default"].weight.float()
    with tiny_engine.exclusive(), torch.inference_mode():
        base = layer.base_layer(x)
        with row_strengths(tiny_pair.model, [0.0, -1.5, 2.5]):
            got = layer(x)
    expected = base + torch.tensor([0.0, -1.5, 2.5]).view(3, 1, 1) * layer.scaling["default"] * (
        x @ a.T @ b.T
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0], base[0]), "strength 0 must add exactly nothing"


def test_per_layer_strengths_switch_off_the_whole_adapter(tiny_engine, tiny_references):
    """Strength 0 on every layer, given per layer, is the base; 1 on every layer is the fine-tune."""
    n_layers = len(tiny_engine.router.layers)
    rows = [Row("off", "off", (0.0,) * n_layers), Row("on", "on", (1.0,) * n_layers)]
    result = tiny_engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=24))
    assert result.panes["off"].token_ids == tiny_references[0]
    assert result.panes["on"].token_ids == tiny_references[1]


def test_sampled_sweep_is_reproducible(tiny_engine):
    first = _sweep(tiny_engine, [0, 1, 2], n=12, temperature=1.0, top_p=0.9, seed=7)
    assert first == _sweep(tiny_engine, [0, 1, 2], n=12, temperature=1.0, top_p=0.9, seed=7)


def test_concurrent_sweeps_equal_their_serial_results(tiny_engine):
    jobs = [[0.0, 1.0], [0.5, 2.0, -1.0], [1.5], [3.0, 0.0, 0.25, -2.0]]
    serial = [_sweep(tiny_engine, s, n=8) for s in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        parallel = list(pool.map(lambda s: _sweep(tiny_engine, s, n=8), jobs))
    assert parallel == serial


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "empty"),
        ("0, 1, x", "strength 3 must be a number"),
        ("0 1 2 3 0.5 1.5 2.5", "At most 6"),
        ("3.5", "between -2.0 and 3.0"),
        ("nan", "finite"),
        (None, "must be text"),
    ],
)
def test_bad_strengths_are_refused_with_a_message(text, message):
    with pytest.raises(InputError, match=message):
        parse_strengths(text)


def test_strengths_parse_commas_and_spaces():
    assert parse_strengths("0, 0.5 1,1.5,  2") == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert parse_strengths(" -2 3 ") == [-2.0, 3.0]


def test_compare_strength_is_checked(tiny_engine):
    with pytest.raises(InputError, match="strength must be between"):
        tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=2), strength=4)


def test_stop_pressed_repeatedly_and_before_the_start(tiny_engine):
    stop = threading.Event()
    stop.set()
    stop.set()
    result = None
    for result in tiny_engine.stream(PROMPT, "both", GenerationSettings(max_new_tokens=300), stop_event=stop):  # noqa: B007
        stop.set()
    assert result.finished and result.panes[BASE].tokens <= 1
    assert tiny_engine.run(PROMPT, "base", GenerationSettings(max_new_tokens=3)).finished


def test_prompts_get_the_tokenizers_bos_but_typed_special_tokens_stay_text(tiny_pair):
    """Llama 3.1's tokenizer adds <|begin_of_text|>, which the lesson's pricer was trained and served with."""

    class BosTokenizer:
        """SmolLM2's tokenizer plus a BOS, as Llama 3.1's adds one (no Llama tokenizer can be downloaded here)."""

        def __init__(self, inner, bos_id):
            self.inner, self.bos_id = inner, bos_id

        def __call__(self, text, add_special_tokens=True, **kwargs):
            ids = self.inner(text, add_special_tokens=False, **kwargs)["input_ids"]
            return {"input_ids": ([self.bos_id] if add_special_tokens else []) + ids}

    engine = Engine(tiny_pair)
    plain, _ = engine.encode("Price is $ <|im_end|>", 4)
    assert not set(plain) & set(tiny_pair.tokenizer.all_special_ids)  # SmolLM2 adds none; typed ones are text
    engine.tokenizer = BosTokenizer(tiny_pair.tokenizer, 1)
    ids, _ = engine.encode("Price is $ <|im_end|>", 4)
    assert ids == [1] + plain


def test_ignore_eos_rules_out_only_the_end_tokens_and_runs_to_the_length(tiny_engine):
    from utils.runtime.generation import NoEndOfSequence as _NoEndOfSequence

    scores = torch.randn(2, 50, generator=torch.Generator().manual_seed(3))
    kept = scores.clone()
    out = _NoEndOfSequence([7, 9])(None, scores)
    assert torch.isinf(out[:, [7, 9]]).all() and (out[:, [7, 9]] < 0).all()
    others = [i for i in range(50) if i not in (7, 9)]
    assert torch.equal(out[:, others], kept[:, others])
    result = tiny_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=12, ignore_eos=True))
    for pane in result.panes.values():
        assert len(pane.token_ids) == 12
        assert not set(pane.token_ids) & set(tiny_engine.eos_ids)


def test_generation_and_forward_rows_run_on_the_engines_cpu_threads(tiny_pair, monkeypatch):
    """Both run in a thread of their own on `threads` torch threads; the calling thread's count is untouched."""
    from utils.runtime.engine import Engine

    engine = Engine(tiny_pair)
    assert engine.threads == tiny_pair.report.cpu_threads >= 1
    engine.threads = 2
    seen = []
    real_generate = engine.model.generate
    monkeypatch.setattr(
        engine.model, "generate", lambda **kw: seen.append(torch.get_num_threads()) or real_generate(**kw)
    )
    real_forward = engine.model.forward
    monkeypatch.setattr(
        engine.model,
        "forward",
        lambda *a, **kw: seen.append(torch.get_num_threads()) or real_forward(*a, **kw),
    )
    before = torch.get_num_threads()
    engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=2))
    seen_in_generation = len(seen)
    ids, _ = engine.encode(PROMPT, 1)
    engine.forward_rows([ids], [1.0])
    assert seen_in_generation >= 1 and len(seen) > seen_in_generation
    assert set(seen) == {2}
    assert torch.get_num_threads() == before


def test_the_header_says_how_many_cpu_threads_generate(tiny_pair, tiny_settings):
    import os
    from dataclasses import replace

    from utils.runtime.loading import AUTO_CPU_THREADS, generation_threads

    cores = len(os.sched_getaffinity(0))
    assert generation_threads(tiny_settings) == min(AUTO_CPU_THREADS, cores)
    assert generation_threads(replace(tiny_settings, cpu_threads=3)) == 3
    assert tiny_pair.report.cpu_threads == generation_threads(tiny_settings)
    assert f"CPU threads for generation and the token lens: {tiny_pair.report.cpu_threads}" in (
        tiny_pair.report.as_text()
    )


def test_threads_started_during_generation_keep_the_default(cache_dir):
    """The engine sets its thread count for its own thread only: a thread the web server starts meanwhile takes
    torch's default, so it never keeps a second OpenMP team alive."""
    import threading

    from utils.runtime import nf4_kernel
    from utils.runtime.threads import torch_threads

    if not nf4_kernel.cpu_has_avx2_fma():
        pytest.skip("the compiled library needs AVX2 and FMA")
    nf4_kernel.enable(cache_dir)
    assert nf4_kernel.STATE.registered, nf4_kernel.STATE.status
    seen = {}

    def in_new_thread(key):
        thread = threading.Thread(target=lambda: seen.update({key: torch.get_num_threads()}))
        thread.start()
        thread.join()

    in_new_thread("default")
    default = seen["default"]

    def work():
        with torch_threads(default + 1):
            seen["inside"] = torch.get_num_threads()
            in_new_thread("started_meanwhile")
        seen["after"] = torch.get_num_threads()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()
    assert seen == {"default": default, "inside": default + 1, "started_meanwhile": default, "after": default}
