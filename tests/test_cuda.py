"""The CUDA path, run where a GPU is present (marker `gpu`; skipped elsewhere): the embedded default in NF4 on
the GPU with the compute dtype the GPU supports, every row of one batch equal to a plain peft run of that
adapter setting, the token lens against a plain forward pass, and one Compare run with its prices and token
lens from one call, as on ZeroGPU."""

import pytest
import torch

pytestmark = pytest.mark.gpu

PROMPT_TOKENS = 8


@pytest.fixture(scope="module")
def cuda_pair(cache_dir):
    from utils.core.profiles import SMOLLM2_PRICER, Settings
    from utils.runtime.loading import load_profile

    return load_profile(
        SMOLLM2_PRICER, Settings(profile="smollm2-pricer", cache_dir=cache_dir), device="cuda"
    )


@pytest.fixture(scope="module")
def prompt():
    from utils.task.catalog import example_descriptions
    from utils.task.pricing import build_prompt

    return build_prompt(example_descriptions(1)[0])


def plain_ids(pair, prompt: str, n: int, adapter: bool) -> list[int]:
    """One row through plain generate() on the GPU, the adapter disabled for the base; cut at the first EOS."""
    model, tokenizer = pair.model, pair.tokenizer
    ids = tokenizer(prompt, split_special_tokens=True, return_tensors="pt").input_ids.to(model.device)
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    with torch.inference_mode():
        if adapter:
            out = model.generate(**kwargs, pad_token_id=tokenizer.pad_token_id)
        else:
            with model.disable_adapter():
                out = model.generate(**kwargs, pad_token_id=tokenizer.pad_token_id)
    new = out[0, ids.shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    return new[: next((i for i, t in enumerate(new) if t in eos), len(new))]


def test_nf4_on_cuda_computes_in_the_dtype_the_gpu_supports(cuda_pair):
    expected = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
    assert cuda_pair.report.device.startswith("cuda") and cuda_pair.report.compute_dtype == expected
    assert cuda_pair.report.adapter_params == 3_686_400  # the demo adapter: r=32 on q/k/v/o of 30 layers


def test_each_row_of_one_batch_equals_a_plain_peft_run(cuda_pair, prompt):
    """The strength router on CUDA: s = 0 is the base, s = 1 the fine-tune, each token-exact."""
    from utils.core.seam import BASE, FINE_TUNED, GenerationSettings, Row
    from utils.runtime.engine import Engine

    engine = Engine(cuda_pair)
    rows = [*engine.rows_for("both"), Row("zero", "s = 0", 0.0)]
    result = engine.run_rows(prompt, rows, GenerationSettings(max_new_tokens=PROMPT_TOKENS))
    assert result.panes[BASE].token_ids == plain_ids(cuda_pair, prompt, PROMPT_TOKENS, adapter=False)
    assert result.panes[FINE_TUNED].token_ids == plain_ids(cuda_pair, prompt, PROMPT_TOKENS, adapter=True)
    assert result.panes["zero"].token_ids == result.panes[BASE].token_ids


def test_the_token_lens_matches_a_plain_forward_pass(cuda_pair, prompt):
    from utils.analysis.token_lens import score_texts
    from utils.runtime.engine import Engine

    engine = Engine(cuda_pair)
    prompt_ids, _ = engine.encode(prompt, PROMPT_TOKENS)
    text = plain_ids(cuda_pair, prompt, PROMPT_TOKENS, adapter=True)
    scored = score_texts(engine, prompt_ids, {"fine_tuned": text}, 1.0)["fine_tuned"]
    ids = torch.tensor([prompt_ids + text], device=cuda_pair.model.device)
    with torch.inference_mode():
        logprobs = torch.log_softmax(cuda_pair.model(ids).logits.float(), dim=-1)[0]
    expected = [float(logprobs[len(prompt_ids) - 1 + i, t]) for i, t in enumerate(text)]
    assert [t.logprob_fine_tuned for t in scored.tokens] == pytest.approx(expected, abs=0.05)


def test_a_compare_run_brings_its_prices_and_token_lens_in_one_call(cuda_pair, prompt):
    from ui.lens import After, Lens
    from utils.core.seam import GenerationSettings
    from utils.runtime.engine import Engine

    lens = Lens(Engine(cuda_pair))
    rows = lens.backend.rows_for("both")
    result, after = lens.run(prompt, rows, GenerationSettings(max_new_tokens=6), After(64, 1.0))
    assert set(after.next_views) == set(after.scored) == set(result.panes)


def test_several_adapters_in_one_batch_each_equal_that_adapter_alone(cuda_pair, prompt, cache_dir):
    """The stacked adapters on CUDA (the torch path with a per-row block mask): base, three checkpoints and
    the final adapter in one batch, each row token-exact with a plain peft model holding only that adapter."""
    from peft import PeftModel

    from utils.core.profiles import DEMO_ADAPTER_DIR, DEMO_CHECKPOINTS_DIR, SMOLLM2_PRICER, Settings
    from utils.core.seam import GenerationSettings, Row
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_base

    engine = Engine(cuda_pair)
    names = ["step-100", "step-200", "step-400", "final"]
    assert engine.adapter_names == ["final", "step-100", "step-200", "step-400"]
    rows = [Row("base", "", 0.0, adapter=None)] + [Row(n, n, 1.0, adapter=n) for n in names]
    result = engine.run_rows(prompt, rows, GenerationSettings(max_new_tokens=PROMPT_TOKENS))
    folders = {"final": DEMO_ADAPTER_DIR} | {
        n: DEMO_CHECKPOINTS_DIR / f"checkpoint-{n[5:]}" for n in names[:3]
    }
    settings = Settings(profile="smollm2-pricer", cache_dir=cache_dir)
    for row in rows[1:]:
        model, tokenizer = load_base(SMOLLM2_PRICER, settings, device="cuda")
        model = PeftModel.from_pretrained(model, str(folders[row.adapter]), is_trainable=False).eval()
        alone = type(cuda_pair)(model, tokenizer, cuda_pair.profile, cuda_pair.report)
        assert result.panes[row.key].token_ids == plain_ids(alone, prompt, PROMPT_TOKENS, adapter=True), (
            row.key
        )


def test_merge_routes_and_mixed_prompt_formats_on_cuda(cuda_pair, prompt):
    """The merge check's copies on the GPU (the nf4 route re-quantized there, the fp32 copy as the unmerged
    adapter), and two panes in different prompt formats in one left-padded CUDA batch, each equal to its
    format run alone."""
    from utils.analysis import merge_check
    from utils.core.prompt_format import PromptFormat, format_rows
    from utils.core.seam import FINE_TUNED, GenerationSettings
    from utils.runtime.engine import Engine

    engine = Engine(cuda_pair)
    with engine.adapter_weights() as layers:
        lost = merge_check.survival(layers[:4], ["nf4", "fp32"])
    assert all(m.lost["fp32"] < 1e-5 and m.lost["nf4"] > 0.5 for m in lost)
    ids = engine.encode(prompt, 8)[0]
    runs = engine.merged_runs(FINE_TUNED, ["fp32"], [ids + [28, 29]], [len(ids) - 1], [prompt], 6)
    tuned = engine.run_rows(prompt, engine.rows_for("fine_tuned"), GenerationSettings(max_new_tokens=6))
    assert runs["fp32"].texts == [tuned.text(FINE_TUNED)] and max(runs["fp32"].kl[0]) < 1e-2
    rows = engine.rows_for("both")
    formats = {rows[0].key: PromptFormat(), rows[1].key: PromptFormat("chat")}
    formatted, _ = format_rows(engine, "Name a colour.", rows, formats, 8)
    together = engine.run_rows("Name a colour.", formatted, GenerationSettings(max_new_tokens=8))
    for row in formatted:
        alone = engine.run_rows("Name a colour.", [row], GenerationSettings(max_new_tokens=8))
        assert together.panes[row.key].token_ids == alone.panes[row.key].token_ids
