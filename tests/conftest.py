"""Shared fixtures: offline hub, a tiny random Llama with a LoRA saved to disk, the embedded model cache."""

from __future__ import annotations

import os
import shutil

import pytest


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """No test may reach a model hub: the machines that run them have none."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs CUDA")
    skip_browser = pytest.mark.skip(reason="needs Debian's chromium (apt-get install chromium)")
    has_chromium = shutil.which("chromium") is not None
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "browser" in item.keywords and not has_chromium:
            item.add_marker(skip_browser)


@pytest.fixture(scope="session")
def cache_dir():
    """The same converted-model cache the app uses, so the suite converts the GGUF at most once."""
    from utils.core.profiles import read_settings

    return read_settings(dict(os.environ)).cache_dir


@pytest.fixture(scope="session")
def embedded_dir(cache_dir):
    """The converted SmolLM2 folder (config, safetensors, tokenizer); converts once if missing."""
    from utils.runtime.embedded import ensure_cache

    return ensure_cache(cache_dir)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_dir):
    """A random 2-layer Llama with SmolLM2's tokenizer, saved like any hub model."""
    from utils.runtime.tiny import build_random_llama

    return build_random_llama(tmp_path_factory.mktemp("tiny-llama"), embedded_dir)


@pytest.fixture(scope="session")
def tiny_adapter_dir(tmp_path_factory, tiny_model_dir):
    """A non-trivial LoRA (B != 0) on q/k/v/o of the tiny Llama."""
    from utils.runtime.tiny import build_random_lora

    return build_random_lora(tiny_model_dir, tmp_path_factory.mktemp("tiny-lora"))


@pytest.fixture(scope="session")
def extra_adapter_dirs(tmp_path_factory, tiny_model_dir):
    """Two more LoRAs on the tiny Llama, of other r, alpha and targets than tiny_adapter_dir (r=8 on q/k/v/o):
    "second" r=4 on q/v/up, "third" r=16 on q/o/down; q_proj is the only module all three adapt."""
    from utils.runtime.tiny import build_random_lora

    root = tmp_path_factory.mktemp("extra-adapters")
    return {
        "second": build_random_lora(
            tiny_model_dir,
            root / "second",
            r=4,
            alpha=4,
            target_modules=("q_proj", "v_proj", "up_proj"),
            seed=2,
        ),
        "third": build_random_lora(
            tiny_model_dir,
            root / "third",
            r=16,
            alpha=8,
            target_modules=("q_proj", "o_proj", "down_proj"),
            seed=3,
        ),
    }


@pytest.fixture(scope="session")
def tiny_settings(tmp_path_factory, tiny_model_dir, tiny_adapter_dir, cache_dir):
    """Settings for a custom profile on the tiny pair, in NF4 like the app."""
    from utils.core.profiles import Settings

    return Settings(
        profile="custom",
        base=str(tiny_model_dir),
        adapter=str(tiny_adapter_dir),
        task_prompt="How much does this cost to the nearest dollar?\n\n{description}\n\nPrice is $",
        cache_dir=cache_dir,
    )


@pytest.fixture(scope="session")
def tiny_pair(tiny_settings):
    from utils.runtime.loading import load_model_pair

    return load_model_pair(tiny_settings, has_gpu=False)


@pytest.fixture(scope="session")
def plain_models(tiny_settings):
    """Two separate models: the base with no adapter loaded at all, and base + adapter with peft alone."""
    from utils.core.profiles import resolve_profile
    from utils.runtime.loading import attach_adapter, load_base

    profile = resolve_profile(tiny_settings)
    base, tok = load_base(profile, tiny_settings, device="cpu")
    tuned, _ = attach_adapter(load_base(profile, tiny_settings, device="cpu")[0], profile.adapter)
    return base, tuned, tok


@pytest.fixture(scope="session")
def smollm2_pair(cache_dir):
    """The real embedded default, loaded once for the whole session (slow tests only)."""
    from utils.core.profiles import Settings
    from utils.runtime.loading import load_model_pair

    return load_model_pair(Settings(profile="smollm2-pricer", cache_dir=cache_dir), has_gpu=False)
