"""Baking a LoRA update into a base weight, the ways people ship a fine-tune, one layer at a time.

    nf4       W' = Q(deQ(W) + ΔW): merged into the 4-bit weight and re-quantized, what peft's merge_and_unload()
              does on a 4-bit model (bitsandbytes' quantize_4bit with the layer's own block size, data type and
              nested statistics, as peft's Linear4bit.merge hands them to Params4bit)
    bf16/fp16 W' = round(deQ(W) + ΔW): merged into the de-quantized base, kept in 16 bits
    fp32      W' = deQ(W) + ΔW, kept in float32
    original  W' = W₀ + ΔW: merged into the base's own full-precision weights (its checkpoint before NF4; for the
              embedded default, the GGUF's de-quantized weights): how a QLoRA adapter is usually deployed

The analyses compute each route's weight values (utils/analysis/merge_check.py) from a layer's `requantize`
and `original_weight`, given here; `build_merged_model` builds a whole merged copy to run, and MergeSupport
is Engine's `merged_runs` over it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROUTES = ("nf4", "bf16", "fp16", "fp32", "original")  # in the order a check runs them
_PEFT_PREFIX = "base_model.model."


def requantized(layer):
    """A function giving Q(w)'s values for this layer's 4-bit format (None where the layer is not 4-bit)."""
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    weight = base.weight
    state = getattr(weight, "quant_state", None)
    if state is None:
        return None
    blocksize, quant_type = int(state.blocksize), str(state.quant_type)
    nested = bool(getattr(weight, "compress_statistics", state.nested))
    storage = getattr(weight, "quant_storage", torch.uint8)

    def quantize(w: torch.Tensor) -> torch.Tensor:
        import bitsandbytes.functional as bnbf

        packed, new_state = bnbf.quantize_4bit(
            w.float().contiguous(),  # on the weight's own device, as Params4bit quantizes on .to()
            blocksize=blocksize,
            compress_statistics=nested,
            quant_type=quant_type,
            quant_storage=storage,
        )
        return bnbf.dequantize_4bit(packed, new_state).float()

    return quantize


class OriginalWeights:
    """The base's own full-precision weights, read one tensor at a time from its safetensors files (a local
    folder, or the Hub cache the loader filled), by the peft module name of the layer."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            files = json.loads(index.read_text())["weight_map"]
        else:
            single = self.folder / "model.safetensors"
            with safe_open(single, framework="pt") as f:
                files = {key: single.name for key in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        self.files = files

    @classmethod
    def of(cls, model) -> OriginalWeights | None:
        """The model's original weights, where its folder (or the Hub cache) holds safetensors; else None."""
        source = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
        folder = Path(source)
        if not folder.is_dir():
            try:
                from huggingface_hub import snapshot_download

                folder = Path(
                    snapshot_download(
                        source, local_files_only=True, allow_patterns=["*.safetensors", "*.json"]
                    )
                )
            except Exception:  # not cached, not a hub id: the route is left out, and the view says why
                return None
        try:
            return cls(folder)
        except (OSError, ValueError, KeyError):
            return None

    def weight(self, module_name: str) -> torch.Tensor | None:
        """The float32 weight of a linear layer by its module name (peft's prefix dropped), or None."""
        from safetensors import safe_open

        key = module_name.removeprefix(_PEFT_PREFIX) + ".weight"
        if key not in self.files:
            return None
        with safe_open(self.folder / self.files[key], framework="pt") as f:
            return f.get_tensor(key).float()


class DenseMerged(torch.nn.Module):
    """A linear layer holding a merged weight in a plain dtype, in place of a 4-bit one: the input is cast to
    the weight's dtype and the output back, as a model served in that dtype computes it."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(weight.dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x.to(self.weight.dtype), self.weight, self.bias).to(x.dtype)


ROUTE_DTYPES = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
    "original": torch.float32,
}


def merged_model_bytes(layers, route: str, base_footprint: int) -> int:
    """What a merged copy of a quantized route needs in memory: the NF4 base again, plus for bf16 / fp16 / fp32
    the adapted layers in that dtype."""
    if route == "nf4":
        return base_footprint
    size = torch.tensor([], dtype=ROUTE_DTYPES[route]).element_size()
    return base_footprint + sum(w.a.shape[1] * w.b.shape[0] for w in layers) * size


def build_merged_model(pair, layers, route: str, device: str | None = None):
    """A second model with the adapter baked in by `route`, for running it: the base loaded again (in NF4 as
    served, in full precision for the original route), each adapted layer replaced by its merged weight
    (re-quantized for nf4, a DenseMerged layer for bf16 / fp16 / fp32, W₀ + ΔW in place for original).
    `layers` are the adapter's LoraWeights (utils/core/seam.py), read under the served model's lock."""
    from dataclasses import replace

    from utils.runtime.loading import load_base

    settings = pair.settings if route != "original" else replace(pair.settings, precision="full")
    model, _ = load_base(pair.profile, settings, device or str(next(pair.model.parameters()).device))
    if route == "original":
        for lw in layers:
            module = model.get_submodule(lw.name.removeprefix(_PEFT_PREFIX))
            delta = (lw.b.float() @ lw.a.float()) * lw.scaling  # peft's get_delta_weight, in its order
            module.weight.data += delta.to(module.weight.dtype).to(module.weight.device)
        return model.eval()
    AdaptedLayers(model, layers).install(route)
    return model.eval()


class AdaptedLayers:
    """The adapted layers of a reloaded 4-bit base, switched from one merge route to the next in place (the
    other layers are the same in every route), so one reload serves every route but the original one."""

    def __init__(self, model, layers):
        self.model, self.layers = model, layers
        self.pristine = {lw.name: model.get_submodule(lw.name.removeprefix(_PEFT_PREFIX)) for lw in layers}

    def install(self, route: str) -> None:
        import bitsandbytes as bnb

        for lw in self.layers:
            parent_name, _, child = lw.name.removeprefix(_PEFT_PREFIX).rpartition(".")
            parent, module = self.model.get_submodule(parent_name), self.pristine[lw.name]
            merged_values = lw.base_weight() + (lw.b.float() @ lw.a.float()) * lw.scaling  # peft's order
            if route == "nf4":  # as peft's Linear4bit.merge: a new Params4bit of the sum, quantized on .to()
                weight = module.weight
                kwargs = {k: v for k, v in weight.__dict__.items() if not k.startswith("_") and k != "data"}
                kwargs.update(requires_grad=False, bnb_quantized=False)
                module.weight = bnb.nn.Params4bit(merged_values.cpu(), **kwargs).to(weight.device)
                setattr(parent, child, module)
            else:
                dense = merged_values.to(ROUTE_DTYPES[route]).to(module.weight.device)
                setattr(parent, child, DenseMerged(dense, module.bias))


def logit_gap(reference_logits: torch.Tensor, merged_logits: torch.Tensor, tokens: list[int]) -> dict:
    """Per position of one text: KL(unmerged || merged) of the next-token distributions and the change of the
    written token's log-probability (merged minus unmerged); logits [positions, vocab], position j predicting
    tokens[j]."""
    p = torch.log_softmax(reference_logits.float(), dim=-1)
    q = torch.log_softmax(merged_logits.float(), dim=-1)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0.0)
    index = torch.tensor(tokens).unsqueeze(1)
    change = (q.gather(1, index) - p.gather(1, index)).squeeze(1)
    return {"kl": kl.tolist(), "logprob_change": change.tolist()}


def free_bytes(device: str) -> int:
    """Memory free for a merged copy on this device."""
    if str(device).startswith("cuda"):
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


class MergeSupport:
    """Engine's merged_runs (utils/core/seam.py): merged copies built, run and freed, the base reloaded once
    for every route but the original one. A mixin of Engine, which holds the loaded pair (`self.pair`), its
    router and lock, forward_rows and placement."""

    def merged_runs(self, adapter, routes, sequences, keep_from, prompts, max_new_tokens):
        import gc

        from utils.core.errors import InputError
        from utils.core.seam import Use
        from utils.runtime.engine import release_freed_memory
        from utils.runtime.loading import load_base
        from utils.runtime.weights import lora_weights

        unknown = [r for r in routes if r not in ROUTES]
        if unknown:
            raise InputError(f"routes must be among {', '.join(ROUTES)}; got {str(unknown[0])[:40]!r}.")
        if self.router is None:
            raise InputError("No adapter is loaded (base-only): there is nothing to merge.")
        position = self.placement([Use(adapter, 1.0)])[1][0]
        reference = (
            self.forward_rows(sequences, [Use(adapter, 1.0)] * len(sequences), keep_from)
            if sequences
            else None
        )
        device = str(next(self.model.parameters()).device)
        with (
            self.exclusive()
        ):  # the adapter's weights as served; a merged copy never touches the served model
            layers = lora_weights(self.router, position, self.original_weights())
        run = _CopyRun(self, reference, sequences, keep_from, prompts, max_new_tokens, device)
        results, quantized = {}, [r for r in routes if r != "original"]
        try:
            if quantized:
                needed = max(
                    merged_model_bytes(layers, r, self.report.base_footprint_bytes) for r in quantized
                )
                needed += self._largest_shard()  # loading reads a file whole before quantizing it
                refusal = self._refusal(needed, device)
                if refusal:
                    results.update({r: run.refused(r, needed, refusal) for r in quantized})
                else:
                    model, _ = load_base(self.pair.profile, self.pair.settings, device)
                    adapted = AdaptedLayers(model, layers)
                    for route in quantized:
                        adapted.install(route)
                        results[route] = run.of(model.eval(), route, needed)
                    del model, adapted
            if "original" in routes:
                needed = self.report.base_params * 4  # the base in float32
                if self.original_weights() is None:
                    results["original"] = run.refused(
                        "original", 0, "the base's full-precision weights are not here"
                    )
                elif refusal := self._refusal(needed, device):
                    results["original"] = run.refused("original", needed, refusal)
                else:
                    model = build_merged_model(self.pair, layers, "original", device)
                    results["original"] = run.of(model, "original", needed)
                    del model
            return results
        finally:
            gc.collect()
            release_freed_memory()

    def _largest_shard(self) -> int:
        """The largest safetensors file of the base (loading reads one at a time), 0 where unknown."""
        originals = self.original_weights()
        if originals is None:
            return 0
        return max(
            ((originals.folder / name).stat().st_size for name in set(originals.files.values())), default=0
        )

    @staticmethod
    def _refusal(needed: int, device: str) -> str:
        free = free_bytes(device)
        if needed <= 0.8 * free:
            return ""
        return (
            f"a merged copy needs {needed / 1e9:.2f} GB; {free / 1e9:.2f} GB is free here: run it where it fits "
            "(`python -m utils.task.ship check`)"
        )


class _CopyRun:
    """One merged copy's runs: teacher-forced along the sequences against the unmerged reference logits, and
    greedy on the prompts."""

    def __init__(self, engine, reference, sequences, keep_from, prompts, max_new_tokens, device):
        self.engine, self.reference, self.sequences, self.keep_from = engine, reference, sequences, keep_from
        self.prompts, self.max_new_tokens, self.device = prompts, max_new_tokens, device

    def refused(self, route, needed, why):
        from utils.core.seam import MergedRuns

        return MergedRuns(route, [], [], [], needed, refused=why)

    def of(self, model, route, needed):
        from utils.core.seam import MergedRuns
        from utils.runtime.scoring import generate_chunk

        kl, change = [], []
        if self.sequences:
            width, first = max(len(s) for s in self.sequences), min(self.keep_from)
            ids = torch.full((len(self.sequences), width), self.engine.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for i, seq in enumerate(self.sequences):
                ids[i, : len(seq)] = torch.tensor(seq)
                mask[i, : len(seq)] = 1
            with torch.inference_mode():
                logits = model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            logits = logits.float().cpu()
            for i, (seq, keep) in enumerate(zip(self.sequences, self.keep_from, strict=True)):
                ref = self.reference[i, keep - first : len(seq) - first - 1]
                gap = logit_gap(ref, logits[i, keep : len(seq) - 1], seq[keep + 1 :])
                kl.append(gap["kl"])
                change.append(gap["logprob_change"])
        texts = []
        if self.prompts:
            answers = generate_chunk(
                model, self.engine.tokenizer, self.prompts, ([0.0], [None]), self.max_new_tokens, 1
            )
            texts = [answer.text for answer in answers[0]]
        return MergedRuns(route, kl, change, texts, needed)
