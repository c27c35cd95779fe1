"""Profiles and settings: environment read in one place, `auto` resolution, the token kept out of sight."""

from pathlib import Path

import pytest

from utils.core.errors import ProfileError
from utils.core.profiles import (
    ADAPTER_BASE,
    LLAMA31_PRICER,
    PRICER_PROMPT,
    SMOLLM2_PRICER,
    Settings,
    describe_request,
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


# The settings matrix: what loads is what was asked for, or a message naming the variable and the fix.
SETTINGS_MATRIX = [
    # (environment, has_gpu, (profile name, base, adapter) or the error's words)
    ({}, False, ("smollm2-pricer", SMOLLM2_PRICER.base, SMOLLM2_PRICER.adapter)),
    ({}, True, ("llama31-pricer", LLAMA31_PRICER.base, LLAMA31_PRICER.adapter)),
    ({"SPACES_ZERO_GPU": "true"}, None, ("llama31-pricer", LLAMA31_PRICER.base, LLAMA31_PRICER.adapter)),
    ({"LORA_LENS_BASE": "org/b"}, False, ("custom", "org/b", None)),
    ({"LORA_LENS_BASE": "org/b"}, True, ("custom", "org/b", None)),
    ({"LORA_LENS_BASE": "org/b", "SPACES_ZERO_GPU": "true"}, None, ("custom", "org/b", None)),
    ({"LORA_LENS_BASE": "org/b", "LORA_LENS_ADAPTER": "org/a"}, False, ("custom", "org/b", "org/a")),
    ({"LORA_LENS_BASE": "org/b", "LORA_LENS_ADAPTER": "org/a"}, True, ("custom", "org/b", "org/a")),
    (
        {"LORA_LENS_PROFILE": "custom", "LORA_LENS_BASE": "org/b", "LORA_LENS_ADAPTER": "org/a"},
        False,
        ("custom", "org/b", "org/a"),
    ),
    ({"LORA_LENS_ADAPTER": "org/a"}, False, ("custom", ADAPTER_BASE, "org/a")),
    ({"LORA_LENS_ADAPTER": "org/a", "SPACES_ZERO_GPU": "true"}, None, ("custom", ADAPTER_BASE, "org/a")),
    ({"LORA_LENS_PROFILE": "custom", "LORA_LENS_ADAPTER": "org/a"}, True, ("custom", ADAPTER_BASE, "org/a")),
    (
        {"LORA_LENS_PROFILE": "smollm2-pricer", "LORA_LENS_ADAPTER": "/a"},
        False,
        ("smollm2-pricer", SMOLLM2_PRICER.base, "/a"),
    ),
    ({"LORA_LENS_ADAPTER": ""}, False, ("smollm2-pricer", SMOLLM2_PRICER.base, None)),
    ({"LORA_LENS_PROFILE": "custom"}, False, ["LORA_LENS_PROFILE=custom needs LORA_LENS_BASE"]),
    (
        {"LORA_LENS_PROFILE": "smollm2-pricer", "LORA_LENS_BASE": "org/b"},
        False,
        ["LORA_LENS_BASE='org/b'", "LORA_LENS_PROFILE='smollm2-pricer'", "Fix: unset LORA_LENS_PROFILE"],
    ),
    (
        {"LORA_LENS_PROFILE": "llama31-pricer", "LORA_LENS_BASE": "org/b", "SPACES_ZERO_GPU": "true"},
        None,
        ["LORA_LENS_BASE='org/b'", "LORA_LENS_PROFILE='llama31-pricer'"],
    ),
    ({"LORA_LENS_PROFILE": "gpt-17"}, False, ["LORA_LENS_PROFILE='gpt-17'", "smollm2-pricer"]),
]


@pytest.mark.parametrize(("environ", "has_gpu", "expected"), SETTINGS_MATRIX)
def test_settings_matrix(environ, has_gpu, expected):
    settings = read_settings(environ)
    if isinstance(expected, list):
        with pytest.raises(ProfileError) as raised:
            resolve_profile(settings, has_gpu=has_gpu)
        assert all(words in str(raised.value) for words in expected), str(raised.value)
        return
    profile = resolve_profile(settings, has_gpu=has_gpu)
    assert (profile.name, profile.base, profile.adapter) == expected


def test_what_was_asked_for_is_described_in_the_variables_words():
    assert describe_request(read_settings({})) == "profile auto (LORA_LENS_PROFILE)"
    assert describe_request(read_settings({"LORA_LENS_BASE": "org/b"})) == (
        "base org/b, adapter none (LORA_LENS_BASE, LORA_LENS_ADAPTER)"
    )
    assert describe_request(read_settings({"LORA_LENS_ADAPTER": "org/a"})) == (
        "adapter org/a on the base its adapter_config.json names (LORA_LENS_ADAPTER)"
    )
    assert describe_request(
        read_settings({"LORA_LENS_PROFILE": "smollm2-pricer", "LORA_LENS_ADAPTER": ""})
    ) == ("profile smollm2-pricer (LORA_LENS_PROFILE), adapter none (LORA_LENS_ADAPTER)")
