"""The load report: what was asked for and what loaded, on which device and kernel, what it costs in memory and
time, and every notice (a fallback, a base-only run). The header shows it; the log prints its lines."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class LoadReport:
    """What was loaded and what it costs, shown in the UI header and printed at start."""

    profile: str  # profile name actually loaded
    title: str  # human title of the profile
    base: str  # base id or path
    adapter: str | None  # adapter id or path; None when running base-only
    device: str  # "cpu" or "cuda:0"
    precision: str  # "nf4" or "full"
    compute_dtype: str  # dtype of activations / non-quantized weights
    base_params: int  # parameters of the base as loaded (4-bit weights counted as their logical numel)
    base_footprint_bytes: int  # get_memory_footprint() before the adapter was attached
    footprint_with_adapter_bytes: int  # the same after attaching
    adapter_params: int  # parameters the adapter added (0 without one)
    adapter_file_bytes: int  # adapter_model.safetensors on disk (0 without one)
    load_seconds: float  # wall time of the whole load
    notices: list[str] = field(default_factory=list)  # why a fallback or base-only mode happened
    kernel: str = (
        ""  # which 4-bit matmul runs on the CPU (fused or stock, and why); "" off the CPU or in full
    )
    cpu_threads: int = 0  # CPU threads of the engine's model calls (generation, token lens); 0 off the CPU
    compiled_layers: int = 0  # decoder layers whose CPU decode steps run csrc/decode_layer.cpp
    layers: int = 0  # decoder layers of the base
    asked: str = ""  # what the settings asked for (profiles.describe_request), beside what loaded
    # every attached adapter (adapter_set.LoadedAdapter.as_dict), the primary first; [] when base-only
    adapters: list[dict] = field(default_factory=list)
    left_out: list[dict] = field(
        default_factory=list
    )  # adapters asked for that did not load: {"name", "reason"}
    backend: str = "in-process (transformers + peft)"  # what runs the model: this process, or a server's URL

    def lines(self) -> list[str]:
        mb = 1e6
        out = [
            *([f"Asked for: {self.asked}"] if self.asked else []),
            f"Profile: {self.profile} ({self.title})",
            f"Base: {self.base} | {self.precision.upper()} on {self.device} | compute dtype {self.compute_dtype}",
            f"Model runs: {self.backend}",
            f"Base parameters: {self.base_params:,} | footprint {self.base_footprint_bytes / mb:,.1f} MB",
        ]
        if self.adapter:
            out.append(
                f"Adapter: {self.adapter} | {self.adapter_params:,} parameters | file "
                f"{self.adapter_file_bytes / mb:,.1f} MB | footprint with "
                f"{'the adapters' if len(self.adapters) > 1 else 'adapter'} "
                f"{self.footprint_with_adapter_bytes / mb:,.1f} MB"
            )
        else:
            out.append("Adapter: none (base-only)")
        for adapter in self.adapters[1:]:
            step = f" | step {adapter['step']}" if adapter.get("step") is not None else ""
            out.append(
                f"Also: {adapter['name']} ({adapter['source']}) | r={adapter['r']} | {adapter['parameters']:,} "
                f"parameters | file {adapter['file_bytes'] / mb:,.1f} MB | in memory "
                f"{adapter['footprint_bytes'] / mb:,.1f} MB{step}"
            )
        out.append(f"Load time: {self.load_seconds:.1f} s")
        if self.kernel:
            out.append(f"4-bit kernel: {self.kernel}")
        if self.cpu_threads:
            out.append(f"CPU threads for generation and the token lens: {self.cpu_threads}")
        if self.compiled_layers:
            out.append(
                f"Decode steps: {self.compiled_layers} of {self.layers} decoder layers in compiled calls "
                "(csrc/decode_layer.cpp)"
            )
        out.extend(f"Notice: {n}" for n in self.notices)
        return out

    def as_text(self) -> str:
        return "\n".join(self.lines())
