"""What a vLLM server serves, mapped to what the app has loaded: the base's name there, each adapter's, the
server's state (reachable, mismatched, down) for the header, and the served model of each batch row (the
base, an adapter, or a scaled copy). A mixin of VllmBackend, which holds `client`, `serving`, `files`,
`tokenizer`, `copies` and `_lock`."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from utils.core.errors import InputError, ServingError

TOKENIZER_PROBE = "Price is $19.99 for a naïve café in 東京."  # plain text: servers read special spellings


class ServedNames:
    def refresh(self) -> None:
        """Ask the server what it serves and map the base and each adapter to its name there; the state line
        the header shows. Never raises: an unreachable or mismatched server is a state, and requests say it."""
        try:
            elapsed = self.client.ping()
            models = self.client.get("/v1/models").get("data", [])
        except ServingError as exc:
            with self._lock:
                self.base_name, self.state = None, f"unreachable: {exc}"
            return
        bases = [m for m in models if not m.get("parent")]
        loras = {m["id"]: m for m in models if m.get("parent")}
        problem, base = "", None
        if self.serving.model:
            base = next((m for m in bases if m["id"] == self.serving.model), None)
            if base is None:
                problem = (
                    f"it does not serve {self.serving.model!r} (LORA_LENS_VLLM_MODEL); it serves "
                    f"{', '.join(m['id'] for m in bases) or 'nothing'}"
                )
        elif len(bases) == 1:
            base = bases[0]
        else:
            problem = f"it serves {len(bases)} base models; name one with LORA_LENS_VLLM_MODEL"
        served, missing = {}, []
        for i, adapter in enumerate(self.files.adapters):
            name = self.serving.adapter if i == 0 and self.serving.adapter else None
            if name is None:
                name = adapter.name if adapter.name in loras else _by_path(loras, adapter.directory)
            if name is None or name not in loras:
                missing.append(adapter.name)
            else:
                served[adapter.name] = name
        if base is not None and not problem:
            problem = self._tokenizer_differs(base["id"])
            self.context_length = min(
                self.context_length, int(base.get("max_model_len") or self.context_length)
            )
        with self._lock:
            self.served = served
            if problem:
                self.base_name, self.state = None, f"mismatched: {problem}"
            else:
                self.base_name = base["id"]
                lacking = (
                    f"; not registered there: {', '.join(missing)} (start it with --lora-modules NAME=PATH)"
                    if missing
                    else ""
                )
                self.state = f"reachable ({elapsed:.0f} ms), serving {base['id']}{lacking}"

    def status(self, refresh: bool = False) -> str:
        if refresh:
            self.refresh()
        copies = self.copies.names()
        held = f"; scaled copies registered: {', '.join(copies)}" if copies else ""
        adapters = ", ".join(f"{here} as {there}" for here, there in self.served.items()) or "none"
        return f"vLLM at {self.serving.vllm_url}: {self.state}; adapters: {adapters}{held}"

    def _tokenizer_differs(self, model: str) -> str:
        local = self.tokenizer(TOKENIZER_PROBE, add_special_tokens=True)["input_ids"]
        try:
            answer = self.client.post("/tokenize", {"model": model, "prompt": TOKENIZER_PROBE})
        except ServingError:
            return ""  # a server without /tokenize: the greedy texts will tell
        if (answer.get("tokens") or []) != local:
            return f"its tokenizer differs from the local base's ({shown_base(self.files.base_source)})"
        return ""

    def _base(self) -> str:
        if self.base_name is None:
            self.refresh()
        if self.base_name is None:
            raise ServingError(f"The model server is not usable: {self.status()}")
        return self.base_name

    @contextmanager
    def _model_for(self, strength, adapter: int | None):
        """The served model name of one row: the base, the adapter, or a scaled copy held while in use."""
        base = self._base()
        if adapter is None:
            yield base
            return
        if isinstance(strength, (tuple, list)):
            raise InputError(
                "A vLLM server applies an adapter at one strength per request: per-layer strengths "
                "(ablation) run on the in-process engine only."
            )
        entry = self.files.adapters[adapter]
        name = self.served.get(entry.name)
        if name is None:
            raise ServingError(
                f"Adapter {entry.name!r} is not registered on the server ({self.status()}). Start vLLM with "
                f"--lora-modules {entry.name}=<its folder>, or register it with /v1/load_lora_adapter."
            )
        if float(strength) == 1.0:
            yield name
            return
        with self.copies.use(name, entry.directory, float(strength)) as copy:
            yield copy


def _by_path(loras: dict, folder) -> str | None:
    for name, model in loras.items():
        root = model.get("root")
        if root and folder is not None and Path(root).resolve() == Path(folder).resolve():
            return name
    return None


def shown_base(source: str) -> str:
    """The base as the page names it: a hub id as is, a local folder by its name (never the server's paths)."""
    path = Path(source)
    return path.name if path.is_absolute() else source
