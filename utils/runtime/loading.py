"""Load one base model (4-bit NF4 through bitsandbytes, or full precision) and attach one LoRA adapter.

The adapter is attached once with PeftModel.from_pretrained and switched per request by the engine, so
nothing is reloaded while the app serves. Anything that fails to load degrades instead of stopping the app:
a bad adapter leaves the base alone, a base that cannot load falls back to the embedded default.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from utils.core.errors import AdapterLoadError, LoraLensError, ModelLoadError, ProfileError
from utils.core.profiles import (
    ADAPTER_BASE,
    SMOLLM2_PRICER,
    ModelProfile,
    Settings,
    describe_request,
    resolve_profile,
)
from utils.runtime import cpu_decode, decode_layers, decode_stack, embedded, nf4_kernel
from utils.runtime.adapter_files import adapter_weights_file, read_adapter_config, resolve_adapter_dir
from utils.runtime.adapter_set import (
    ADAPTER_NAME,
    LoadedAdapter,
    adapter_entries,
    attach_adapters,
    check_adapter_fits,
)
from utils.runtime.report import LoadReport

log = logging.getLogger(__name__)


@dataclass
class LoadedPair:
    """The one model the app holds: a PeftModel with its adapters attached, or the bare base."""

    model: object  # PeftModel (the primary adapter is ADAPTER_NAME) or PreTrainedModel when base-only
    tokenizer: object
    profile: ModelProfile
    report: LoadReport
    adapter_dir: Path | None = None  # local folder of the primary adapter's files, for size cross-checks
    adapters: list[LoadedAdapter] = field(default_factory=list)  # every attached adapter, the primary first
    settings: Settings | None = None  # what it was loaded with (a merge check loads the base again so)

    @property
    def has_adapter(self) -> bool:
        return self.adapter_dir is not None


def quantization_config(compute_dtype=None):
    """The QLoRA base setting: NF4 weights, double quantization, bf16 compute (the lesson's config)."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype or torch.bfloat16,
    )


def pick_compute_dtype(settings: Settings, device: str):
    """On GPUs bfloat16 where the hardware runs it natively, else (T4, V100) float16. On CPUs float32, the same
    numbers on every CPU and exact against the de-quantized weights, except where bitsandbytes' own AVX512-BF16
    kernel serves the 4-bit layers (the probe found it faster, or LORA_LENS_CPU_KERNEL=off): it computes in
    bf16 whatever it is given, so the rest of the model does too."""
    import torch

    if settings.compute_dtype != "auto":
        return getattr(torch, settings.compute_dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if cuda_runs_bf16(settings) else torch.float16
    if settings.precision == "nf4" and nf4_kernel.bitsandbytes_kernel_serves():
        return torch.bfloat16
    return torch.float32


def cuda_runs_bf16(settings: Settings) -> bool:
    """Does the GPU compute bf16 natively (Ampere and later)? On ZeroGPU the main process has no CUDA to ask, and
    its GPUs (A100, H200) all do."""
    import torch

    if settings.zero_gpu:
        return True
    try:
        return bool(torch.cuda.is_bf16_supported(including_emulation=False))
    except (RuntimeError, AssertionError, TypeError):  # no CUDA to ask
        return False


AUTO_CPU_THREADS = (
    2  # measured (bench/bench_engine.py): 2 threads decode 1.3x faster than 1; more not measured
)


def generation_threads(settings: Settings) -> int:
    """CPU threads for the engine's model calls: LORA_LENS_CPU_THREADS, or auto = up to AUTO_CPU_THREADS of the
    cores this process may use."""
    if settings.cpu_threads:
        return settings.cpu_threads
    from utils.runtime.threads import usable_cores

    return max(1, min(AUTO_CPU_THREADS, usable_cores()))


def _from_pretrained(source: str, kwargs: dict, device: str):
    """The model's weights, read and quantized on every core (threads.on_every_core says why)."""
    from transformers import AutoModelForCausalLM

    from utils.runtime.threads import on_every_core

    return on_every_core(device, lambda: AutoModelForCausalLM.from_pretrained(source, **kwargs))


def pick_device(settings: Settings) -> str:
    import torch

    return "cuda" if (settings.zero_gpu or torch.cuda.is_available()) else "cpu"


def _base_source(profile: ModelProfile, settings: Settings) -> str:
    if profile.is_embedded:
        # On a Space the GGUF is in the Hub cache (preloaded at build time), downloaded there only should the
        # preload be missing; nothing is pip-installed while the app runs.
        return str(embedded.ensure_cache(settings.cache_dir, download=settings.on_spaces))
    return profile.base


def load_base(profile: ModelProfile, settings: Settings, device: str | None = None):
    """(model, tokenizer) for the profile's base, in NF4 unless settings.precision is "full"."""
    from transformers import AutoTokenizer

    device = device or pick_device(settings)
    if profile.gated and not settings.hf_token:
        raise ModelLoadError(
            f"{profile.base} is gated: set the HF_TOKEN secret (a token with access to the model) to load it."
        )
    token = settings.hf_token if not profile.is_embedded else None
    kwargs: dict = {"device_map": device, "trust_remote_code": False, "token": token}
    if settings.precision == "nf4" and str(device).startswith("cpu"):
        # Before the first forward pass, so every NF4 model in this process computes with one kernel; and
        # before the compute dtype, which follows the kernel.
        nf4_kernel.enable(settings.cache_dir)
    compute_dtype = pick_compute_dtype(settings, device)
    if settings.precision == "nf4":
        kwargs["quantization_config"] = quantization_config(compute_dtype)
    else:
        kwargs["dtype"] = compute_dtype
    try:
        source = _base_source(profile, settings)
    except ModelLoadError:
        # An unwritable cache still lets the app start: de-quantize the GGUF straight into memory.
        if not profile.is_embedded:
            raise
        return _load_embedded_without_cache(settings, kwargs)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, token=token, trust_remote_code=False)
        model = _from_pretrained(source, kwargs, device)
    except (OSError, ValueError, RuntimeError, ImportError) as exc:
        raise ModelLoadError(_describe_load_failure(profile.base, exc)) from exc
    return _ready(model, device), tokenizer


def _ready(model, device: str):
    """Eval mode; on the CPU, the fast decode paths set up before the first forward pass."""
    model.eval()
    if str(device).startswith("cpu"):
        nf4_kernel.prepare(model)
        cpu_decode.speed_up_output_layer(model)
        decode_layers.speed_up_decoder_layers(model)
        decode_stack.speed_up_decode_stack(model)
    return model


def _load_embedded_without_cache(settings: Settings, kwargs: dict):
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.warning(
        "Cache %s is not writable: converting the embedded model in a temporary folder.", settings.cache_dir
    )
    with tempfile.TemporaryDirectory(prefix="lora-lens-") as tmp:
        model_dir = embedded.convert_to_cache(Path(tmp), embedded.gguf_path(download=settings.on_spaces))
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return _ready(model, kwargs["device_map"]), tokenizer


def _describe_load_failure(base: str, exc: Exception) -> str:
    text = str(exc)
    if "out of memory" in text.lower() or isinstance(exc, MemoryError):
        return (
            f"{base} does not fit in memory on this machine; use a GPU Space or the smollm2-pricer profile."
        )
    if "gated" in text.lower() or "401" in text or "403" in text:
        return f"{base} is gated and the token was refused: check HF_TOKEN's access to the model."
    if "offline" in text.lower() or "connect" in text.lower() or "resolve" in text.lower():
        return f"{base} could not be downloaded (no network or hub offline); the embedded default needs none."
    return f"{base} could not be loaded ({type(exc).__name__}); check the id or path."


def attach_adapter(base_model, adapter: str, token: str | None = None, revision: str | None = None):
    """(PeftModel, adapter_dir) with the adapter attached under ADAPTER_NAME, in eval mode."""
    from peft import PeftModel

    adapter_dir = resolve_adapter_dir(adapter, token, revision)
    check_adapter_fits(base_model, adapter_dir)
    try:
        model = PeftModel.from_pretrained(
            base_model, str(adapter_dir), adapter_name=ADAPTER_NAME, is_trainable=False
        )
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise AdapterLoadError(
            f"The adapter in {adapter_dir} could not be attached ({type(exc).__name__}): {exc}"
        ) from exc
    model.eval()
    return model, adapter_dir


def load_profile(profile: ModelProfile, settings: Settings, device: str | None = None) -> LoadedPair:
    """Load the base and, where the profile has one, the adapter; a bad adapter leaves a base-only pair."""
    started = time.perf_counter()
    device = device or pick_device(settings)
    if profile.base == ADAPTER_BASE:
        profile = _on_the_adapters_base(profile, settings)
    model, tokenizer = load_base(profile, settings, device)
    base_footprint = model.get_memory_footprint()
    base_params = sum(p.numel() for p in model.parameters())
    if getattr(model, "is_loaded_in_4bit", False):
        # Linear4bit packs two 4-bit values per uint8 element: count logical weights, not storage slots.
        base_params = _logical_param_count(model)
    notices: list[str] = []
    entries = adapter_entries(profile)
    model, adapters, left_out = attach_adapters(model, entries, settings.hf_token)
    primary = entries[0].name if entries and entries[0].primary else None
    if primary is not None and primary in dict(left_out):
        fix = _adapter_fix(AdapterLoadError(dict(left_out)[primary]), profile, settings)
        notices.append(
            f"Running base-only: {fix}"
            if not adapters
            else f"{fix} The first adapter that loaded, {adapters[0].name}, is the fine-tuned pane instead."
        )
    elif not entries:
        notices.append("No adapter configured for this profile: running base-only.")
    notices += [f"Adapter {name} left out: {reason}" for name, reason in left_out if name != primary]
    adapter_dir = adapters[0].directory if adapters else None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter_file = adapter_weights_file(adapter_dir).stat().st_size if adapter_dir else 0
    report = LoadReport(
        profile=profile.name,
        title=profile.title,
        base=profile.base,
        adapter=adapters[0].source if adapters else None,
        device=str(next(model.parameters()).device),
        precision=settings.precision,
        compute_dtype=str(_compute_dtype(model)).removeprefix("torch."),
        base_params=base_params,
        base_footprint_bytes=base_footprint,
        footprint_with_adapter_bytes=model.get_memory_footprint(),
        adapter_params=adapters[0].parameters if adapters else 0,
        adapter_file_bytes=adapter_file,
        adapters=[a.as_dict() for a in adapters],
        left_out=[{"name": name, "reason": reason} for name, reason in left_out],
        load_seconds=time.perf_counter() - started,
        notices=notices,
        kernel=nf4_kernel.STATE.status if settings.precision == "nf4" and device.startswith("cpu") else "",
        cpu_threads=generation_threads(settings) if device.startswith("cpu") else 0,
        compiled_layers=decode_layers.compiled_layers(model),
        layers=int(getattr(model.config, "num_hidden_layers", 0) or 0),
        asked=describe_request(settings),
    )
    return LoadedPair(
        model=model,
        tokenizer=tokenizer,
        profile=profile,
        report=report,
        adapter_dir=adapter_dir,
        adapters=adapters,
        settings=settings,
    )


def _on_the_adapters_base(profile: ModelProfile, settings: Settings) -> ModelProfile:
    """The profile with the base its adapter was trained on (adapter_config.json: base_model_name_or_path)."""
    adapter_dir = resolve_adapter_dir(profile.adapter, settings.hf_token, profile.adapter_revision)
    base = read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not isinstance(base, str) or not base.strip():
        raise ProfileError(
            f"LORA_LENS_ADAPTER={profile.adapter!r} does not name its base (its adapter_config.json has no "
            "base_model_name_or_path). Fix: set LORA_LENS_BASE to the model it was trained on."
        )
    return replace(profile, base=base.strip(), title=f"{base.strip()} + {profile.adapter}")


def _adapter_fix(exc: AdapterLoadError, profile: ModelProfile, settings: Settings) -> str:
    """The adapter's failure, with the variable to change where the operator chose the adapter."""
    if not settings.adapter:
        return str(exc)
    return (
        f"LORA_LENS_ADAPTER={settings.adapter!r}: {exc} Fix: point LORA_LENS_ADAPTER at a LoRA adapter trained "
        f"on {profile.base}, or set LORA_LENS_BASE to the base it was trained on."
    )


def _logical_param_count(model) -> int:
    """Parameters as the unquantized model has them: a 4-bit weight counts in_features x out_features."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:  # tied embeddings share one tensor
                continue
            seen.add(id(p))
            packed = name == "weight" and hasattr(module, "in_features") and not p.dtype.is_floating_point
            total += module.in_features * module.out_features if packed else p.numel()
    return total


def _compute_dtype(model):
    import torch

    for module in model.modules():
        dtype = getattr(module, "compute_dtype", None)
        if dtype is not None:
            return dtype
    return next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)


def load_model_pair(settings: Settings, has_gpu: bool | None = None) -> LoadedPair:
    """The app's one model: the chosen profile, or the embedded default with the reason it fell back."""
    try:
        profile = resolve_profile(settings, has_gpu)
    except LoraLensError as exc:
        profile, reason = SMOLLM2_PRICER, str(exc)
    else:
        reason = None
        try:
            return load_profile(profile, settings)
        except (LoraLensError, MemoryError) as exc:
            if profile.is_embedded:
                raise
            reason = str(exc) if isinstance(exc, LoraLensError) else f"{profile.base} does not fit in memory."
    asked = describe_request(settings)
    log.warning("Not loaded: %s. %s Falling back to the embedded default.", asked, reason)
    pair = load_profile(SMOLLM2_PRICER, replace(settings, adapter=None, adapters=None))
    pair.report.asked = asked
    pair.report.notices.insert(0, f"Started on the embedded default instead of {asked}: {reason}")
    return pair
