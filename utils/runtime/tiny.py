"""Random-weight Llama models and LoRA adapters built from a config, for tests and benchmarks.

They go through exactly the loading code the app uses (save to a folder, load in NF4, attach with peft), so
the quantized path is exercised without downloading anything. The tokenizer is borrowed from the embedded
SmolLM2 cache: real text in, real tokens out, only the weights are random.
"""

from __future__ import annotations

from pathlib import Path

TINY_LLAMA = dict(  # small enough to load and generate in well under a second on a CPU
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)


def build_random_llama(folder: Path, tokenizer_dir: Path, seed: int = 0, **overrides) -> Path:
    """Save a randomly initialised LlamaForCausalLM (+ the tokenizer) to `folder`; returns the folder."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    settings = {**TINY_LLAMA, **overrides}
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_random_lora(
    model_dir: Path,
    adapter_dir: Path,
    r: int = 8,
    alpha: int = 16,
    target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
    seed: int = 1,
) -> Path:
    """Save a LoRA whose B matrices are non-zero (init_lora_weights=False), so it changes the output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, config)
    model.save_pretrained(adapter_dir)
    return Path(adapter_dir)
