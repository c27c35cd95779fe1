"""Size math: exact figures for the reference and SmolLM2; formula = meta = peft; NF4 = footprint; CLI."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import warnings

import pytest

from utils.analysis import sizing
from utils.core.errors import InputError
from utils.core.profiles import REFERENCE_CONFIG_DIR, REPO_ROOT, LoraSettings

QKVO = LoraSettings()  # r=32, alpha=64, q/k/v/o: the lesson's pricer
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)


def tiny_config(kind: str):
    """Small configs of several architectures, built in the test: nothing is downloaded."""
    from transformers import GPT2Config, LlamaConfig, Phi3Config, Qwen2Config

    if kind == "llama-gqa":
        return LlamaConfig(**TINY)
    if kind == "llama-tied":
        return LlamaConfig(**TINY, tie_word_embeddings=True)
    if kind == "llama-bias":
        return LlamaConfig(**TINY, attention_bias=True, mlp_bias=True)
    if kind == "qwen2-bias":  # q/k/v carry a bias, o does not
        return Qwen2Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "phi3-fused":  # one qkv_proj of (4 + 2 + 2) x 16 = 128 outputs, one gate_up_proj
        return Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if kind == "gpt2-conv1d":  # Conv1D instead of nn.Linear, tied embeddings
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64)
    raise ValueError(kind)


# ---------------------------------------------------------------------------------------------------
# Pure math


@pytest.mark.parametrize(
    ("in_f", "out_f", "r", "expected"),
    [(4096, 4096, 32, 262_144), (4096, 1024, 32, 163_840), (576, 192, 32, 24_576), (64, 64, 8, 1_024)],
)
def test_lora_params(in_f, out_f, r, expected):
    """r x (in + out): 32 x (4096 + 1024) = 163,840; 32 x (576 + 192) = 24,576."""
    assert sizing.lora_params(in_f, out_f, r) == expected


@pytest.mark.parametrize(("numel", "expected"), [(4096 * 4096, 8_388_608), (4096, 2048), (3, 2), (1, 1)])
def test_nf4_bytes_packs_two_weights_per_byte(numel, expected):
    assert sizing.nf4_bytes(numel) == expected


def test_nf4_quant_state_bytes():
    """4096 weights: 64 blocks -> 64 uint8 absmax + 1 fp32 absmax2 + fp32 offset + 16 + 256 fp32 codes."""
    assert sizing.nf4_quant_state_bytes(4096) == 64 + 4 + 4 + 64 + 1024


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (109_051_904, "109.05 MB"),
        (5_591_539_712, "5.59 GB"),
        (32_121_044_992, "32.12 GB"),
        (512, "512 bytes"),
    ],
)
def test_format_bytes_uses_decimal_units(n, text):
    assert sizing.format_bytes(n) == text


# ---------------------------------------------------------------------------------------------------
# The reference: Llama-3.1-8B from the shipped config


@pytest.fixture(scope="module")
def reference():
    return sizing.size_report("llama31-pricer", QKVO)


def test_reference_config_is_shipped():
    data = json.loads((REFERENCE_CONFIG_DIR / "config.json").read_text())
    assert data["architectures"] == ["LlamaForCausalLM"]
    assert (data["hidden_size"], data["num_hidden_layers"], data["num_key_value_heads"]) == (4096, 32, 8)
    assert data["rope_scaling"]["rope_type"] == "llama3" and data["tie_word_embeddings"] is False


def test_reference_adapter_size(reference):
    """Per layer: q 32*(4096+4096) + k 32*(4096+1024) + v same + o same as q = 851,968;
    x 32 layers = 27,262,976 params; x 4 bytes = 109,051,904 bytes = 109.05 MB."""
    a = reference.adapter
    assert [(m.name, m.in_features, m.out_features, m.count) for m in a.modules] == [
        ("q_proj", 4096, 4096, 32),
        ("k_proj", 4096, 1024, 32),
        ("v_proj", 4096, 1024, 32),
        ("o_proj", 4096, 4096, 32),
    ]
    assert a.per_layer_params == 851_968
    assert a.params == 27_262_976
    assert a.bytes_fp32 == 109_051_904
    assert a.bytes_bf16 == 54_525_952
    assert a.tensors == 256


def test_reference_base_size(reference):
    """Linear weights 6,979,321,856 / 2 = 3,489,660,928 bytes in NF4; embed + lm_head 2 x 128256 x 4096
    plus 65 x 4096 norm weights = 1,050,939,392 params stay bf16 = 2,101,878,784 bytes; sum 5,591,539,712."""
    b = reference.base
    assert b.params == 8_030_261_248
    assert b.bytes_fp32 == 32_121_044_992
    assert b.quantized_params == 6_979_321_856
    assert b.kept_params == 2 * 128_256 * 4096 + 65 * 4096
    assert b.kept_dtype == "bfloat16"
    assert b.nf4_weight_bytes == 5_591_539_712
    assert b.nf4_footprint == 5_591_539_712 + 512  # inv_freq + original_inv_freq: 2 x 64 fp32
    assert reference.nf4_with_adapter_bytes == 5_591_539_712 + 109_051_904 == 5_700_591_616
    assert sizing.format_bytes(reference.nf4_with_adapter_bytes) == "5.70 GB"


def test_reference_formula_lines(reference):
    lines = sizing.formula_lines(reference.adapter)
    assert lines[:4] == [
        "q_proj: 4096x32 + 32x4096 = 262,144",
        "k_proj: 4096x32 + 32x1024 = 163,840",
        "v_proj: 4096x32 + 32x1024 = 163,840",
        "o_proj: 4096x32 + 32x4096 = 262,144",
    ]
    assert "per layer: 851,968" in lines
    assert "x 32 layers = 27,262,976 params" in lines
    assert "x 4 bytes (fp32) = 109,051,904 bytes = 109.05 MB" in lines


def test_reference_formula_path_agrees_with_meta_model():
    formula = sizing.adapter_size(REFERENCE_CONFIG_DIR, QKVO, use_formula=True)
    assert formula.params == 27_262_976
    assert sizing.llama_base_params(sizing.load_config(REFERENCE_CONFIG_DIR)) == 8_030_261_248


def test_meta_model_allocates_nothing():
    model = sizing.build_meta_model(sizing.load_config(REFERENCE_CONFIG_DIR))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.num_parameters() == 8_030_261_248


# ---------------------------------------------------------------------------------------------------
# SmolLM2-135M


def test_smollm2_sizes():
    """30 layers, hidden 576, k/v 3 heads x 64 = 192: per layer 32 * (2*1152 + 2*768) = 122,880;
    x 30 = 3,686,400. Base: 49152*576 + 30 * (884,736 + 2,654,208 + 1,152) + 576 = 134,515,008
    (lm_head tied to the embeddings)."""
    report = sizing.size_report(REPO_ROOT / "configs" / "smollm2-135m", QKVO)
    assert report.adapter.params == 3_686_400
    assert report.adapter.bytes_fp32 == 14_745_600
    assert [(m.name, m.out_features) for m in report.adapter.modules][:2] == [
        ("q_proj", 576),
        ("k_proj", 192),
    ]
    assert report.base.params == 134_515_008
    # the shipped copy is float32 like the converted cache: embeddings and norms stay 4 bytes each in NF4
    assert report.base.nf4_weight_bytes == 106_168_320 // 2 + 4 * (28_311_552 + 61 * 576)


def test_shipped_smollm2_config_matches_the_cache(cache_dir):
    from utils.runtime.embedded import cached_dir

    cached = cached_dir(cache_dir) / "config.json"
    if not cached.is_file():
        pytest.skip("the embedded model has not been converted on this machine")
    shipped = json.loads(sizing.SHIPPED_SMOLLM2_CONFIG.read_text())
    assert shipped == json.loads(cached.read_text())
    assert "quantization_config" not in shipped


# ---------------------------------------------------------------------------------------------------
# Formula = meta model = peft, across architectures


@pytest.mark.parametrize("kind", ["llama-gqa", "llama-tied", "llama-bias"])
def test_llama_formula_matches_meta_model(kind):
    config = tiny_config(kind)
    assert sizing.llama_linear_layers(config) == sizing.linear_layers(config)
    assert sizing.llama_base_params(config) == sizing.base_size(config).params


def _peft_meta_count(config, lora: LoraSettings) -> int:
    from peft import get_peft_model

    from utils.analysis.architecture import peft_lora_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(
            sizing.build_meta_model(config), peft_lora_config(lora), low_cpu_mem_usage=True
        )
    assert {p.device.type for p in model.parameters()} == {"meta"}
    return sizing.peft_lora_count(model)[1]


@pytest.mark.parametrize(
    ("kind", "targets", "expected"),
    [
        # 2 layers x 8 x [(64+64) + (64+32) + (64+32) + (64+64)] = 2 x 8 x 448
        ("llama-gqa", ("q_proj", "k_proj", "v_proj", "o_proj"), 7_168),
        ("llama-tied", ("q_proj", "v_proj"), 2 * 8 * (128 + 96)),
        ("llama-bias", ("q_proj", "k_proj", "v_proj", "o_proj"), 7_168),  # LoRA adds no bias
        ("qwen2-bias", ("q_proj", "k_proj", "v_proj", "o_proj"), 7_168),
        # qkv_proj 64 -> 128, o_proj 64 -> 64: 2 x 8 x (192 + 128)
        ("phi3-fused", ("qkv_proj", "o_proj"), 2 * 8 * (192 + 128)),
        # all-linear: q k v o gate up down, no lm_head: 2 x 8 x (448 + 3 x 192)
        ("llama-gqa", ("all-linear",), 2 * 8 * (448 + 3 * 192)),
        # phi3 all-linear: qkv 192, o 128, gate_up 64 -> 256: 320, down 128 -> 64: 192
        ("phi3-fused", ("all-linear",), 2 * 8 * (192 + 128 + 320 + 192)),
        # gpt2 Conv1D: c_attn 64 -> 192, c_proj 64 -> 64, c_fc 64 -> 256, mlp.c_proj 256 -> 64
        ("gpt2-conv1d", ("all-linear",), 2 * 8 * (256 + 128 + 320 + 320)),
    ],
)
def test_formula_equals_peft_count_on_meta(kind, targets, expected):
    config = tiny_config(kind)
    lora = LoraSettings(r=8, alpha=16, target_modules=targets)
    assert sizing.adapter_size(config, lora).params == expected
    assert _peft_meta_count(config, lora) == expected


def test_tied_embeddings_are_counted_once():
    untied, tied = sizing.base_size(tiny_config("llama-gqa")), sizing.base_size(tiny_config("llama-tied"))
    assert untied.params - tied.params == 128 * 64


def test_biases_stay_out_of_nf4():
    """llama-bias: q/k/v/o biases 64 + 32 + 32 + 64, mlp biases 128 + 128 + 64, per layer, kept 16/32-bit."""
    base = sizing.base_size(tiny_config("llama-bias"))
    assert dict(base.kept)["bias of 4-bit layers"] == 2 * (192 + 320)


def test_missing_target_module_lists_the_linear_layers():
    lora = LoraSettings(target_modules=("q_proj", "qkv"))
    with pytest.raises(InputError) as err:
        sizing.adapter_size(tiny_config("llama-gqa"), lora)
    message = str(err.value)
    assert (
        "qkv" in message
        and "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head" in message
    )


@pytest.mark.parametrize("r", [0, -4])
def test_non_positive_rank_is_an_input_error(r):
    with pytest.raises(InputError, match="positive integer"):
        sizing.adapter_size(tiny_config("llama-gqa"), LoraSettings(r=r))


def test_missing_config_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="No config.json"):
        sizing.load_config(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------
# A real NF4 model on CPU: the formula against get_memory_footprint() and the adapter file


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two tiny random Llamas saved in fp32 (untied and tied), to be loaded in NF4."""
    import torch
    from transformers import LlamaForCausalLM

    dirs = {}
    for kind in ("llama-gqa", "llama-tied"):
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(kind)
        LlamaForCausalLM(tiny_config(kind)).save_pretrained(path)
        dirs[kind] = path
    return dirs


def load_nf4(path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    kwargs = {} if dtype is None else {"dtype": dtype}
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu", **kwargs)


@pytest.mark.parametrize(
    ("kind", "kept"), [("llama-gqa", None), ("llama-gqa", "bfloat16"), ("llama-tied", None)]
)
def test_nf4_formula_equals_get_memory_footprint(tiny_dirs, kind, kept):
    """llama-gqa in fp32: linear 2 x (2048 + 1024 + 1024 + 2048 + 3 x 4096) = 36,864 bytes packed,
    embed + lm_head 2 x 128 x 64 x 4 = 65,536, norms 5 x 64 x 4 = 1,280, buffers 2 x 8 x 4 = 64: 103,744."""
    import torch

    model = load_nf4(tiny_dirs[kind], None if kept is None else getattr(torch, kept))
    base = sizing.base_size(sizing.load_config(tiny_dirs[kind]), kept)
    assert base.nf4_footprint == model.get_memory_footprint()
    if (kind, kept) == ("llama-gqa", None):
        assert base.nf4_footprint == 103_744
    real_state = sum(
        qs.absmax.numel() * qs.absmax.element_size()
        + qs.state2.absmax.numel() * 4
        + qs.offset.numel() * 4
        + qs.code.numel() * 4
        + qs.state2.code.numel() * 4
        for qs in (p.quant_state for p in model.parameters() if hasattr(p, "quant_state"))
    )
    assert base.quant_state_bytes == real_state


@pytest.fixture(scope="module")
def tiny_peft(tiny_dirs, tmp_path_factory):
    """The tiny NF4 Llama with a q/k/v/o LoRA (r=8), and that adapter saved to disk."""
    from peft import get_peft_model

    from utils.analysis.architecture import peft_lora_config

    lora = LoraSettings(r=8, alpha=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load_nf4(tiny_dirs["llama-gqa"]), peft_lora_config(lora))
    adapter_dir = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(adapter_dir)
    return model, adapter_dir, lora


def test_peft_footprint_adds_the_fp32_adapter(tiny_peft, tiny_dirs):
    """7,168 adapter params x 4 bytes = 28,672 bytes on top of the 103,744-byte NF4 base."""
    model, _, lora = tiny_peft
    report = sizing.size_report(sizing.load_config(tiny_dirs["llama-gqa"]), lora)
    assert model.get_memory_footprint() == report.nf4_with_adapter_footprint == 103_744 + 28_672


def test_cross_checks_agree(tiny_peft, tiny_dirs):
    model, adapter_dir, lora = tiny_peft
    checks = sizing.cross_checks(model, adapter_dir, sizing.load_config(tiny_dirs["llama-gqa"]), lora)
    assert checks.agree, checks.notes
    assert [r.source for r in checks.rows] == ["formula", "peft model", "adapter file"]
    assert {(r.tensors, r.params, r.bytes) for r in checks.rows} == {(16, 7_168, 28_672)}
    assert checks.notes == ()
    assert checks.table()[0][:4] == ["formula", "16", "7,168", "28,672"]


def test_cross_checks_explain_a_bf16_file(tiny_peft, tiny_dirs, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    model, adapter_dir, lora = tiny_peft
    tensors = load_file(adapter_dir / sizing.ADAPTER_FILE)
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, tmp_path / sizing.ADAPTER_FILE)
    checks = sizing.cross_checks(model, tmp_path, sizing.load_config(tiny_dirs["llama-gqa"]), lora)
    file_row = checks.rows[-1]
    assert checks.agree and (file_row.params, file_row.bytes) == (7_168, 14_336)
    assert any("BF16" in note for note in checks.notes)


def test_cross_checks_flag_other_settings(tiny_peft, tiny_dirs):
    model, adapter_dir, _ = tiny_peft
    checks = sizing.cross_checks(
        model, adapter_dir, sizing.load_config(tiny_dirs["llama-gqa"]), LoraSettings(r=16)
    )
    assert not checks.agree
    assert any("r = 8" in note for note in checks.notes)


def test_read_safetensors_header_without_weights(tmp_path):
    """Two F32 tensors 2x3 and 4: 10 params, 40 data bytes, header read straight from the file."""
    header = json.dumps(
        {
            "__metadata__": {"format": "pt"},
            "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
            "b": {"dtype": "F32", "shape": [4], "data_offsets": [24, 40]},
        }
    ).encode()
    path = tmp_path / "x.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(40))
    s = sizing.read_safetensors_header(path)
    assert (s.tensors, s.params, s.data_bytes, s.dtypes) == (2, 10, 40, ("F32",))
    assert s.file_bytes == 8 + len(header) + 40 == s.header_bytes + s.data_bytes


# ---------------------------------------------------------------------------------------------------
# Command line


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "utils.analysis.sizing", *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_prints_the_table():
    result = run_cli("llama31-pricer")
    assert result.returncode == 0, result.stderr
    for text in ("k_proj: 4096x32 + 32x1024 = 163,840", "x 32 layers = 27,262,976 params", "5,591,539,712"):
        assert text in result.stdout


@pytest.mark.slow
def test_cli_json(tmp_path):
    result = run_cli(str(REPO_ROOT / "configs" / "smollm2-135m" / "config.json"), "--r", "32", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["adapter_params"] == 3_686_400
    assert data["adapter_bytes_fp32"] == 14_745_600
    assert data["base_params"] == 134_515_008
    assert data["per_module"][1] == {
        "name": "k_proj",
        "in_features": 576,
        "out_features": 192,
        "a_params": 18_432,
        "b_params": 6_144,
        "params": 24_576,
        "count": 30,
        "total_params": 737_280,
    }


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("llama31-pricer", "--r", "0"), "positive integer"),
        (("llama31-pricer", "--r", "x"), "positive integer"),
        (("llama31-pricer", "--alpha", "-1"), "positive number"),
        (("no/such/config.json",), "No config.json"),
    ],
)
def test_cli_bad_arguments_exit_2(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


@pytest.mark.slow
def test_cli_unknown_module_exits_2():
    result = run_cli("llama31-pricer", "--target-modules", "q_proj,attn")
    assert result.returncode == 2
    assert "attn" in result.stderr and "gate_proj" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
