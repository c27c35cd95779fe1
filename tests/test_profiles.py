"""Profiles and settings: environment read in one place, `auto` resolution, the token kept out of sight."""

from pathlib import Path

import pytest

from utils.core.errors import ProfileError
from utils.core.profiles import (
    LLAMA31_PRICER,
    PRICER_PROMPT,
    SMOLLM2_PRICER,
    Settings,
    read_settings,
    resolve_profile,
)


def test_defaults_without_environment():
    settings = read_settings({"HOME": "/home/x"})
    assert settings.profile == "auto"
    assert settings.precision == "nf4"
    assert settings.compute_dtype == "auto"
    assert settings.cache_dir == Path("/home/x/.cache/lora-lens")
    assert settings.hf_token is None


def test_environment_overrides():
    settings = read_settings(
        {
            "LORA_LENS_PROFILE": "custom",
            "LORA_LENS_BASE": "org/base",
            "LORA_LENS_ADAPTER": "org/adapter",
            "LORA_LENS_PRECISION": "FULL",
            "LORA_LENS_CACHE_DIR": "/tmp/c",
            "SPACE_ID": "user/space",
        }
    )
    assert (settings.profile, settings.base, settings.adapter) == ("custom", "org/base", "org/adapter")
    assert settings.precision == "full"
    assert settings.cache_dir == Path("/tmp/c")
    assert settings.on_spaces


@pytest.mark.parametrize("name,value", [("LORA_LENS_PRECISION", "int3"), ("LORA_LENS_COMPUTE_DTYPE", "fp8")])
def test_bad_setting_is_refused_with_the_choices(name, value):
    with pytest.raises(ProfileError, match="is not one of"):
        read_settings({name: value})


def test_token_is_read_but_never_shown():
    settings = read_settings({"HF_TOKEN": "hf_planted_secret_123"})
    assert settings.hf_token == "hf_planted_secret_123"
    assert "hf_planted_secret_123" not in repr(settings)
    assert "hf_planted_secret_123" not in str(settings)


@pytest.mark.parametrize("has_gpu,expected", [(True, LLAMA31_PRICER), (False, SMOLLM2_PRICER)])
def test_auto_picks_by_hardware(has_gpu, expected):
    assert resolve_profile(Settings(), has_gpu=has_gpu) == expected


def test_reference_profile_matches_the_lesson():
    assert LLAMA31_PRICER.base == "meta-llama/Meta-Llama-3.1-8B"
    assert LLAMA31_PRICER.adapter == "ed-donner/pricer-2024-09-13_13.04.39"
    assert (LLAMA31_PRICER.lora.r, LLAMA31_PRICER.lora.alpha, LLAMA31_PRICER.lora.dropout) == (32, 64, 0.1)
    assert LLAMA31_PRICER.lora.target_modules == ("q_proj", "k_proj", "v_proj", "o_proj")
    assert (
        PRICER_PROMPT.format(description="X")
        == "How much does this cost to the nearest dollar?\n\nX\n\nPrice is $"
    )
    assert LLAMA31_PRICER.gated and not SMOLLM2_PRICER.gated


def test_custom_profile_needs_a_base():
    with pytest.raises(ProfileError, match="LORA_LENS_BASE"):
        resolve_profile(Settings(profile="custom"))
    profile = resolve_profile(Settings(profile="custom", base="/models/b", adapter=""))
    assert profile.base == "/models/b" and profile.adapter is None


def test_unknown_profile_lists_the_choices():
    with pytest.raises(ProfileError, match="smollm2-pricer"):
        resolve_profile(Settings(profile="gpt-17"))


def test_explicit_adapter_overrides_the_profile():
    assert resolve_profile(Settings(profile="smollm2-pricer", adapter="")).adapter is None
    assert resolve_profile(Settings(profile="smollm2-pricer", adapter="/a")).adapter == "/a"


@pytest.mark.parametrize(("value", "threads"), [("auto", 0), ("", 0), ("3", 3), (" 1 ", 1)])
def test_cpu_threads_setting(value, threads):
    assert read_settings({"LORA_LENS_CPU_THREADS": value}).cpu_threads == threads


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5", "100000"])
def test_bad_cpu_threads_setting_is_refused_clearly(value):
    with pytest.raises(ProfileError, match="LORA_LENS_CPU_THREADS"):
        read_settings({"LORA_LENS_CPU_THREADS": value})
