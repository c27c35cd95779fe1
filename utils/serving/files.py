"""What stays local when a server runs the model: the base's tokenizer and config, the adapters' files, a
meta-device model (real shapes, no memory) for the structure views and the size math, and each adapter's
weights read from its file for the anatomy, with the base's weights read from its local checkpoint where it
has one (the embedded default) and left unknown (NaN) where the base lives only on the server."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from utils.core.profiles import ModelProfile, Settings
from utils.core.seam import LoraWeights

log = logging.getLogger(__name__)


@dataclass
class ServedFiles:
    """The local side of a served model: enough to tokenize, describe and inspect it, never to run it."""

    profile: ModelProfile
    base_source: str  # local folder or hub id of the base's files
    tokenizer: object
    config: object
    adapters: list = field(default_factory=list)  # utils.runtime.adapter_set.LoadedAdapter, primary first
    left_out: list[dict] = field(default_factory=list)  # adapters asked for whose files did not read
    _meta: object = None
    _norms: object = None

    @property
    def base_is_local(self) -> bool:
        return Path(self.base_source).is_dir()

    def meta_model(self):
        """The base on the meta device with every adapter attached under its name (peft), built once."""
        if self._meta is None:
            self._meta = _meta_model(self.config, self.adapters)
        return self._meta

    def lora_layers(self, adapter) -> list[str]:
        """The module names the adapter adapts, in the model's order (peft's names, as the engine's router)."""
        targets = {name for name, _ in _lora_pairs(adapter.directory)}
        order = [name for name, _ in self.meta_model().named_modules()]
        return [name for name in order if name in targets]

    def lora_weights(self, adapter) -> list[LoraWeights]:
        """The adapter's A, B and scaling per layer from its file; the base weight from the local checkpoint."""
        import torch
        from safetensors.torch import load_file

        from utils.runtime.adapter_files import adapter_weights_file, read_adapter_config

        tensors = load_file(str(adapter_weights_file(adapter.directory)))
        config = read_adapter_config(adapter.directory)
        r, alpha = int(config.get("r", 0)), float(config.get("lora_alpha", 0))
        scaling = alpha / (r**0.5 if config.get("use_rslora") else r)
        modules = dict(self.meta_model().named_modules())
        layers = []
        for name in self.lora_layers(adapter):
            key = name.replace("base_model.model.", "", 1)
            a = tensors[f"base_model.model.{key}.lora_A.weight"].float()
            b = tensors[f"base_model.model.{key}.lora_B.weight"].float()
            shape = tuple(modules[name].base_layer.weight.shape)
            layers.append(
                LoraWeights(
                    name=name,
                    a=a,
                    b=b,
                    scaling=scaling,
                    base_weight=lambda key=key, shape=shape: self._base_weight(key, shape, torch),
                )
            )
        return layers

    def _base_weight(self, key: str, shape: tuple, torch):
        if self.base_is_local:
            from safetensors import safe_open

            for path in sorted(Path(self.base_source).glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    if f"{key}.weight" in f.keys():  # noqa: SIM118 - safe_open is no mapping
                        return f.get_tensor(f"{key}.weight").float()
        return torch.full(shape, float("nan"))  # the base's weights are on the server only

    def embedding_norms(self, token_ids) -> tuple[list[float], float, float]:
        """Backend.embedding_norms from the local checkpoint; an InputError where the base is on the server only."""
        if self._norms is None:
            self._norms = self._read_norms()
        norms = self._norms
        median = norms.median()
        spread = 1.4826 * (norms - median).abs().median()
        size = norms.shape[0]
        return [float(norms[t]) if 0 <= t < size else 0.0 for t in token_ids], float(median), float(spread)

    def _read_norms(self):
        from safetensors import safe_open

        from utils.core.errors import InputError

        if self.base_is_local:
            for path in sorted(Path(self.base_source).glob("*.safetensors")):
                with safe_open(str(path), framework="pt") as f:
                    if "model.embed_tokens.weight" in f.keys():  # noqa: SIM118 - safe_open is no mapping
                        return f.get_tensor("model.embed_tokens.weight").float().norm(dim=-1)
        raise InputError("The base's embeddings are on the server only.")


def read_files(profile: ModelProfile, settings: Settings) -> ServedFiles:
    """The tokenizer, config and adapter files of what the server runs, found as the engine finds them."""
    from transformers import AutoConfig, AutoTokenizer

    from utils.runtime import embedded
    from utils.runtime.adapter_files import resolve_adapter_dir
    from utils.runtime.adapter_set import adapter_entries

    if profile.is_embedded:
        source = str(embedded.ensure_cache(settings.cache_dir, download=settings.on_spaces))
    else:
        source = profile.base
    tokenizer = AutoTokenizer.from_pretrained(source, token=settings.hf_token)
    config = AutoConfig.from_pretrained(source, token=settings.hf_token)
    files = ServedFiles(profile, source, tokenizer, config)
    for i, entry in enumerate(adapter_entries(profile)):
        try:
            folder = resolve_adapter_dir(entry.ref, settings.hf_token, entry.revision)
            files.adapters.append(_describe(entry, folder, primary=i == 0 and entry.primary))
        except (
            Exception
        ) as exc:  # a missing or unreadable adapter is left out with its reason, as loading does
            files.left_out.append({"name": entry.name, "reason": str(exc)[:300]})
    return files


def _describe(entry, folder: Path, primary: bool):
    from utils.runtime.adapter_files import adapter_weights_file, read_adapter_config, read_safetensors_header
    from utils.runtime.adapter_set import LoadedAdapter, shown_path, training_step

    config = read_adapter_config(folder)
    tensors = read_safetensors_header(adapter_weights_file(folder))
    parameters = sum(t.numel for k, t in tensors.items() if ".lora_" in k)
    targets = config.get("target_modules") or []
    targets = (targets,) if isinstance(targets, str) else tuple(sorted(targets))
    return LoadedAdapter(
        name=entry.name,
        peft_name=entry.name,
        source=shown_path(entry.ref),
        r=int(config.get("r", 0)),
        alpha=float(config.get("lora_alpha", 0)),
        targets=targets,
        parameters=parameters,
        file_bytes=adapter_weights_file(folder).stat().st_size,
        footprint_bytes=parameters * 4,  # fp32 on the server's side as in peft; the server may hold less
        stored="/".join(sorted({t.dtype for t in tensors.values()})),
        step=training_step(folder),
        primary=primary,
        directory=folder,
    )


def _lora_pairs(folder: Path) -> list[tuple[str, str]]:
    """(module name, "A" | "B") of every LoRA tensor in the adapter's file, read from its header alone."""
    from utils.runtime.adapter_files import adapter_weights_file, read_safetensors_header

    pairs = []
    for key in read_safetensors_header(adapter_weights_file(folder)):
        for part in ("A", "B"):
            marker = f".lora_{part}."
            if marker in key:
                pairs.append((key.split(marker)[0], part))
    return pairs


def _meta_model(config, adapters):
    import warnings

    import torch
    from accelerate import init_empty_weights
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with init_empty_weights(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.tie_weights()
        for i, adapter in enumerate(adapters):
            lora = LoraConfig.from_pretrained(str(adapter.directory))
            lora.inference_mode = True
            if i == 0:
                model = get_peft_model(model, lora, adapter_name=adapter.peft_name)
            else:
                model.add_adapter(adapter.peft_name, lora)
    return model.eval()
