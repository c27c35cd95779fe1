"""Adapter files on disk: find them (local folder or hub id), read their config and safetensors header.

The header is read without loading a single weight (8-byte length + JSON), so shapes can be checked against
the base before peft touches the model, and sizes can be reported from the file itself.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from utils.core.errors import AdapterLoadError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
TEMPLATE_FILES = (
    "chat_template.jinja",
    "tokenizer_config.json",
)  # where a saved tokenizer keeps its template

_DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype code, e.g. "F32", "BF16"
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * _DTYPE_BYTES.get(self.dtype, 0)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor names, dtypes and shapes of a .safetensors file, reading only its header.

    Example: a file holding one 4 x 2 float32 tensor "w" -> {"w": TensorInfo("w", "F32", (4, 2))}.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            if length <= 0 or length > 100_000_000:
                raise ValueError(f"header length {length}")
            header = json.loads(fh.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise AdapterLoadError(
            f"{path.name} is not a readable safetensors file ({exc}); re-save the adapter."
        ) from exc
    return {
        name: TensorInfo(name, meta["dtype"], tuple(meta["shape"]))
        for name, meta in header.items()
        if name != "__metadata__"
    }


def adapter_chat_template(folder: Path | None) -> str | None:
    """The chat template an adapter folder ships (saved with its tokenizer), or None: chat_template.jinja, else
    tokenizer_config.json's "chat_template" (a string, or named templates of which "default" is taken)."""
    if folder is None:
        return None
    jinja = Path(folder) / TEMPLATE_FILES[0]
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = Path(folder) / TEMPLATE_FILES[1]
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (ValueError, AttributeError):
        return None
    if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def resolve_adapter_dir(adapter: str, token: str | None = None, revision: str | None = None) -> Path:
    """A local folder holding the adapter: the path itself, or a hub snapshot of only the adapter files (at
    `revision`, a commit, when the profile pins one)."""
    path = Path(adapter).expanduser()
    if path.exists():
        if not (path / ADAPTER_CONFIG).is_file():
            raise AdapterLoadError(f"{path} has no {ADAPTER_CONFIG}: it is not a PEFT adapter folder.")
        return path
    if adapter.startswith((".", "/", "~")) or adapter.count("/") != 1:
        raise AdapterLoadError(
            f"Adapter folder {adapter} does not exist: train it (python -m utils.task.train_adapter) "
            "or set LORA_LENS_ADAPTER to a PEFT adapter folder or hub id."
        )
    from huggingface_hub import snapshot_download

    try:
        local = snapshot_download(
            adapter,
            token=token,
            revision=revision,
            allow_patterns=[ADAPTER_CONFIG, ADAPTER_WEIGHTS, "adapter_model.bin", "*.md", *TEMPLATE_FILES],
        )
    except Exception as exc:  # hub errors come in many classes; the message is what matters
        raise AdapterLoadError(
            f"Adapter {adapter!r} could not be fetched from the hub ({type(exc).__name__}); "
            "check the id, the network and HF_TOKEN."
        ) from exc
    return Path(local)


def read_adapter_config(adapter_dir: Path) -> dict:
    try:
        return json.loads((Path(adapter_dir) / ADAPTER_CONFIG).read_text())
    except (OSError, ValueError) as exc:
        raise AdapterLoadError(
            f"{ADAPTER_CONFIG} in {adapter_dir} is missing or not JSON; re-save the adapter."
        ) from exc


def adapter_weights_file(adapter_dir: Path) -> Path:
    path = Path(adapter_dir) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise AdapterLoadError(f"{path} is missing: save the adapter with save_pretrained (safetensors).")
    return path
