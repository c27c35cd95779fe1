"""Architecture printouts: folding, the base view derived from a PEFT model, the diff, the meta reference."""

from __future__ import annotations

import time
import warnings

import pytest

from utils.analysis import architecture as arch
from utils.core.profiles import LoraSettings

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=128,
    max_position_embeddings=128,
)
TINY_LORA = LoraSettings(r=8, alpha=16)

BLOCK = ["  (attn): Attn(", "    (q): Linear(in_features=4, out_features=4, bias=False)", "  )", ")"]


def block(head: str) -> list[str]:
    return [head + "Block(", *BLOCK]


# ---------------------------------------------------------------------------------------------------
# Folding (pure text)


def test_fold_repeated_layers_folds_identical_siblings():
    text = "\n".join(["Model(", *["  " + s for s in block("(0): ") + block("(1): ") + block("(2): ")], ")"])
    folded = arch.fold_repeated_layers(text)
    assert folded.split("\n")[1] == "  (0-2): 3 x Block("
    assert folded.count("(q): Linear") == 1


def test_fold_merges_neighbouring_groups_and_is_idempotent():
    text = "\n".join([*block("(0-1): 2 x "), *block("(2): "), *block("(3-31): 29 x ")])
    folded = arch.fold_repeated_layers(text)
    assert folded == "\n".join(block("(0-31): 32 x "))
    assert arch.fold_repeated_layers(folded) == folded


def test_fold_keeps_different_or_non_adjacent_siblings():
    other = [s.replace("out_features=4", "out_features=8") for s in block("(1): ")]
    text = "\n".join([*block("(0): "), *other, *block("(3): ")])
    assert arch.fold_repeated_layers(text) == text


# ---------------------------------------------------------------------------------------------------
# A real NF4 model: the derived base printout is exactly the plain one


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(path)
    return path


def load_nf4(path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
    )
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, device_map="cpu")


def wrap(model, lora: LoraSettings = TINY_LORA, **extra):
    from peft import get_peft_model

    config = arch.peft_lora_config(lora)
    for key, value in extra.items():
        setattr(config, key, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(model, config)


@pytest.fixture(scope="module")
def tiny_pair(tiny_dir):
    """(str of the plain NF4 base, the same base wrapped by a q/k/v/o LoRA)."""
    base = load_nf4(tiny_dir)
    plain = str(base)
    return plain, wrap(base)


def test_peft_printout_shows_the_lora_wrappers(tiny_pair):
    _, peft_model = tiny_pair
    text = arch.architecture_printout(peft_model)
    for word in ("lora.Linear4bit(", "(base_layer): Linear4bit(", "lora_dropout", "lora_A", "lora_B"):
        assert word in text
    assert "(0-1): 2 x LlamaDecoderLayer(" in text


def test_base_printout_derived_from_peft_is_exact(tiny_pair):
    plain, peft_model = tiny_pair
    assert "Linear4bit(in_features=64, out_features=32, bias=False)" in plain
    assert arch.base_printout(peft_model) == plain
    assert arch.strip_adapter(str(peft_model)) == plain  # with the PeftModel / LoraModel header too


def test_base_printout_when_only_some_layers_are_wrapped(tiny_dir):
    """layers_to_transform=[1] splits the layers into (0) and (1) in the PEFT printout; the derived base
    folds them back into (0-1): 2 x, as the plain base prints."""
    base = load_nf4(tiny_dir)
    plain = str(base)
    peft_model = wrap(base, layers_to_transform=[1])
    assert "(0-1): 2 x" not in str(peft_model)
    assert arch.base_printout(peft_model) == plain


def test_annotated_diff_marks_what_the_adapter_added(tiny_pair):
    plain, peft_model = tiny_pair
    views = arch.architecture_views(None, peft_model)
    assert views.base_text == plain
    assert views.peft_text == str(peft_model)
    kinds = {d.kind for d in views.diff}
    assert kinds == {arch.SAME, arch.ADDED}  # nothing of the base is lost
    added = [d.text.strip() for d in views.diff if d.is_added]
    assert added[:2] == ["PeftModelForCausalLM(", "(base_model): LoraModel("]
    assert "(q_proj): lora.Linear4bit(" in added
    same = [d.text.strip() for d in views.diff if d.kind == arch.SAME]
    assert "(base_layer): Linear4bit(in_features=64, out_features=64, bias=False)" in same
    assert "(gate_proj): Linear4bit(in_features=64, out_features=128, bias=False)" in same
    # every line of the base is there, in order, once the added ones are taken out
    assert len(same) == len(plain.split("\n"))


def test_annotated_diff_annotates_each_lora_matrix(tiny_pair):
    """k_proj: A is 64 x 8 = 512, B is 8 x 32 = 256, the layer 8 x (64 + 32) = 768."""
    _, peft_model = tiny_pair
    text = arch.architecture_views(None, peft_model).diff_text
    assert (
        "+                 (lora_A): ModuleDict((default): Linear(in_features=64, out_features=8, bias=False))"
        "   # A: 64 x 8 = 512 params"
    ) in text
    assert (
        "(lora_B): ModuleDict((default): Linear(in_features=8, out_features=32, bias=False))   # B: 8 x 32"
        in text
    )
    assert (
        "+               (k_proj): lora.Linear4bit(   # r x (in + out) = 8 x (64 + 32) = 768 params" in text
    )
    assert (
        "\n                  (base_layer): Linear4bit(in_features=64, out_features=32, bias=False)\n" in text
    )


def test_annotated_diff_reports_lines_only_in_the_base():
    base = "M(\n  (a): A()\n  (b): B()\n)"
    diff = arch.annotated_diff(base, "M(\n  (a): A()\n)")
    assert [(d.kind, d.text.strip()) for d in diff] == [
        ("same", "M("),
        ("same", "(a): A()"),
        ("removed", "(b): B()"),
        ("same", ")"),
    ]
    assert arch.diff_text(diff).split("\n")[2] == "-   (b): B()"


@pytest.mark.parametrize("kind", ["phi3", "gpt2", "qwen2"])
def test_strip_adapter_on_meta_models_of_other_architectures(kind):
    """Plain (not 4-bit) lora.Linear wrappers, fused qkv_proj, Conv1D: the derived base equals str(base)."""
    from peft import get_peft_model
    from transformers import GPT2Config, Phi3Config, Qwen2Config

    from utils.analysis.sizing import build_meta_model

    config = {
        "phi3": lambda: Phi3Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "gpt2": lambda: GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
        "qwen2": lambda: Qwen2Config(**TINY, pad_token_id=0, bos_token_id=1, eos_token_id=2),
    }[kind]()
    plain = str(build_meta_model(config))
    lora = LoraSettings(r=4, alpha=8, target_modules=("all-linear",))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(
            build_meta_model(config), arch.peft_lora_config(lora), low_cpu_mem_usage=True
        )
    assert "lora.Linear(" in str(peft_model)
    assert arch.base_printout(peft_model) == plain


# ---------------------------------------------------------------------------------------------------
# The reference Llama-3.1-8B on the meta device


def test_reference_models_are_meta_nf4_and_cached():
    start = time.perf_counter()
    base, peft_model = arch.reference_models(LoraSettings())
    assert arch.reference_models(LoraSettings()) is arch.reference_models(LoraSettings())
    assert time.perf_counter() - start < 60
    t0 = time.perf_counter()
    arch.reference_models(LoraSettings())
    assert time.perf_counter() - t0 < 0.01
    assert {p.device.type for p in base.parameters()} == {"meta"}
    assert {p.device.type for p in peft_model.parameters()} == {"meta"}
    lora = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
    assert lora == 27_262_976  # 851,968 per layer x 32


def test_reference_views():
    views = arch.reference_views(LoraSettings())
    assert "(0-31): 32 x LlamaDecoderLayer(" in views.base_text
    assert "(q_proj): Linear4bit(in_features=4096, out_features=4096, bias=False)" in views.base_text
    assert "lora_" not in views.base_text
    for word in ("lora.Linear4bit(", "(base_layer): Linear4bit(", "lora_dropout", "lora_A", "lora_B"):
        assert word in views.peft_text
    assert "(0-31): 32 x LlamaDecoderLayer(" in views.peft_text
    text = views.diff_text
    assert "(lora_A): ModuleDict((default): Linear(in_features=4096, out_features=32, bias=False))" in text
    assert "# A: 4096 x 32 = 131,072 params" in text
    assert "# B: 32 x 1024 = 32,768 params" in text
    assert "# r x (in + out) = 32 x (4096 + 1024) = 163,840 params" in text
    assert {d.kind for d in views.diff} == {arch.SAME, arch.ADDED}
    assert arch.base_printout(arch.reference_models(LoraSettings())[1]) == views.base_text


def test_reference_with_a_missing_module_is_an_input_error():
    from utils.core.errors import InputError

    with pytest.raises(InputError, match="qkv_proj"):
        arch.reference_models(LoraSettings(target_modules=("qkv_proj",)))
