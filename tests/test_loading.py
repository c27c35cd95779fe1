"""Loading: NF4 base + LoRA through the app's own code, the report, and every way a load can go wrong."""

import json
import os
import shutil
from dataclasses import replace

import pytest
import torch

from utils.core.errors import AdapterLoadError, ModelLoadError
from utils.core.profiles import Settings, resolve_profile
from utils.runtime import embedded
from utils.runtime.loading import ADAPTER_NAME, load_base, load_model_pair, load_profile
from utils.runtime.tiny import TINY_LLAMA, build_random_llama, build_random_lora


def _lora_params(r: int) -> int:
    """r x (in + out) per target, per layer: q 64->64, k 64->32, v 64->32, o 64->64 (head_dim 16, 2 kv heads).

    Per layer r * ((64+64) + (64+32) + (64+32) + (64+64)) = 448 r; the tiny model has 2 layers.
    """
    return 2 * 448 * r


def test_tiny_pair_loads_in_nf4_with_the_adapter(tiny_pair, tiny_adapter_dir):
    from bitsandbytes.nn import Linear4bit
    from peft import PeftModel

    model, report = tiny_pair.model, tiny_pair.report
    assert isinstance(model, PeftModel)
    assert ADAPTER_NAME in model.peft_config
    assert any(isinstance(m, Linear4bit) for m in model.modules())
    assert report.precision == "nf4" and report.device == "cpu"
    assert report.adapter_params == _lora_params(8) == 7168
    assert report.adapter_file_bytes == (tiny_adapter_dir / "adapter_model.safetensors").stat().st_size
    assert report.footprint_with_adapter_bytes - report.base_footprint_bytes == 7168 * 4
    assert report.notices == []


def test_report_counts_logical_parameters(tiny_pair):
    """Embedding 49152 x 64 twice (untied) + 2 layers x (attention 64*(64+32+32+64) + MLP 3*64*128 + 2 norms of 64)
    + final norm 64."""
    per_layer = 64 * (64 + 32 + 32 + 64) + 3 * 64 * 128 + 2 * 64
    assert tiny_pair.report.base_params == 2 * 49152 * 64 + 2 * per_layer + 64


def test_report_lines_name_everything(tiny_pair):
    text = tiny_pair.report.as_text()
    for needle in ("NF4 on cpu", "Base parameters", "Adapter:", "7,168 parameters", "Load time"):
        assert needle in text


def test_full_precision_setting(tiny_settings):
    from dataclasses import replace

    pair = load_model_pair(replace(tiny_settings, precision="full"), has_gpu=False)

    assert pair.report.precision == "full"
    assert pair.report.compute_dtype == "float32"  # auto on a CPU: float32 on every kind (pick_compute_dtype)
    element = 4
    assert pair.report.base_footprint_bytes > element * 2 * 49152 * 64  # the embeddings alone, full precision


def test_missing_adapter_runs_base_only(tiny_settings, tmp_path):
    from dataclasses import replace

    pair = load_model_pair(replace(tiny_settings, adapter=str(tmp_path / "nope")), has_gpu=False)
    assert not pair.has_adapter
    assert pair.report.adapter is None
    assert "does not exist" in pair.report.notices[0]


def test_corrupt_adapter_runs_base_only(tiny_settings, tiny_adapter_dir, tmp_path):
    from dataclasses import replace

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((tiny_adapter_dir / "adapter_config.json").read_text())
    (bad / "adapter_model.safetensors").write_bytes(b"\x07garbage")
    pair = load_model_pair(replace(tiny_settings, adapter=str(bad)), has_gpu=False)
    assert not pair.has_adapter
    assert "not a readable safetensors file" in pair.report.notices[0]


def test_adapter_config_that_is_not_json(tiny_settings, tiny_adapter_dir, tmp_path):
    from dataclasses import replace

    bad = tmp_path / "badcfg"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("{not json")
    pair = load_model_pair(replace(tiny_settings, adapter=str(bad)), has_gpu=False)
    assert "not JSON" in pair.report.notices[0]


def test_adapter_for_another_base_is_refused(tiny_settings, tmp_path, embedded_dir):
    from dataclasses import replace

    other = build_random_llama(tmp_path / "wide", embedded_dir, hidden_size=128, intermediate_size=256)
    wrong = build_random_lora(other, tmp_path / "wide-lora")
    pair = load_model_pair(replace(tiny_settings, adapter=str(wrong)), has_gpu=False)
    assert not pair.has_adapter
    assert "made for another base" in pair.report.notices[0]


def test_adapter_targeting_absent_modules_is_refused(tiny_settings, tmp_path, tiny_model_dir):
    from dataclasses import replace

    mlp = build_random_lora(tiny_model_dir, tmp_path / "mlp-lora", target_modules=("gate_proj",))
    # Rename the tensors so they point at a module the base lacks.
    config = json.loads((mlp / "adapter_config.json").read_text())
    config["target_modules"] = ["gate_proj"]
    from safetensors.torch import load_file, save_file

    tensors = {
        k.replace("gate_proj", "gate_projection"): v
        for k, v in load_file(mlp / "adapter_model.safetensors").items()
    }
    save_file(tensors, mlp / "adapter_model.safetensors")
    pair = load_model_pair(replace(tiny_settings, adapter=str(mlp)), has_gpu=False)
    assert "lacks" in pair.report.notices[0]


def test_gated_base_without_token_fails_fast():
    profile = resolve_profile(Settings(profile="llama31-pricer"))
    with pytest.raises(ModelLoadError, match="HF_TOKEN"):
        load_base(profile, Settings(profile="llama31-pricer"), device="cpu")


def test_unreachable_base_is_described_not_traced(tmp_path):
    profile = resolve_profile(Settings(profile="custom", base="someone/not-here"))
    with pytest.raises(ModelLoadError) as info:
        load_base(
            profile, Settings(profile="custom", base="someone/not-here", cache_dir=tmp_path), device="cpu"
        )
    assert "someone/not-here" in str(info.value)
    assert "Traceback" not in str(info.value)


def test_adapter_load_error_is_a_user_message(tiny_pair, tmp_path):
    from utils.runtime.loading import attach_adapter

    with pytest.raises(AdapterLoadError, match="hub id"):
        attach_adapter(tiny_pair.model.get_base_model(), str(tmp_path / "missing"))


@pytest.mark.slow
def test_embedded_default_loads_in_nf4_and_reuses_the_cache(cache_dir, monkeypatch):
    from bitsandbytes.nn import Linear4bit

    folder = embedded.ensure_cache(cache_dir)
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_second_conversion(*args, **kwargs):
        raise AssertionError("the cache should have been reused")

    monkeypatch.setattr(embedded, "convert_to_cache", no_second_conversion)
    pair = load_profile(
        resolve_profile(Settings(profile="smollm2-pricer", cache_dir=cache_dir, adapter="")),
        Settings(cache_dir=cache_dir),
    )
    assert pair.report.base_params == 134_515_008
    assert any(isinstance(m, Linear4bit) for m in pair.model.modules())
    assert pair.report.base_footprint_bytes < 200_000_000  # 538 MB in fp32
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.slow
def test_unwritable_cache_still_starts(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    settings = Settings(profile="smollm2-pricer", adapter="", cache_dir=blocker / "cache")
    pair = load_model_pair(settings, has_gpu=False)
    assert pair.report.base_params == 134_515_008
    with pytest.raises(ModelLoadError, match="LORA_LENS_CACHE_DIR"):
        embedded.convert_to_cache(blocker / "cache")


@pytest.mark.slow
def test_gated_profile_without_token_falls_back_with_the_reason(cache_dir):
    pair = load_model_pair(Settings(profile="llama31-pricer", cache_dir=cache_dir), has_gpu=True)
    assert pair.profile.name == "smollm2-pricer"
    assert "HF_TOKEN" in pair.report.notices[0]
    assert "llama31-pricer" in pair.report.notices[0]


def test_tiny_model_fixture_shape():
    assert TINY_LLAMA["num_key_value_heads"] < TINY_LLAMA["num_attention_heads"]  # GQA, like Llama 3.1
    assert os.cpu_count() >= 1 and torch.get_num_threads() >= 1


def test_the_page_never_shows_server_folders_of_the_project():
    from utils.core.profiles import DEMO_ADAPTER_DIR
    from utils.runtime.adapter_set import shown_path as _shown_path

    assert _shown_path(str(DEMO_ADAPTER_DIR)) == "adapters/smollm2-pricer"
    assert _shown_path("ed-donner/pricer-2024-09-13_13.04.39") == "ed-donner/pricer-2024-09-13_13.04.39"


def test_cache_stamp_ignores_reinstall_times(tmp_path):
    """A fresh venv reinstalls the same GGUF with a new mtime; the shared cache must stay valid."""
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF" + bytes(range(256)) * 9000)
    before = embedded._source_stamp(fake)
    os.utime(fake, (1, 1))
    assert embedded._source_stamp(fake) == before
    fake.write_bytes(b"GGUF" + bytes(range(255, -1, -1)) * 9000)
    assert embedded._source_stamp(fake) != before


def test_an_adapter_alone_loads_on_the_base_its_config_names(tiny_adapter_dir, tiny_model_dir, cache_dir):
    """LORA_LENS_ADAPTER without LORA_LENS_BASE: the base is the one adapter_config.json names, not a
    built-in profile's (the tiny LoRA was saved from the tiny base, so its config names that folder)."""
    from utils.core.profiles import read_settings

    settings = replace(read_settings({"LORA_LENS_ADAPTER": str(tiny_adapter_dir)}), cache_dir=cache_dir)
    pair = load_model_pair(settings, has_gpu=False)
    assert pair.has_adapter and pair.profile.name == "custom"
    assert pair.profile.base == str(tiny_model_dir) == pair.report.base
    assert pair.report.asked.startswith(f"adapter {tiny_adapter_dir} on the base")
    assert pair.report.lines()[0] == f"Asked for: {pair.report.asked}"


@pytest.mark.slow
def test_an_adapter_that_names_no_base_asks_for_lora_lens_base(tiny_adapter_dir, tmp_path, cache_dir):
    from utils.core.profiles import read_settings

    nameless = tmp_path / "nameless"
    shutil.copytree(tiny_adapter_dir, nameless)
    config = json.loads((nameless / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = None
    (nameless / "adapter_config.json").write_text(json.dumps(config))
    pair = load_model_pair(replace(read_settings({"LORA_LENS_ADAPTER": str(nameless)}), cache_dir=cache_dir))
    assert pair.profile.name == "smollm2-pricer" and pair.report.adapter == "adapters/smollm2-pricer"
    notice = pair.report.notices[0]
    assert f"instead of adapter {nameless}" in notice and "Fix: set LORA_LENS_BASE" in notice


@pytest.mark.slow
def test_a_base_beside_a_built_in_profile_is_a_contradiction_named_in_the_header(tiny_model_dir, cache_dir):
    from ui import views
    from utils.core.profiles import read_settings

    environ = {"LORA_LENS_PROFILE": "smollm2-pricer", "LORA_LENS_BASE": str(tiny_model_dir)}
    pair = load_model_pair(replace(read_settings(environ), cache_dir=cache_dir), has_gpu=False)
    assert pair.profile.name == "smollm2-pricer"  # the embedded default, with the reason
    header = views.header_html(pair.report, pair.profile)
    for words in ("LORA_LENS_BASE=", "LORA_LENS_PROFILE=", "Fix: unset LORA_LENS_PROFILE", "Asked for: base"):
        assert words in header, words


def test_an_adapter_that_does_not_fit_the_base_names_the_variable_and_the_fix(
    tiny_settings, tmp_path, embedded_dir
):
    other = build_random_llama(tmp_path / "wide", embedded_dir, hidden_size=128, intermediate_size=256)
    wrong = build_random_lora(other, tmp_path / "wide-lora")
    pair = load_model_pair(replace(tiny_settings, adapter=str(wrong)), has_gpu=False)
    notice = pair.report.notices[0]
    assert f"LORA_LENS_ADAPTER='{wrong}'" in notice and "made for another base" in notice
    assert "Fix: point LORA_LENS_ADAPTER at a LoRA adapter trained on" in notice


@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_compute_follows_what_the_gpu_supports(monkeypatch, bf16, expected):
    """bf16 on Ampere and later; float16 on T4 / V100 Space hardware, where bf16 would be emulated."""
    from utils.runtime.loading import pick_compute_dtype

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: bf16)
    assert pick_compute_dtype(Settings(), "cuda") == expected
    assert pick_compute_dtype(Settings(zero_gpu=True), "cuda") == torch.bfloat16  # ZeroGPU: A100 / H200
    assert pick_compute_dtype(Settings(compute_dtype="float32"), "cuda") == torch.float32


def test_a_base_saved_in_nf4_loads_as_it_was_quantized(tmp_path, tiny_model_dir, tiny_settings, tiny_pair):
    """A pre-quantized bitsandbytes checkpoint (what a Space could preload instead of quantizing the 16 GB
    base at start) goes through the same loader, adapter attached, and gives the logits of quantizing on the fly."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from utils.runtime.loading import quantization_config

    compute_dtype = getattr(torch, tiny_pair.report.compute_dtype)  # as the loader quantizes on this CPU
    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, quantization_config=quantization_config(compute_dtype), device_map="cpu"
    )
    quantized.save_pretrained(tmp_path / "nf4")
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(tmp_path / "nf4")
    assert (
        json.loads((tmp_path / "nf4" / "config.json").read_text())["quantization_config"][
            "bnb_4bit_quant_type"
        ]
        == "nf4"
    )
    pair = load_model_pair(replace(tiny_settings, base=str(tmp_path / "nf4")), has_gpu=False)
    assert pair.has_adapter and not pair.report.notices
    ids = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(pair.model(ids).logits, tiny_pair.model(ids).logits)
