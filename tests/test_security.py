"""Secrets and reach: the token never shows, visitors cannot pick models or files, remote code stays off."""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PLANTED = "hf_PLANTEDsecretVALUE0123456789abcdef"


def _get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def tiny_app_url(tiny_pair):
    import app
    from tests.test_app_api import free_port, launch_on_loopback

    demo = app.build_demo(tiny_pair)
    port = free_port()
    launch_on_loopback(demo, port)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.mark.parametrize(
    "path",
    [
        "/gradio_api/file=/etc/passwd",
        "/gradio_api/file=../../../../etc/passwd",
        "/gradio_api/file=app.py",
        "/gradio_api/file=README.md",
        "/gradio_api/file=" + str(ROOT / "utils" / "profiles.py"),
        "/file=/etc/passwd",
        "/gradio_api/file="
        + str(Path.home() / ".cache" / "lora-lens" / "smollm2-135m-instruct" / "config.json"),
    ],
)
def test_server_files_are_not_served(tiny_app_url, path):
    status, body = _get(tiny_app_url + path)
    assert status >= 400, (path, status)
    assert "root:x:" not in body and "read_settings" not in body


def test_no_endpoint_takes_a_model_or_a_path(tiny_app_url):
    from gradio_client import Client

    info = Client(tiny_app_url, verbose=False).view_api(return_format="dict", print_info=False)
    names = {
        p["parameter_name"].lower()
        for endpoint in info["named_endpoints"].values()
        for p in endpoint["parameters"]
    }
    # Every parameter a visitor can send; none names a model, an adapter, a profile or a token.
    # use_adapter is the on/off toggle of the one adapter loaded at start; strength(s) scale it; file is the
    # data of /evaluate_data, an upload read as JSONL / CSV text and deleted (test_own_data.py). adapter(s),
    # panes, a and b name adapters the server loaded at start, looked up by name only (never as a path):
    # test_an_adapter_name_never_reaches_the_disk. prompt_format and base_format choose among the templates the
    # server's files ship, or carry a template rendered in an isolated sandbox (test_prompt_format.py).
    # kind picks one of three exports of the loaded adapter; n_items counts catalog items.
    assert names == {
        "kind",
        "n_items",
        "prompt_format",
        "base_format",
        "adapter",
        "adapters",
        "panes",
        "pair",
        "a",
        "b",
        "top_k",
        "n_passages",
        "strength",
        "strengths",
        "layers",
        "modules",
        "prompt",
        "use_adapter",
        "max_new_tokens",
        "temperature",
        "top_p",
        "seed",
        "description",
        "r",
        "alpha",
        "target_modules",
        "file",
    }


def test_remote_code_is_never_enabled(monkeypatch, tiny_settings):
    """Every from_pretrained the loader makes passes trust_remote_code=False."""
    import transformers

    from utils.core.profiles import resolve_profile
    from utils.runtime.loading import load_base

    seen = []
    real_model, real_tok = (
        transformers.AutoModelForCausalLM.from_pretrained,
        transformers.AutoTokenizer.from_pretrained,
    )

    def spy(real):
        def wrapped(*args, **kwargs):
            seen.append(kwargs.get("trust_remote_code"))
            return real(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", spy(real_model))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy(real_tok))
    load_base(resolve_profile(tiny_settings), tiny_settings, device="cpu")
    assert seen == [False, False]


@pytest.mark.slow
def test_planted_token_never_appears(tmp_path, cache_dir):
    """The gated profile with a planted token: it cannot load offline, falls back, and the token shows nowhere."""
    from gradio_client import Client

    from tests.test_app_api import free_port

    port = free_port()
    env = {
        **os.environ,
        "HF_TOKEN": PLANTED,
        "LORA_LENS_PROFILE": "llama31-pricer",
        "LORA_LENS_CACHE_DIR": str(cache_dir),
        "HF_HUB_OFFLINE": "1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
    }
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "app.py", "--host", "127.0.0.1", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert server.poll() is None, log_path.read_text()[-3000:]
            try:
                status, _ = _get(url + "/config")
                if status == 200:
                    break
            except OSError:
                pass
            time.sleep(1)
        seen = [_get(url + p)[1] for p in ("/", "/config", "/gradio_api/info")]
        client = Client(url, verbose=False)
        seen.append(str(client.predict(api_name="/architecture")))
        for bad in ({"prompt": ""}, {"prompt": "x", "temperature": float("nan")}, {"prompt": "$HF_TOKEN"}):
            try:
                seen.append(str(client.predict(api_name="/generate", **bad)))
            except Exception as exc:  # errors are part of what a visitor sees
                seen.append(str(exc))
    finally:
        server.terminate()
        server.wait(timeout=30)
    logs = log_path.read_text()
    assert "Started on the embedded default" in logs or "embedded default" in logs
    assert PLANTED not in logs
    for text in seen:
        assert PLANTED not in text
    assert any("HF_TOKEN" in text or "embedded default" in text for text in seen)


def test_an_adapter_name_never_reaches_the_disk(tiny_app_url):
    """A name that is a path or a hub id is only looked up among the loaded adapters: refused, nothing read."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    client = Client(tiny_app_url, verbose=False)
    for name in ("../adapters/smollm2-pricer", "/etc/passwd", "ed-donner/pricer-2024-09-13_13.04.39"):
        for call in (
            dict(prompt="x", adapter=name, api_name="/generate"),
            dict(prompt="x", panes=[{"adapter": name, "strength": 1}], api_name="/compare"),
            dict(adapter=name, api_name="/anatomy"),
        ):
            with pytest.raises(AppError, match="No adapter is called"):
                client.predict(**call)
