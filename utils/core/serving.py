"""Where the views' model runs, read from the environment: the in-process engine (`LORA_LENS_BACKEND=local`,
the default) or an OpenAI-compatible vLLM server (`LORA_LENS_BACKEND=vllm` at `LORA_LENS_VLLM_URL`), and the
settings of talking to one: time-outs, names on the server, scaled adapter copies, concurrency, parity."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from utils.core.errors import ProfileError

BACKENDS = ("local", "vllm")
URL_PATTERN = re.compile(r"https?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?(/[A-Za-z0-9._~/\-]*)?")
# name on the server: the characters vLLM's model names use in practice (hub ids, paths' last parts)
SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@\-]{0,199}")


@dataclass(frozen=True)
class ServingSettings:
    """How the app reaches a serving engine (all from LORA_LENS_* variables; see the README's table)."""

    backend: str = "local"  # LORA_LENS_BACKEND: local | vllm
    vllm_url: str | None = None  # LORA_LENS_VLLM_URL: the server's root, e.g. http://127.0.0.1:8000
    timeout_s: float = 120.0  # LORA_LENS_VLLM_TIMEOUT_S: connect, and longest wait for any answer or token
    model: str | None = None  # LORA_LENS_VLLM_MODEL: the base's name there; None = the one base it serves
    adapter: str | None = None  # LORA_LENS_VLLM_ADAPTER: the primary adapter's name there; None = matched
    concurrency: int = 16  # LORA_LENS_VLLM_CONCURRENCY: model events the app runs at once on the server
    scaled_copies: int = 4  # LORA_LENS_VLLM_SCALED_COPIES: scaled adapter copies kept registered at once
    copy_dir: Path | None = None  # LORA_LENS_VLLM_COPY_DIR: where copies are written (the server reads them)
    max_logprobs: int = 20  # LORA_LENS_VLLM_MAX_LOGPROBS: the server's --max-logprobs (top-k it returns)
    parity: bool = False  # LORA_LENS_PARITY=1: with the vllm backend, also load the in-process reference

    @property
    def remote(self) -> bool:
        return self.backend == "vllm"

    @property
    def parity_available(self) -> bool:
        """Both backends configured: the local engine serves and a server is named, or the reverse."""
        return bool(self.vllm_url) and (self.backend == "local" or self.parity)


def read_serving(env, cache_dir: Path) -> ServingSettings:
    """The serving settings from the environment, each checked; a bad value is a ProfileError naming it."""
    backend = (env.get("LORA_LENS_BACKEND") or "local").strip().lower()
    if backend not in BACKENDS:
        raise ProfileError(f"LORA_LENS_BACKEND={backend[:20]!r} is not one of {', '.join(BACKENDS)}.")
    url = (env.get("LORA_LENS_VLLM_URL") or "").strip().rstrip("/") or None
    if url is not None:
        url = url[: -len("/v1")] if url.endswith("/v1") else url
        if not URL_PATTERN.fullmatch(url):
            raise ProfileError(f"LORA_LENS_VLLM_URL={url[:80]!r} is not an http(s) URL of a server's root.")
    if backend == "vllm" and url is None:
        raise ProfileError("LORA_LENS_BACKEND=vllm needs LORA_LENS_VLLM_URL (e.g. http://127.0.0.1:8000).")
    names = {}
    for variable in ("LORA_LENS_VLLM_MODEL", "LORA_LENS_VLLM_ADAPTER"):
        value = (env.get(variable) or "").strip() or None
        if value is not None and not SERVED_NAME.fullmatch(value):
            raise ProfileError(f"{variable}={value[:60]!r} is not a model name a server can have.")
        names[variable] = value
    copy_dir = (env.get("LORA_LENS_VLLM_COPY_DIR") or "").strip()
    return ServingSettings(
        backend=backend,
        vllm_url=url,
        timeout_s=_number(env, "LORA_LENS_VLLM_TIMEOUT_S", 120.0, 0.05, 3600.0),
        model=names["LORA_LENS_VLLM_MODEL"],
        adapter=names["LORA_LENS_VLLM_ADAPTER"],
        concurrency=int(_number(env, "LORA_LENS_VLLM_CONCURRENCY", 16, 1, 256)),
        scaled_copies=int(_number(env, "LORA_LENS_VLLM_SCALED_COPIES", 4, 1, 64)),
        copy_dir=Path(copy_dir) if copy_dir else cache_dir / "scaled-adapters",
        max_logprobs=int(_number(env, "LORA_LENS_VLLM_MAX_LOGPROBS", 20, 1, 1000)),
        parity=(env.get("LORA_LENS_PARITY") or "").strip().lower() in ("1", "true", "yes"),
    )


def _number(env, variable: str, default: float, low: float, high: float) -> float:
    raw = (env.get(variable) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not low <= value <= high:
        raise ProfileError(f"{variable}={raw[:20]!r} is not a number from {low:g} to {high:g}.")
    return value
