"""Several adapters on one base: loading (LORA_LENS_ADAPTERS, checkpoint folders, what is left out and why), and
each row of a mixed batch equal to a plain peft model with only that adapter loaded, scaled, run alone."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest
import torch

from tests.test_engine import _plain_greedy
from utils.core.errors import InputError, ProfileError
from utils.core.profiles import parse_adapter_list, read_settings, resolve_profile
from utils.core.seam import BASE, GenerationSettings, Row, Use
from utils.runtime import nf4_kernel
from utils.runtime.engine import Engine
from utils.runtime.loading import load_base, load_model_pair

PROMPT = "How much does this cost to the nearest dollar?\n\nSteel water bottle, 750 ml\n\nPrice is $"


@pytest.fixture(scope="module")
def adapter_dirs(extra_adapter_dirs, tiny_adapter_dir):
    """Three adapters of different r, alpha and targets on the tiny Llama (the first is the primary)."""
    return {"fine_tuned": tiny_adapter_dir, **extra_adapter_dirs}


@pytest.fixture(scope="module")
def multi_settings(tiny_settings, adapter_dirs):
    extras = (("second", str(adapter_dirs["second"])), ("third", str(adapter_dirs["third"])))
    return replace(tiny_settings, adapters=extras)


@pytest.fixture(scope="module")
def multi_engine(multi_settings):
    return Engine(load_model_pair(multi_settings, has_gpu=False))


def _alone(settings, adapter_dir, strength):
    """A plain peft model with only this adapter loaded, scaled by peft's own set_scale (None: no adapter)."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    model, tokenizer = load_base(resolve_profile(settings), settings, device="cpu")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=False).eval()
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.set_scale("default", strength)
    return model, tokenizer


CASES = [(None, 0.0), ("fine_tuned", 1.0), ("second", 0.7), ("third", 1.5), ("second", 1.0), ("third", -1.0)]


def _references(settings, adapter_dirs):
    out = {}
    for name, strength in CASES:
        model, tokenizer = _alone(settings, adapter_dirs.get(name), strength)
        out[(name, strength)] = _plain_greedy(model, tokenizer, PROMPT, 16)
    return out


@pytest.fixture(scope="module")
def references(multi_settings, adapter_dirs):
    return _references(multi_settings, adapter_dirs)


def test_the_settings_list_parses_and_refuses_what_cannot_load():
    assert parse_adapter_list("early=runs/a/checkpoint-100, runs/b,") == (
        ("early", "runs/a/checkpoint-100"),
        ("", "runs/b"),
    )
    assert read_settings({"LORA_LENS_ADAPTERS": ""}).adapters == ()
    assert read_settings({}).adapters is None
    for bad, message in [
        ("base=x", "not a usable adapter name"),
        ("a b=x", "not a usable adapter name"),
        ("name=", "names no adapter"),
        (",".join(f"a{i}=x{i}" for i in range(9)), "at most 8"),
    ]:
        with pytest.raises(ProfileError, match=message):
            parse_adapter_list(bad)


def test_every_adapter_is_listed_with_its_numbers(multi_engine, adapter_dirs):
    adapters = multi_engine.info.adapters
    assert [a["name"] for a in adapters] == [adapter_dirs["fine_tuned"].name, "second", "third"]
    assert [a["primary"] for a in adapters] == [True, False, False]
    assert [a["r"] for a in adapters] == [8, 4, 16]
    assert adapters[1]["targets"] == ["q_proj", "up_proj", "v_proj"]
    # r = 4 on q (64 -> 64), v (64 -> 32: 2 kv heads of 16) and up (64 -> 128), in 2 layers: r x in + out x r
    assert adapters[1]["parameters"] == 2 * ((4 * 64 + 64 * 4) + (4 * 64 + 32 * 4) + (4 * 64 + 128 * 4))
    for adapter in adapters:
        assert adapter["footprint_bytes"] == adapter["parameters"] * 4  # fp32 in memory
        assert adapter["file_bytes"] > adapter["parameters"] * 4  # the file adds its header


def test_each_row_of_a_mixed_batch_equals_its_adapter_alone(multi_engine, references):
    rows = [
        Row(f"p{i}", f"{name} {strength}", strength, adapter=name if name else None)
        for i, (name, strength) in enumerate(CASES)
    ]
    result = multi_engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=16))
    got = [result.panes[row.key].token_ids for row in rows]
    assert got == [references[case] for case in CASES]
    assert len({tuple(t) for t in got}) == len(CASES), "every adapter and strength must change the output"


def test_the_fused_kernel_serves_a_mixed_batch_alike(multi_settings, adapter_dirs):
    """With the project's CPU kernel serving every 4-bit layer (the stacked adapters in one call per layer,
    fp32 compute), against plain peft runs in the same mode."""
    with nf4_kernel.mode("fused", multi_settings.cache_dir):
        references = _references(multi_settings, adapter_dirs)
        engine = Engine(load_model_pair(multi_settings, has_gpu=False))
        rows = [Row(f"p{i}", "", s, adapter=n) for i, (n, s) in enumerate(CASES)]
        result = engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=16))
        plan = engine.router.plan_for([0.0, 1.0, 1.0, 1.0], [None, 0, 1, 2])
    assert all(fused is not None for fused, on in zip(plan.fused, plan.active, strict=True) if on), (
        "every adapted layer's stacked update must go through the kernel"
    )
    assert [result.panes[row.key].token_ids for row in rows] == [references[case] for case in CASES]


def test_teacher_forced_logits_equal_a_plain_forward_pass(multi_settings, adapter_dirs):
    """In fp32 compute (bf16 rounds differently for a batch of 6 and a batch of 1), to 1e-4."""
    settings = replace(multi_settings, compute_dtype="float32")
    engine = Engine(load_model_pair(settings, has_gpu=False))
    ids = engine.encode(PROMPT, 1)[0]
    uses = [Use(name, strength) for name, strength in CASES]
    logits = engine.forward_rows([ids] * len(uses), uses)
    for i, (name, strength) in enumerate(CASES):
        model, _ = _alone(settings, adapter_dirs.get(name), strength)
        with torch.inference_mode():
            plain = model(input_ids=torch.tensor([ids])).logits.float()
        torch.testing.assert_close(logits[i], plain[0], rtol=1e-4, atol=1e-4)


def test_the_stack_holds_each_adapter_once(multi_engine):
    """peft's lora_A / lora_B weights are views of the stacked tensors: no second copy of any adapter."""
    router = multi_engine.router
    for stack in router.stacks:
        for position, (lora_A, lora_B, _) in stack.parts.items():
            start, rank, _ = stack.spans[position]
            if len(stack.parts) > 1:
                assert lora_A.weight.untyped_storage().data_ptr() == stack.a.untyped_storage().data_ptr()
                assert lora_B.weight.untyped_storage().data_ptr() == stack.b.untyped_storage().data_ptr()
            assert torch.equal(stack.a[start : start + rank], lora_A.weight)
            assert torch.equal(stack.b[:, start : start + rank], lora_B.weight)
    assert sum(s.a.numel() + s.b.numel() for s in router.stacks) == sum(
        a["parameters"] for a in multi_engine.info.adapters
    )


def test_concurrent_requests_on_different_adapters_give_their_serial_results(multi_engine):
    jobs = [
        [Row("a", "", 1.0, adapter="second")],
        [Row("a", "", 1.0, adapter="third"), Row("b", "", 0.0, adapter=None)],
        [Row("a", "", 0.5, adapter="fine_tuned"), Row("b", "", 2.0, adapter="second")],
        [Row("a", "", 1.0, adapter="third"), Row("b", "", 1.0, adapter="second"), Row("c", "", 1.0)],
    ]

    def run(rows):
        result = multi_engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=8))
        return [result.panes[row.key].token_ids for row in rows]

    serial = [run(rows) for rows in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, jobs)) == serial


def test_an_unknown_adapter_is_named_with_the_loaded_ones(multi_engine):
    with pytest.raises(InputError, match="No adapter is called 'nope'.*second, third"):
        multi_engine.run_rows(PROMPT, [Row("a", "", 1.0, adapter="nope")])
    assert not multi_engine.lock.locked() and multi_engine.router.plan is None
    # strength 0 is the base whatever the row names
    result = multi_engine.run_rows(
        PROMPT, [Row(BASE, "", 0.0, adapter="nope")], GenerationSettings(max_new_tokens=2)
    )
    assert result.finished


def test_a_checkpoint_folder_adds_each_checkpoint_named_by_its_step(tmp_path, tiny_settings, adapter_dirs):
    run = tmp_path / "run"
    for step in (30, 10, 200):
        shutil.copytree(adapter_dirs["second"], run / f"checkpoint-{step}")
    (run / "checkpoint-200" / "trainer_state.json").write_text(json.dumps({"global_step": 200}))
    (run / "checkpoint-5").mkdir()  # no adapter inside: not a checkpoint
    (run / "logs").mkdir()
    settings = replace(tiny_settings, adapters=(("", str(run)), ("mine", str(run))))
    pair = load_model_pair(settings, has_gpu=False)
    names = [a.name for a in pair.adapters]
    assert names == [adapter_dirs["fine_tuned"].name, "step-10", "step-30", "step-200"]
    assert [a.step for a in pair.adapters[1:]] == [10, 30, 200]
    # the same folders listed again: left out with the reason, the rest load
    assert any(
        "Adapter mine-step-10 left out: the same adapter folder is listed twice" in n
        for n in pair.report.notices
    )


def test_missing_broken_and_foreign_adapters_are_left_out_with_the_reason(
    tmp_path, tiny_settings, adapter_dirs, tiny_model_dir
):
    from utils.runtime.tiny import build_random_llama, build_random_lora

    broken = tmp_path / "broken"
    shutil.copytree(adapter_dirs["second"], broken)
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    wide = build_random_llama(tmp_path / "wide", tiny_model_dir, hidden_size=96)
    foreign = build_random_lora(wide, tmp_path / "foreign")
    settings = replace(
        tiny_settings,
        adapters=(
            ("gone", str(tmp_path / "missing")),
            ("broken", str(broken)),
            ("foreign", str(foreign)),
            ("second", str(adapter_dirs["second"])),
        ),
    )
    pair = load_model_pair(settings, has_gpu=False)
    assert [a.name for a in pair.adapters] == [adapter_dirs["fine_tuned"].name, "second"]
    notices = "\n".join(pair.report.notices)
    assert "Adapter gone left out" in notices and "does not exist" in notices
    assert "Adapter broken left out" in notices and "not a readable safetensors file" in notices
    assert "Adapter foreign left out" in notices and "made for another base" in notices
    engine = Engine(pair)
    result = engine.run_rows(
        PROMPT, [Row("a", "", 1.0, adapter="second")], GenerationSettings(max_new_tokens=2)
    )
    assert result.finished


def test_more_than_eight_adapters_leave_the_rest_out(tmp_path, tiny_settings, adapter_dirs):
    extras = []
    for i in range(9):
        shutil.copytree(adapter_dirs["second"], tmp_path / f"copy{i}")
        extras.append((f"copy{i}", str(tmp_path / f"copy{i}")))
    pair = load_model_pair(replace(tiny_settings, adapters=tuple(extras[:8])), has_gpu=False)
    assert len(pair.adapters) == 8
    assert any("Adapter copy7 left out: more than 8 adapters" in n for n in pair.report.notices)


@pytest.mark.slow
def test_the_demo_ships_a_checkpoint_series_each_row_token_exact(smollm2_pair, cache_dir):
    """The embedded default offers the base, three checkpoints and the final adapter; each row of one mixed
    batch equals a plain peft model with only that adapter loaded, run alone (SmolLM2 in NF4)."""
    from peft import PeftModel

    from utils.core.profiles import DEMO_ADAPTER_DIR, DEMO_CHECKPOINTS_DIR, Settings

    engine = Engine(smollm2_pair)
    adapters = engine.info.adapters
    assert [(a["name"], a["step"]) for a in adapters] == [
        ("final", 620),
        ("step-100", 100),
        ("step-200", 200),
        ("step-400", 400),
    ]
    assert [a["stored"] for a in adapters] == ["F32", "F16", "F16", "F16"]
    assert all(a["parameters"] == 3_686_400 and a["footprint_bytes"] == 4 * 3_686_400 for a in adapters)
    prompt = "How much does this cost to the nearest dollar?\n\nOak bookshelf, five shelves\n\nPrice is $"
    names = ["step-100", "step-200", "step-400", "final"]
    rows = [Row("base", "", 0.0, adapter=None)] + [Row(n, n, 1.0, adapter=n) for n in names]
    result = engine.run_rows(prompt, rows, GenerationSettings(max_new_tokens=10))
    settings = Settings(profile="smollm2-pricer", cache_dir=cache_dir, adapter="")
    folders = {"final": DEMO_ADAPTER_DIR} | {
        n: DEMO_CHECKPOINTS_DIR / f"checkpoint-{n[5:]}" for n in names[:3]
    }
    for row in rows:
        model, tokenizer = load_base(resolve_profile(settings), settings, device="cpu")
        if row.adapter:
            model = PeftModel.from_pretrained(model, str(folders[row.adapter]), is_trainable=False).eval()
        assert result.panes[row.key].token_ids == _plain_greedy(model, tokenizer, prompt, 10), row.key
