"""The adapters one model holds: the primary (LORA_LENS_ADAPTER or the profile's) and up to seven more
(LORA_LENS_ADAPTERS, or a profile's checkpoint series), all on the one base, attached once at start.

Each is checked against the base from its safetensors header before peft touches the model; a missing or
broken one is left out with the reason, and the rest load. Names are what panes and the API call them; peft
knows them as ADAPTER_NAME (the primary) and `lens1`, `lens2`, ... so a name can never clash with peft's own
attributes.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from utils.core.errors import AdapterLoadError, ProfileError
from utils.core.profiles import MAX_ADAPTERS, REPO_ROOT, ModelProfile, check_adapter_name
from utils.runtime.adapter_files import (
    adapter_weights_file,
    read_adapter_config,
    read_safetensors_header,
    resolve_adapter_dir,
)

ADAPTER_NAME = "default"  # peft's name of the primary adapter (its default); the others are lens1, lens2, ...
CHECKPOINT_FOLDER = re.compile(r"checkpoint-(\d+)")


@dataclass(frozen=True)
class AdapterEntry:
    """An adapter the settings ask for: its name, where it is, and the hub commit to take."""

    name: str
    ref: str  # hub id or local path
    revision: str | None = None
    primary: bool = False


@dataclass(frozen=True)
class LoadedAdapter:
    """One attached adapter, as the header and `/adapters` list it."""

    name: str  # what panes and the API call it
    peft_name: str  # its name inside peft
    source: str  # hub id or path, repo-relative for the project's own files
    r: int
    alpha: float
    targets: tuple[str, ...]  # the module names it adapts (q_proj, ...)
    parameters: int  # LoRA parameters attached
    file_bytes: int  # adapter_model.safetensors on disk
    footprint_bytes: int  # its LoRA weights in memory (fp32 whatever the file's dtype: peft widens them)
    stored: str  # the file's tensor dtype (F32, F16, BF16)
    step: (
        int | None
    )  # training step, where the folder says (trainer_state.json, checkpoint-STEP, training_log)
    primary: bool  # the adapter the two-pane views call "fine_tuned"
    directory: Path | None = None  # local folder (never shown)

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("directory")
        out.pop("peft_name")
        out["targets"] = list(self.targets)
        return out


def adapter_entries(profile: ModelProfile) -> list[AdapterEntry]:
    """The profile's adapters in order, the primary first, checkpoint folders expanded (sorted by step)."""
    entries = []
    if profile.adapter:
        name = profile.adapter_name or _name_from(profile.adapter)
        entries.append(AdapterEntry(name, profile.adapter, profile.adapter_revision, primary=True))
    for name, ref in profile.extra_adapters:
        series = _checkpoints(ref)
        if series:
            entries += [
                AdapterEntry(f"{name}-step-{step}" if name else f"step-{step}", str(folder))
                for step, folder in series
            ]
        else:
            entries.append(AdapterEntry(name or _name_from(ref), ref))
    return entries


def _checkpoints(ref: str) -> list[tuple[int, Path]]:
    """(step, folder) of each checkpoint-STEP sub-folder holding an adapter, for a local folder without one of
    its own (transformers' Trainer layout); [] otherwise."""
    folder = Path(ref).expanduser()
    if not folder.is_dir() or (folder / "adapter_config.json").is_file():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_FOLDER.fullmatch(child.name)
        if match and (child / "adapter_config.json").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def _name_from(ref: str) -> str:
    """A usable name from a path or hub id: its last part, other characters as '-', at most 40."""
    last = Path(ref.rstrip("/")).name or "adapter"
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", last).lstrip("-_.")[:40] or "adapter"
    return name if name.lower() not in ("base", "fine_tuned", "none") else f"{name}-adapter"


def training_step(adapter_dir: Path) -> int | None:
    """The step an adapter was saved at: trainer_state.json's global_step, a checkpoint-STEP folder name, or
    the project's training_log.json (its steps, plus the steps of the run it was warm-started from)."""
    adapter_dir = Path(adapter_dir)
    try:
        state = json.loads((adapter_dir / "trainer_state.json").read_text())
        return int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    match = CHECKPOINT_FOLDER.fullmatch(adapter_dir.name)
    if match:
        return int(match.group(1))
    try:
        log = json.loads((adapter_dir / "training_log.json").read_text())
        return int(log["steps"]) + int((log.get("warm_start") or {}).get("steps", 0))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def attach_adapters(base_model, entries: list[AdapterEntry], token: str | None = None):
    """(model, [LoadedAdapter], [(name, reason)]): every adapter that fits the base attached, in order; the
    first one attached is peft's ADAPTER_NAME (the primary). The model is the base when none attaches."""
    from peft import PeftModel

    model, loaded, left_out, seen_dirs = base_model, [], [], set()
    for entry in entries:
        if len(loaded) == MAX_ADAPTERS:
            left_out.append(
                (entry.name, f"more than {MAX_ADAPTERS} adapters: only the first {MAX_ADAPTERS} load.")
            )
            continue
        try:
            check_adapter_name(entry.name, "adapter name")
            if any(entry.name == a.name for a in loaded):
                raise AdapterLoadError(f"another adapter is already called {entry.name!r}.")
            adapter_dir = resolve_adapter_dir(entry.ref, token, entry.revision)
            if adapter_dir.resolve() in seen_dirs:
                raise AdapterLoadError("the same adapter folder is listed twice.")
            config = check_adapter_fits(_base_of(model), adapter_dir)
            peft_name = ADAPTER_NAME if not loaded else f"lens{len(loaded)}"
            model = _attach(model, adapter_dir, peft_name)
        except (AdapterLoadError, ProfileError) as exc:
            left_out.append((entry.name, str(exc)))
            continue
        seen_dirs.add(adapter_dir.resolve())
        loaded.append(_describe(model, entry, adapter_dir, config, peft_name, primary=not loaded))
    if isinstance(model, PeftModel):
        model.set_adapter(ADAPTER_NAME)
        model.eval()
    return model, loaded, left_out


def _base_of(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _attach(model, adapter_dir: Path, peft_name: str):
    from peft import PeftModel

    try:
        if peft_name == ADAPTER_NAME:
            return PeftModel.from_pretrained(
                model, str(adapter_dir), adapter_name=peft_name, is_trainable=False
            )
        model.load_adapter(str(adapter_dir), adapter_name=peft_name, is_trainable=False)
        return model
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        if peft_name != ADAPTER_NAME and peft_name in getattr(model, "peft_config", {}):
            model.delete_adapter(peft_name)  # a half-injected adapter would leave layers behind
        raise AdapterLoadError(
            f"The adapter in {adapter_dir.name} could not be attached ({type(exc).__name__}): {exc}"
        ) from exc


def check_adapter_fits(base_model, adapter_dir: Path) -> dict:
    """Raise AdapterLoadError unless the adapter is a plain LoRA whose every tensor fits a linear layer of this
    base (peft would otherwise fail with a size-mismatch trace, or, worse, silently skip keys that name
    modules the base does not have). Returns the adapter's config."""
    config = read_adapter_config(adapter_dir)
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterLoadError(
            f"{adapter_dir} holds a {config.get('peft_type')} adapter; LoRA Lens shows LoRA only."
        )
    if config.get("use_dora"):
        raise AdapterLoadError(
            f"{adapter_dir.name} is a DoRA adapter; LoRA Lens scales B A x per row, which DoRA's magnitude "
            "vector does not allow."
        )
    tensors = read_safetensors_header(adapter_weights_file(adapter_dir))
    modules = dict(base_model.named_modules())
    for name, info in tensors.items():
        if ".lora_A." not in name and ".lora_B." not in name:
            continue
        module_path = name.split(".lora_")[0].removeprefix("base_model.model.")
        target = modules.get(module_path)
        if target is None or not hasattr(target, "in_features"):
            raise AdapterLoadError(
                f"The adapter was made for another base: it targets {module_path}, which this base lacks."
            )
        expected_dim = target.in_features if ".lora_A." in name else target.out_features
        got_dim = info.shape[1] if ".lora_A." in name else info.shape[0]
        if got_dim != expected_dim:
            raise AdapterLoadError(
                f"The adapter was made for another base: {module_path} is {target.in_features}->"
                f"{target.out_features} here but the adapter's {name.split('.')[-2]} has shape {list(info.shape)}."
            )
    return config


def _describe(model, entry: AdapterEntry, adapter_dir: Path, config: dict, peft_name: str, primary: bool):
    weights = [
        p for n, p in model.named_parameters() if f".lora_A.{peft_name}." in n or f".lora_B.{peft_name}." in n
    ]
    tensors = read_safetensors_header(adapter_weights_file(adapter_dir))
    stored = sorted({t.dtype for t in tensors.values()})
    targets = config.get("target_modules") or []
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    return LoadedAdapter(
        name=entry.name,
        peft_name=peft_name,
        source=shown_path(entry.ref),
        r=int(config.get("r", 0)),
        alpha=float(config.get("lora_alpha", 0)),
        targets=targets,
        parameters=sum(p.numel() for p in weights),
        file_bytes=adapter_weights_file(adapter_dir).stat().st_size,
        footprint_bytes=sum(p.numel() * p.element_size() for p in weights),
        stored="/".join(stored),
        step=training_step(adapter_dir),
        primary=primary,
        directory=adapter_dir,
    )


def shown_path(ref: str) -> str:
    """A repo-relative name for the project's own files, so the page never shows the server's folders."""
    path = Path(ref)
    if path.is_absolute() and path.is_relative_to(REPO_ROOT):
        return str(path.relative_to(REPO_ROOT))
    return ref
