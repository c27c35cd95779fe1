"""Evaluate on your own data: parsing (JSONL, CSV, every refusal), the scores against plain peft runs and plain
forward passes, and the README's example run end to end through gradio_client against a running app."""

import json
import re
from pathlib import Path

import pytest
import torch

from utils.core.errors import InputError
from utils.runtime.engine import Engine
from utils.runtime.generation import separate_greedy_texts
from utils.task.own_data import MAX_FILE_BYTES, MAX_ITEMS, Example, evaluation_steps, fold, parse_examples

ROOT = Path(__file__).resolve().parent.parent


def test_jsonl_and_csv_give_the_same_examples():
    jsonl = b'{"prompt": "2 + 2 =", "answer": " 4"}\n\n{"prompt": "Capital of France?", "answer": "Paris"}\n'
    csv = b'prompt,answer\n2 + 2 =, 4\n"Capital of France?",Paris\n'
    expected = [Example("2 + 2 =", " 4"), Example("Capital of France?", "Paris")]
    assert parse_examples(jsonl, "data.jsonl") == expected
    assert parse_examples(csv, "data.csv") == expected
    assert parse_examples(b"\xef\xbb\xbf" + csv, "upload") == expected  # a BOM, and the format sniffed


@pytest.mark.parametrize(
    ("data", "name", "message"),
    [
        (b"", "d.jsonl", "The file is empty"),
        (b"\xff\xfe\x00", "d.jsonl", "not UTF-8"),
        (b'{"prompt": "a"', "d.jsonl", "Line 1 is not a JSON object"),
        (b'["a", "b"]', "d.jsonl", "Line 1 is not an object"),
        (b'{"prompt": "a", "answer": 4}', "d.jsonl", "answer is missing or empty"),
        (b'{"prompt": " ", "answer": "x"}', "d.jsonl", "prompt is missing or empty"),
        (b"question,reply\na,b\n", "d.csv", "columns prompt and answer"),
        (b'{"prompt": "' + b"p" * 4001 + b'", "answer": "a"}', "d.jsonl", "too long"),
        (b'{"prompt": "p", "answer": "a"}\n' * (MAX_ITEMS + 1), "d.jsonl", f"at most {MAX_ITEMS}"),
        (b" " * (MAX_FILE_BYTES + 1), "d.jsonl", "at most 1,000,000"),
    ],
)
def test_bad_files_are_refused_with_a_message(data, name, message):
    with pytest.raises(InputError, match=re.escape(message)):
        parse_examples(data, name)


def test_fold_ignores_case_and_white_space():
    assert fold("  Paris\n") == fold("PARIS") == "paris" and fold("a\u00a0 b") == "a b"


EXAMPLES = [
    Example(
        "How much does this cost to the nearest dollar?\n\nSteel water bottle, 750 ml\n\nPrice is $", "19"
    ),
    Example("Once upon a time", " there was"),
    Example("The three primary colours are", " red, yellow and blue"),
]


@pytest.fixture(scope="module")
def report(tiny_pair):
    steps = list(evaluation_steps(Engine(tiny_pair), EXAMPLES, max_new_tokens=6))
    assert steps[:-1] == [(3, 3)]
    return steps[-1]


def test_greedy_answers_equal_plain_peft_runs(report, tiny_pair):
    separate = separate_greedy_texts(tiny_pair.model, tiny_pair.tokenizer, [e.prompt for e in EXAMPLES], 6)
    assert [s.models["base"].text for s in report.items] == separate["base"]
    assert [s.models["fine_tuned"].text for s in report.items] == separate["fine-tuned"]
    assert separate["base"] != separate["fine-tuned"]


def test_reference_logprobs_equal_plain_forward_passes(report, tiny_pair):
    """log p(answer | prompt) by hand: encode prompt + answer, keep what follows the prompt's encoding, sum the
    log-softmax of a plain forward pass, with the adapter disabled (base) and enabled (fine-tune)."""
    model, tokenizer = tiny_pair.model, tiny_pair.tokenizer

    def encode(text):
        return tokenizer(text, add_special_tokens=True, split_special_tokens=True)["input_ids"]

    for score, example in zip(report.items, EXAMPLES, strict=True):
        prompt_ids = encode(example.prompt)
        ids = encode(example.prompt + example.answer)
        assert score.answer_tokens == len(ids) - len(prompt_ids) > 0
        with model.disable_adapter():
            base = _plain_answer_logprob(model, ids, len(prompt_ids))
        tuned = _plain_answer_logprob(model, ids, len(prompt_ids))
        assert score.models["base"].logprob_answer == pytest.approx(base, abs=1e-3)
        assert score.models["fine_tuned"].logprob_answer == pytest.approx(tuned, abs=1e-3)
        assert score.logprob_gain == pytest.approx(tuned - base, abs=2e-3)


def _plain_answer_logprob(model, ids: list[int], answer_from: int) -> float:
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return sum(float(logprobs[j - 1, ids[j]]) for j in range(answer_from, len(ids)))


def test_totals_and_flips_follow_from_the_items(report):
    for key in ("base", "fine_tuned"):
        models = [s.models[key] for s in report.items]
        assert report.totals[key]["contains"] == pytest.approx(sum(m.contains for m in models) / 3)
        assert report.totals[key]["exact_match"] == pytest.approx(sum(m.exact for m in models) / 3)
        mean = sum(m.logprob_answer for m in models) / 3
        assert report.totals[key]["mean_logprob_answer"] == pytest.approx(mean)
        per_token = sum(m.logprob_answer for m in models) / sum(s.answer_tokens for s in report.items)
        assert report.totals[key]["logprob_per_answer_token"] == pytest.approx(per_token)
    flips = report.flips()
    for i, s in enumerate(report.items):
        assert (i in flips["fixed"]) == (s.models["fine_tuned"].contains and not s.models["base"].contains)
        assert (i in flips["broken"]) == (s.models["base"].contains and not s.models["fine_tuned"].contains)


def test_a_base_only_backend_is_told_why():
    class BaseOnly:
        has_adapter = False

    with pytest.raises(InputError, match="no adapter is loaded"):
        next(evaluation_steps(BaseOnly(), EXAMPLES))


def _readme_example() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("<!-- own-data example")
    block = readme[start:].split("```python\n", 1)[1]
    return block.split("```", 1)[0]


def test_the_readme_example_runs_end_to_end_through_gradio_client(tiny_pair, tmp_path, monkeypatch, capsys):
    from tests.test_app_api import serve

    demo, url = serve(Engine(tiny_pair))
    try:
        code = _readme_example()
        assert 'Client("http://127.0.0.1:7860")' in code
        monkeypatch.chdir(tmp_path)  # the example writes my_data.jsonl where it runs
        namespace: dict = {}
        exec(compile(code.replace("http://127.0.0.1:7860", url), "README.md", "exec"), namespace)
    finally:
        demo.close()
    report = namespace["report"]
    assert report["n_items"] == 2 and report["max_new_tokens"] == 16
    assert set(report["totals"]) == {"base", "fine_tuned"} and set(report["flips"]) == {"fixed", "broken"}
    examples = [Example(**json.loads(line)) for line in (tmp_path / "my_data.jsonl").read_text().splitlines()]
    local = list(evaluation_steps(Engine(tiny_pair), examples, max_new_tokens=16))[-1]
    for item, score in zip(report["items"], local.items, strict=True):
        for key in ("base", "fine_tuned"):
            assert item[key]["text"] == score.models[key].text
            assert item[key]["logprob_answer"] == pytest.approx(score.models[key].logprob_answer, abs=1e-4)
    assert "Paris" in capsys.readouterr().out
    import gradio as gr

    assert list(Path(gr.utils.get_upload_folder()).rglob("my_data.jsonl")) == []  # deleted once read


def test_the_endpoint_refuses_a_server_path_and_deletes_nothing(tiny_pair, tmp_path):
    """A raw request that names a file on the server instead of uploading one is refused, and the file stays."""
    import httpx

    from tests.test_app_api import serve

    planted = tmp_path / "secret.jsonl"
    planted.write_text('{"prompt": "p", "answer": "a"}\n')
    demo, url = serve(Engine(tiny_pair))
    url = url.rstrip("/")
    try:
        payload = {"data": [{"path": str(planted), "meta": {"_type": "gradio.FileData"}}, 4]}
        response = httpx.post(f"{url}/gradio_api/call/evaluate_data", json=payload, timeout=60)
        if response.status_code == 200:
            event_id = response.json()["event_id"]
            with httpx.stream(
                "GET", f"{url}/gradio_api/call/evaluate_data/{event_id}", timeout=120
            ) as events:
                body = "".join(events.iter_text())
            assert "event: error" in body and '"n_items"' not in body
        else:
            assert response.status_code in (400, 403, 422)
    finally:
        demo.close()
    assert planted.exists()
