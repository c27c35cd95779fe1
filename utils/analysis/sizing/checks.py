"""Three counts of the loaded adapter that must agree: the formula on the base's shapes, peft's count on the
model, and the adapter file's safetensors header (read without loading a tensor)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from utils.analysis.sizing.formula import ADAPTER_FILE, SAFETENSORS_BYTES
from utils.analysis.sizing.models import adapter_size, target_names
from utils.core.profiles import LoraSettings


@dataclass(frozen=True)
class SafetensorsSummary:
    """What a safetensors file's header says, read without loading a single weight."""

    path: Path
    tensors: int
    params: int
    data_bytes: int  # the tensors' bytes, from their offsets
    header_bytes: int  # 8-byte length plus the JSON header
    file_bytes: int
    dtypes: tuple[str, ...]  # e.g. ("F32",) or ("BF16",)


def read_safetensors_header(path: str | Path) -> SafetensorsSummary:
    """Tensor count, parameter count and bytes from a .safetensors header (8-byte length, then JSON)."""
    from utils.runtime.adapter_files import read_safetensors_header as read_tensors

    path = Path(path)
    tensors = read_tensors(path).values()
    data = sum(t.nbytes for t in tensors)
    file_bytes = path.stat().st_size
    return SafetensorsSummary(
        path,
        len(tensors),
        sum(t.numel for t in tensors),
        data,
        file_bytes - data,
        file_bytes,
        tuple(sorted({t.dtype for t in tensors})),
    )


@dataclass(frozen=True)
class CrossCheckRow:
    """One way of counting the adapter."""

    source: str  # "formula", "peft model", "adapter file"
    tensors: int | None
    params: int | None
    bytes: int | None  # bytes of the weights as this source holds them
    note: str = ""


@dataclass(frozen=True)
class CrossChecks:
    """The adapter counted three ways, side by side; `agree` is True when the parameter counts match."""

    rows: tuple[CrossCheckRow, ...]
    agree: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    headers = ("source", "tensors", "params", "bytes", "note")

    def table(self) -> list[list[str]]:
        """Rows of strings for a UI table (gr.Dataframe), in `headers` order."""
        fmt = lambda v: "" if v is None else f"{v:,}"  # noqa: E731
        return [[r.source, fmt(r.tensors), fmt(r.params), fmt(r.bytes), r.note] for r in self.rows]


def peft_lora_count(peft_model) -> tuple[int, int, int]:
    """(tensors, params, bytes) of the LoRA weights on a live model, counted from its lora_ parameters.

    Counting by name works on an inference-loaded adapter too, where get_nb_trainable_parameters()
    reports 0 because nothing requires grad.
    """
    tensors = params = nbytes = 0
    for name, p in peft_model.named_parameters():
        if any(part.startswith("lora_") for part in name.split(".")):
            tensors += 1
            params += p.numel()
            nbytes += p.numel() * p.element_size()
    return tensors, params, nbytes


def cross_checks(peft_model, adapter_dir: str | Path | None, config, lora: LoraSettings) -> CrossChecks:
    """The adapter's size three ways: the formula for `config` and `lora`, peft's count on the live model,
    and the adapter file's safetensors header. Where they cannot agree (a bf16 file), the note says why."""
    formula = adapter_size(config, lora)
    rows = [
        CrossCheckRow(
            "formula",
            formula.tensors,
            formula.params,
            formula.bytes_fp32,
            f"r x (in + out) over {formula.tensors // 2} layers, fp32",
        )
    ]
    notes = []
    tensors, params, nbytes = peft_lora_count(peft_model)
    trainable = (
        peft_model.get_nb_trainable_parameters()[0]
        if hasattr(peft_model, "get_nb_trainable_parameters")
        else 0
    )
    peft_note = "lora_A / lora_B parameters on the loaded model"
    if trainable:
        peft_note += f"; get_nb_trainable_parameters() = {trainable:,}"
    rows.append(CrossCheckRow("peft model", tensors, params, nbytes, peft_note))
    counts = [formula.params, params]

    if adapter_dir is not None:
        adapter_dir = Path(adapter_dir)
        file = adapter_dir / ADAPTER_FILE
        if file.is_file():
            s = read_safetensors_header(file)
            note = f"{', '.join(s.dtypes)}; file {s.file_bytes:,} bytes = {s.header_bytes:,} header + data"
            rows.append(CrossCheckRow("adapter file", s.tensors, s.params, s.data_bytes, note))
            counts.append(s.params)
            per_param = {SAFETENSORS_BYTES.get(d) for d in s.dtypes}
            if per_param != {4}:
                sizes = ", ".join(str(n) for n in sorted(per_param, key=str))
                notes.append(
                    f"The file stores {', '.join(s.dtypes)} ({sizes} bytes per param), so its bytes differ "
                    "from the fp32 formula; the params are what must agree. "
                    "peft loads the weights into fp32 by default."
                )
        elif (adapter_dir / "adapter_model.bin").is_file():
            size = (adapter_dir / "adapter_model.bin").stat().st_size
            rows.append(
                CrossCheckRow("adapter file", None, None, size, "adapter_model.bin: pickle, not read")
            )
            notes.append("The adapter is a pickled .bin file; its header cannot be read without loading it.")
        else:
            notes.append(f"No {ADAPTER_FILE} in {adapter_dir}.")
        cfg_file = adapter_dir / "adapter_config.json"
        if cfg_file.is_file():
            try:
                saved = json.loads(cfg_file.read_text())
            except ValueError:
                saved = {}
            if saved.get("r") not in (None, lora.r):
                notes.append(f"adapter_config.json has r = {saved['r']}, the formula used r = {lora.r}.")
            saved_targets = saved.get("target_modules")
            if isinstance(saved_targets, list) and set(saved_targets) != set(
                target_names(lora.target_modules)
            ):
                notes.append(
                    f"adapter_config.json targets {', '.join(sorted(saved_targets))}; "
                    f"the formula used {', '.join(target_names(lora.target_modules))}."
                )
    if params and nbytes != 4 * params:
        notes.append(f"The live adapter weights are not fp32 ({nbytes / params:g} bytes per param).")
    agree = len(set(counts)) == 1
    if not agree:
        notes.append(
            "The parameter counts differ: check that r and the target modules match the adapter's "
            "adapter_config.json."
        )
    return CrossChecks(tuple(rows), agree, tuple(notes))


__all__ = [
    "CrossCheckRow",
    "CrossChecks",
    "SafetensorsSummary",
    "cross_checks",
    "peft_lora_count",
    "read_safetensors_header",
]
