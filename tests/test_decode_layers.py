"""The compiled decode layer (csrc/decode_layer.cpp): transformers' LlamaDecoderLayer up to float32 rounding for
the decode steps it serves (its attention, norms and silu sum in another order: csrc/decode_math.cpp), with the
same greedy tokens, at every strength per row, with and without an adapter; the same bits whether each layer is
its own call or the decoder's layers are one (decode_stack), whether that call runs the layers in one parallel
region or not, on 1 or 2 threads, and whether a greedy run's steps go from the tokens to the next tokens several to a
compiled call (decode_steps) or not; transformers' own layer for everything else (a prefill, autograd, a hook, a batch the
strength plan is not for); and the embedded default's greedy answers token-exact with it on and off."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from utils.runtime import decode_layers, nf4_kernel

pytestmark = pytest.mark.skipif(
    not nf4_kernel.cpu_has_avx2_fma(), reason="the compiled layer calls the fused kernel (AVX2 and FMA)"
)


def _load_served(settings):
    """The pair loaded with the fused kernel serving it (on CPUs with AVX512-BF16 too)."""
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair

    with nf4_kernel.mode("fused", settings.cache_dir):
        pair = load_model_pair(settings, has_gpu=False)
    return Engine(pair)


@pytest.fixture(scope="module")
def served(tiny_settings):
    return _load_served(tiny_settings)


class CompiledCalls(dict):
    """How many times each compiled call ran; `layer_steps`: the decoder-layer steps they ran in all."""

    layers = 0

    @property
    def layer_steps(self) -> int:
        return self["decode_layer_output"] + self["decode_stack"] * self.layers


@pytest.fixture
def compiled_calls(monkeypatch, cache_dir, tiny_settings):
    import json

    assert nf4_kernel.enable(cache_dir) and nf4_kernel.STATE.registered, nf4_kernel.STATE.status
    calls = CompiledCalls(decode_attention_inputs=0, decode_layer_output=0, decode_stack=0)
    config = json.loads((Path(tiny_settings.base) / "config.json").read_text())
    calls.layers = config["num_hidden_layers"]
    for name in list(calls):
        real = getattr(torch.ops.lora_lens, name)

        def counted(*args, _real=real, _name=name):
            calls[_name] += 1
            return _real(*args)

        monkeypatch.setattr(torch.ops.lora_lens, name, counted, raising=False)
    return calls


def _decode_logits(engine, strengths, prompt_ids=(1, 5, 9, 14, 3), steps=4, adapters=None):
    """Logits of a prefill and `steps` greedy decode steps, one row per strength (of the adapter at each row's
    position in `adapters`: router.row_strengths)."""
    from utils.runtime.router import row_strengths

    model = engine.model
    rows = len(strengths)
    with engine.exclusive(), row_strengths(model, strengths, adapters), torch.inference_mode():
        out = model(input_ids=torch.tensor([list(prompt_ids)] * rows), use_cache=True)
        logits = [out.logits[:, -1]]
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out = model(input_ids=token, past_key_values=out.past_key_values, use_cache=True)
            logits.append(out.logits[:, -1])
    return torch.stack(logits)


def assert_same_up_to_rounding(compiled: torch.Tensor, plain: torch.Tensor) -> None:
    """Logits of the same steps: the same greedy token at every step and row, and every logit within float32
    rounding of transformers' (a wrong head, position or scale moves them by orders of magnitude more)."""
    assert torch.equal(compiled.argmax(-1), plain.argmax(-1))
    assert (compiled - plain).abs().max().item() <= 2e-5 * plain.abs().max().item()


def _with_switch(enabled: bool, work, stack: bool = True):
    decode_layers.SWITCH.enabled, decode_layers.SWITCH.stack = enabled, stack
    try:
        return work()
    finally:
        decode_layers.SWITCH.enabled = decode_layers.SWITCH.stack = True


@pytest.mark.parametrize("strengths", [[0.0, 1.0], [1.0], [-0.5, 2.0, 0.0]])
def test_decode_steps_are_transformers_up_to_rounding(served, strengths, compiled_calls):
    layers = served.model.config.num_hidden_layers
    plain = _with_switch(False, lambda: _decode_logits(served, strengths))
    assert compiled_calls.layer_steps == 0
    per_layer = _with_switch(True, lambda: _decode_logits(served, strengths), stack=False)
    assert compiled_calls == {
        "decode_attention_inputs": 4 * layers,
        "decode_layer_output": 4 * layers,
        "decode_stack": 0,
    }
    compiled = _with_switch(True, lambda: _decode_logits(served, strengths))
    assert compiled_calls["decode_stack"] == 4, "all layers of a decode step in one call"
    assert torch.equal(compiled, per_layer), "one call for all layers, or one a layer: the same operations"
    assert_same_up_to_rounding(compiled, plain)
    assert not torch.equal(compiled[1:, 0], _decode_logits(served, [7.0] * len(strengths))[1:, 0])


def test_an_adapter_on_every_linear_layer_at_per_layer_strengths(tiny_settings, tmp_path, compiled_calls):
    from utils.runtime.tiny import build_random_lora

    linears = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    adapter = build_random_lora(tiny_settings.base, tmp_path / "all-linear", target_modules=linears)
    engine = _load_served(replace(tiny_settings, adapter=str(adapter)))
    per_layer = [0.5 * (i % 3) for i in range(len(engine.router.layers))]  # some layers at 0, others not
    strengths = [1.0, per_layer]
    plain = _with_switch(False, lambda: _decode_logits(engine, strengths))
    compiled = _with_switch(True, lambda: _decode_logits(engine, strengths))
    assert compiled_calls.layer_steps == 4 * engine.model.config.num_hidden_layers
    assert_same_up_to_rounding(compiled, plain)


def test_the_header_says_how_many_layers_run_compiled(served):
    report = served.pair.report
    assert report.compiled_layers == report.layers == served.model.config.num_hidden_layers == 2
    assert "Decode steps: 2 of 2 decoder layers in compiled calls (csrc/decode_layer.cpp)" in report.as_text()


def test_a_base_only_model_takes_it_too(tiny_settings, compiled_calls):
    engine = _load_served(replace(tiny_settings, adapter=""))
    assert not engine.has_adapter
    plain = _with_switch(False, lambda: _decode_logits(engine, [0.0, 0.0]))
    compiled = _with_switch(True, lambda: _decode_logits(engine, [0.0, 0.0]))
    assert compiled_calls.layer_steps == 4 * engine.model.config.num_hidden_layers
    assert_same_up_to_rounding(compiled, plain)


@pytest.mark.parametrize(
    ("rows", "heads", "kv_heads", "head_dim", "cached"),
    [(2, 9, 3, 64, 45), (1, 4, 4, 128, 3), (5, 9, 3, 64, 8), (2, 8, 2, 64, 1100)],
)
def test_one_token_attention_is_sdpas(cache_dir, rows, heads, kv_heads, head_dim, cached):
    """Against torch's own attention: grouped heads, a cache that is a view of a longer buffer, lengths that are
    and are not whole vectors of 8, and one long enough to be split across threads."""
    assert nf4_kernel.enable(cache_dir) and nf4_kernel.STATE.registered, nf4_kernel.STATE.status
    generator = torch.Generator().manual_seed(rows * 1000 + cached)
    query = torch.randn(rows, heads, 1, head_dim, generator=generator)
    buffers = torch.randn(2, rows, kv_heads, cached + 128, head_dim, generator=generator) * 3
    keys, values = buffers[0].narrow(2, 0, cached), buffers[1].narrow(2, 0, cached)
    scaling = head_dim**-0.5
    expected = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, scale=scaling, enable_gqa=heads != kv_heads
    )
    got = torch.ops.lora_lens.one_token_attention(query, keys, values, scaling)
    assert got.shape == (rows, 1, heads * head_dim)
    torch.testing.assert_close(got, expected.transpose(1, 2).reshape(rows, 1, -1), rtol=1e-5, atol=1e-5)
    # shapes it does not take are left to ATen's attention
    assert (
        torch.ops.lora_lens.one_token_attention(
            query[..., :48].contiguous(), keys[..., :48], values[..., :48], scaling
        )
        is None
    )


def test_an_attention_mask_takes_the_stack_only_where_nothing_is_masked(served, compiled_calls):
    """generate() passes a mask every step: all ones (no padding) the stack serves the step, with the same
    logits as without a mask; a left-padded row takes transformers' layers, which apply the mask."""
    from utils.runtime.router import row_strengths

    def step_logits(mask_row0):
        model = served.model
        ids = torch.tensor([[1, 5, 9, 14], [2, 6, 9, 14]])
        mask = torch.tensor([mask_row0, [1, 1, 1, 1]])
        with served.exclusive(), row_strengths(model, [0.0, 1.0]), torch.inference_mode():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
            out = model(
                input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, use_cache=True
            )
        return out.logits[:, -1]

    unmasked = step_logits([1, 1, 1, 1])
    assert compiled_calls["decode_stack"] == 1
    padded = step_logits([0, 1, 1, 1])
    assert compiled_calls["decode_stack"] == 1, "a masked position: transformers' layers"
    assert not torch.equal(padded[0], unmasked[0])
    plain = _with_switch(False, lambda: step_logits([1, 1, 1, 1]))
    assert_same_up_to_rounding(unmasked, plain)


def test_a_prefill_and_autograd_take_transformers_layer(served, compiled_calls):
    from utils.runtime.router import row_strengths

    model = served.model
    with served.exclusive(), row_strengths(model, [1.0]):
        with torch.inference_mode():
            out = model(input_ids=torch.tensor([[1, 5, 9]]), use_cache=True)
        assert compiled_calls.layer_steps == 0, "a prefill is not a decode step"
        with torch.enable_grad():
            model(input_ids=torch.tensor([[4]]), past_key_values=out.past_key_values, use_cache=True)
    assert compiled_calls.layer_steps == 0


def test_a_hook_on_any_of_the_layers_modules_takes_transformers_layer(served, compiled_calls):
    seen = []
    down_proj = served.model.base_model.model.model.layers[0].mlp.down_proj
    handle = down_proj.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    try:
        hooked = _decode_logits(served, [0.0, 1.0], steps=2)
    finally:
        handle.remove()
    layers = served.model.config.num_hidden_layers
    assert len(seen) == 3, "the hook ran for the prefill and both decode steps"
    assert compiled_calls["decode_stack"] == 0, "a hooked layer takes the stack off"
    assert compiled_calls["decode_layer_output"] == 2 * (layers - 1), "only the hooked layer left the path"
    assert_same_up_to_rounding(
        hooked, _with_switch(False, lambda: _decode_logits(served, [0.0, 1.0], steps=2))
    )


def test_a_hook_on_every_module_takes_transformers_layer(served, compiled_calls):
    from torch.nn.modules.module import register_module_forward_hook

    seen = []
    handle = register_module_forward_hook(lambda module, args, output: seen.append(type(module).__name__))
    try:
        _decode_logits(served, [1.0], steps=1)
    finally:
        handle.remove()
    assert "LlamaMLP" in seen
    assert compiled_calls.layer_steps == 0
    _decode_logits(served, [1.0], steps=1)
    assert compiled_calls.layer_steps == served.model.config.num_hidden_layers


def test_a_batch_the_plan_is_not_for_still_gets_the_routers_message(served):
    from utils.core.errors import GenerationError
    from utils.runtime.router import row_strengths

    model = served.model
    with served.exclusive(), torch.inference_mode():
        with row_strengths(model, [0.0, 1.0]):
            out = model(input_ids=torch.tensor([[1, 5, 9]] * 2), use_cache=True)
        with row_strengths(model, [0.0, 1.0, 0.5]), pytest.raises(GenerationError, match="plan has 3 rows"):
            model(input_ids=torch.tensor([[4], [4]]), past_key_values=out.past_key_values, use_cache=True)


def test_it_is_not_set_up_where_the_kernel_does_not_serve_the_model(tiny_settings):
    from utils.runtime.loading import load_model_pair

    with nf4_kernel.mode("off", tiny_settings.cache_dir):
        pair = load_model_pair(tiny_settings, has_gpu=False)
    assert decode_layers.speed_up_decoder_layers(pair.model) == 0
    assert pair.report.compiled_layers == 0
    assert "Decode steps" not in pair.report.as_text()


@pytest.mark.slow
def test_smollm2_greedy_is_token_exact_with_transformers_layer(cache_dir):
    from tests.greedy import greedy_answers_with_and_without
    from utils.core.profiles import Settings

    engine = _load_served(Settings(profile="smollm2-pricer", cache_dir=cache_dir))
    runs = greedy_answers_with_and_without(engine, decode_layers.SWITCH)
    assert runs[True] == runs[False]


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def wide_heads(tmp_path_factory, embedded_dir, tiny_settings):
    """A random 2-layer Llama whose heads are 64 wide, as SmolLM2's and Llama 3.1's (the layers' one parallel
    region takes one_token_attention's loops, 64 dimensions a pass), with an r=8 LoRA on all seven linear layers
    and an r=4 one on q/v/up: rows on either, at any strength, or on the base."""
    from utils.runtime.tiny import build_random_llama, build_random_lora

    root = tmp_path_factory.mktemp("wide-heads")
    base = build_random_llama(
        root / "base",
        embedded_dir,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    first = build_random_lora(base, root / "all", target_modules=LINEARS)
    second = build_random_lora(
        base, root / "second", r=4, alpha=4, target_modules=("q_proj", "v_proj", "up_proj"), seed=2
    )
    settings = replace(tiny_settings, base=str(base), adapter=str(first), adapters=(("second", str(second)),))
    return _load_served(settings)


def _one_region_steps() -> int:
    """The decode steps the layers' one parallel region has served in this process."""
    return int(torch.ops.lora_lens.one_region_timing(False)[0])


ROWS = [([1.0], None), ([0.0, 1.0], None), ([0.0, 1.0, -0.5, 0.7, 2.0], [None, 0, 0, 1, 1])]


@pytest.fixture(params=[256, 512], ids=["avx2", "avx512"])
def loops(request, wide_heads):
    """The kernel's AVX2 loops, and its AVX-512 ones where the CPU runs them."""
    if request.param == 512 and not nf4_kernel.runs_avx512():
        pytest.skip("this CPU (or torch's setting) does not run AVX-512")
    torch.ops.lora_lens.set_vector_width(request.param)
    yield request.param
    torch.ops.lora_lens.set_vector_width(nf4_kernel.STATE.vector_bits)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("strengths", "adapters"), ROWS)
def test_the_layers_in_one_region_are_the_per_layer_calls_bit_for_bit(
    wide_heads, strengths, adapters, threads, loops
):
    from utils.runtime.threads import in_own_thread

    def logits(one_region: bool):
        decode_layers.SWITCH.one_region = one_region
        try:
            return in_own_thread(threads, lambda: _decode_logits(wide_heads, strengths, adapters=adapters))
        finally:
            decode_layers.SWITCH.one_region = True

    before = _one_region_steps()
    together = logits(True)
    assert _one_region_steps() - before == 4, "each decode step's layers in one region"
    apart = logits(False)
    assert _one_region_steps() - before == 4
    assert torch.equal(together, apart), "the same loops on the same values, whatever the region"
    plain = _with_switch(
        False,
        lambda: in_own_thread(threads, lambda: _decode_logits(wide_heads, strengths, adapters=adapters)),
    )
    assert_same_up_to_rounding(together, plain)


def test_one_region_serves_only_what_its_loops_take(served, compiled_calls):
    # the tiny Llama's heads are 16 wide: its steps take the per-layer calls inside decode_stack, same bits
    before = _one_region_steps()
    compiled = _decode_logits(served, [0.0, 1.0])
    assert compiled_calls["decode_stack"] == 4 and _one_region_steps() == before
    decode_layers.SWITCH.one_region = False
    try:
        assert torch.equal(compiled, _decode_logits(served, [0.0, 1.0]))
    finally:
        decode_layers.SWITCH.one_region = True


def test_the_region_times_its_parts_only_when_asked(wide_heads):
    timing = torch.ops.lora_lens.one_region_timing
    timing(False)  # cleared
    _decode_logits(wide_heads, [0.0, 1.0])
    assert timing(True)[1:] == [0.0, 0.0, 0.0, 0.0]
    _decode_logits(wide_heads, [0.0, 1.0])
    steps, products, attention, own_steps, waits = timing(False)
    assert steps >= 8 and products > 0 and attention > 0 and own_steps > 0 and waits >= 0


@pytest.mark.parametrize(("strengths", "adapters"), ROWS)
def test_a_greedy_runs_whole_step_is_its_steps_through_the_model_bit_for_bit(
    wide_heads, strengths, adapters, monkeypatch
):
    from tests.greedy import counting_compiled_steps
    from utils.runtime.greedy_loop import greedy_generate
    from utils.runtime.router import row_strengths
    from utils.runtime.threads import in_own_thread

    calls = counting_compiled_steps(monkeypatch)  # the steps each compiled call took
    model = wide_heads.model
    ids = torch.tensor([[1, 5, 9, 14, 3]] * len(strengths))

    def run(whole_step: bool):
        decode_layers.SWITCH.whole_step = whole_step
        try:
            with wide_heads.exclusive(), row_strengths(model, strengths, adapters), torch.inference_mode():
                out = greedy_generate(
                    model,
                    ids,
                    torch.ones_like(ids),
                    max_new_tokens=8,
                    eos_ids=[2],
                    pad_id=2,
                    ignore_eos=True,
                    keep_logits=True,
                )
            return out.sequences, torch.stack(out.logits)
        finally:
            decode_layers.SWITCH.whole_step = True

    whole = in_own_thread(2, lambda: run(True))
    assert calls == [1, 2, 4], (
        "every decode step from the tokens to the tokens in compiled calls of 1, 2, 4 steps"
    )
    through_model = in_own_thread(2, lambda: run(False))
    assert calls == [1, 2, 4]
    assert torch.equal(whole[0], through_model[0]) and torch.equal(whole[1], through_model[1])


@pytest.mark.slow
def test_smollm2_steps_are_the_same_bits_in_one_region_and_one_call(smollm2_pair):
    """The embedded default (its int8 output layer, 30 layers, 2 threads): the whole step and the one region
    against the per-layer calls through the model, token and logit exact, 1, 2 and 5 rows."""
    from utils.runtime.engine import Engine
    from utils.runtime.greedy_loop import greedy_generate
    from utils.runtime.router import row_strengths
    from utils.runtime.threads import in_own_thread

    engine = Engine(smollm2_pair)
    model = engine.model
    ids, _ = engine.encode("How much does this cost?\n\nSteel water bottle, 750 ml\n\nPrice is $", 16)

    def run(strengths, whole_step, one_region):
        decode_layers.SWITCH.whole_step, decode_layers.SWITCH.one_region = whole_step, one_region
        try:
            with engine.exclusive(), row_strengths(model, strengths), torch.inference_mode():
                batch = torch.tensor([ids] * len(strengths))
                out = greedy_generate(
                    model,
                    batch,
                    torch.ones_like(batch),
                    max_new_tokens=12,
                    eos_ids=engine.eos_ids,
                    pad_id=engine.pad_id,
                    ignore_eos=True,
                    keep_logits=True,
                )
            return out.sequences, torch.stack(out.logits)
        finally:
            decode_layers.SWITCH.whole_step = decode_layers.SWITCH.one_region = True

    for strengths in ([1.0], [0.0, 1.0], [0.0, 0.5, 1.0, 1.5, 2.0]):
        before = _one_region_steps()
        fast = in_own_thread(2, lambda s=strengths: run(s, True, True))
        assert _one_region_steps() - before == 11
        slow = in_own_thread(2, lambda s=strengths: run(s, False, False))
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])
