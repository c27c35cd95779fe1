"""The UI helpers in ui/views.py, on hand-made inputs: no model, no server."""

import copy
from pathlib import Path

import pytest
import torch

from ui import views
from utils.core import inputs, profiles
from utils.core.errors import InputError
from utils.core.profiles import PRICER_PROMPT, SMOLLM2_PRICER, LoraSettings
from utils.core.seam import BASE, FINE_TUNED, PANE_LABELS, NextTokenView, PaneState
from utils.runtime.loading import LoadReport
from utils.task import pricing


class StubTokenizer:
    """decode(ids) -> the vocabulary entries joined, like a real tokenizer's decode."""

    def __init__(self, vocab: list[str]):
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[int(i)] for i in ids)


VOCAB = ["<eos>", "1", "2", "3", " mug", "x", "9"]
TOKENIZER = StubTokenizer(VOCAB)


def _report(**overrides) -> LoadReport:
    values = dict(
        profile="smollm2-pricer",
        title="SmolLM2 + pricer",
        base="embedded:smollm2-135m-instruct",
        adapter="adapters/smollm2-pricer",
        device="cpu",
        precision="nf4",
        compute_dtype="float32",
        base_params=134_515_008,
        base_footprint_bytes=111_000_000,
        footprint_with_adapter_bytes=130_000_000,
        adapter_params=4_884_480,
        adapter_file_bytes=19_546_328,
        load_seconds=3.25,
        notices=[],
    )
    values.update(overrides)
    return LoadReport(**values)


def _pane(key, ids, done=True) -> PaneState:
    pane = PaneState(key, PANE_LABELS[key], token_ids=list(ids), text=TOKENIZER.decode(ids), done=done)
    pane.first_token_s, pane.last_token_s, pane.finish_reason = 0.1, 0.5, "length"
    return pane


def _view(key, probabilities) -> NextTokenView:
    logits = torch.log(torch.tensor(probabilities, dtype=torch.float32))
    p, idx = torch.softmax(logits, -1).topk(len(probabilities))  # the whole (tiny) vocabulary, ranked
    ids = idx.tolist()
    return NextTokenView(key, [VOCAB[i] for i in ids], ids, p.tolist())


# ---------------------------------------------------------------------------------------------------
# Header


def test_header_names_base_adapter_device_precision_and_footprints():
    text = views.header_html(_report(), SMOLLM2_PRICER)
    for expected in (
        "embedded:smollm2-135m-instruct",
        "adapters/smollm2-pricer",
        "cpu",
        "NF4 4-bit",
        "134,515,008 (134.52 M)",
        "130.00 MB with the adapter",  # footprint with adapter
        "adapter adds 19.00 MB",  # 130.0 - 111.0 MB
        "file 19.55 MB",
        SMOLLM2_PRICER.title,
    ):
        assert expected in text, expected
    assert "lens-notice" not in text


def test_header_shows_notices_and_base_only_escaped():
    report = _report(adapter=None, adapter_params=0, notices=["Running base-only: <b>bad</b> adapter"])
    text = views.header_html(report)
    assert "none: base-only" in text
    assert "&lt;b&gt;bad&lt;/b&gt;" in text and "<b>bad</b>" not in text
    assert 'class="lens-notice"' in text


@pytest.mark.parametrize(
    "n, text",
    [
        (8_030_261_248, "8,030,261,248 (8.03 B)"),
        (27_262_976, "27,262,976 (27.26 M)"),
        (7_168, "7,168 (7.17 k)"),
        (12, "12"),
    ],
)
def test_format_count(n, text):
    assert views.format_count(n) == text


# ---------------------------------------------------------------------------------------------------
# Divergence and stats


def test_divergence_shows_index_shared_text_and_both_continuations():
    # base "1 2 3", fine-tuned "1 9": shared "1", they differ at token 1
    html = views.divergence_html(_pane(BASE, [1, 2, 3]), _pane(FINE_TUNED, [1, 6]), TOKENIZER.decode, True)
    assert "first differ at token 1" in html
    assert "<pre>1</pre>" in html
    assert '<pre class="base">23</pre>' in html and '<pre class="tuned">9</pre>' in html


def test_divergence_identical_and_not_yet():
    same = views.divergence_html(_pane(BASE, [1, 2]), _pane(FINE_TUNED, [1, 2]), TOKENIZER.decode, True)
    assert "identical (2 tokens)" in same
    # while streaming, one pane ahead of the other is not a difference yet
    early = views.divergence_html(_pane(BASE, [1, 2]), _pane(FINE_TUNED, [1]), TOKENIZER.decode, False)
    assert "No difference yet (1 tokens so far)" in early


def test_divergence_when_one_pane_ends_first():
    html = views.divergence_html(_pane(BASE, [1]), _pane(FINE_TUNED, [1, 2]), TOKENIZER.decode, True)
    assert "first differ at token 1" in html and "(ends here)" in html


def test_divergence_escapes_model_output():
    tokenizer = StubTokenizer(["<script>", "ok"])
    html = views.divergence_html(_pane(BASE, [0]), _pane(FINE_TUNED, [1]), tokenizer.decode, True)
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_divergence_needs_both_panes():
    assert views.divergence_html(_pane(BASE, [1]), None, TOKENIZER.decode, True) == ""


def test_pane_stats_is_the_engine_line():
    pane = _pane(BASE, [1, 2, 3])  # 3 tokens, 2 gaps over 0.4 s = 5 tok/s, first token at 100 ms
    assert views.pane_stats(pane) == "3 tokens | 5.0 tok/s | first token 100 ms | stopped: length"
    assert views.pane_stats(None) == ""


def test_stop_signal_is_fresh_per_session_and_per_run():
    template = views.StopSignal()
    session = copy.deepcopy(template)  # what gr.State does for each new session
    assert session is not template and session.event is not template.event
    first = session.start()
    session.stop()
    assert first.is_set() and not template.event.is_set()
    second = session.start()  # a new run is never stopped by the old Stop
    assert not second.is_set()


# ---------------------------------------------------------------------------------------------------
# Pricer


def test_task_prompt_detection():
    prompt = PRICER_PROMPT.replace("{description}", "Red mug")
    assert pricing.task_tail(PRICER_PROMPT) == "Price is $"
    assert pricing.is_task_prompt(prompt, PRICER_PROMPT)
    assert pricing.is_task_prompt(prompt + " \n", PRICER_PROMPT)
    assert not pricing.is_task_prompt("Red mug", PRICER_PROMPT)
    assert not pricing.is_task_prompt(prompt, None)


def test_example_prompts_build_the_task_prompt_and_add_free_text():
    examples = views.example_prompts(SMOLLM2_PRICER, n=2)
    priced = [p for label, p in examples if label.startswith("Price: ")]
    assert len(priced) == 2
    assert all(p.startswith("How much does this cost") and p.endswith("Price is $") for p in priced)
    assert [p for label, p in examples if label.startswith("Free: ")] == list(views.FREE_PROMPTS)


def test_price_estimates_by_hand():
    # next-token probabilities: "1" 0.5, "2" 0.3, "x" 0.2 -> top-2 numeric: (1*0.5 + 2*0.3) / 0.8 = 1.375
    views_ = {BASE: _view(BASE, [1e-9, 0.5, 0.3, 1e-9, 1e-9, 0.2, 1e-9])}
    out = views.price_estimates({BASE: "149 dollars"}, views_, k=2)[BASE]
    assert out["extracted_price"] == 149.0
    assert out["topk_estimate"] == pytest.approx(1.375)
    # the expected leading digit put at the greedy number's magnitude: 149 + (1.375 - 1) * 100
    assert out["topk_price"] == pytest.approx(186.5)
    assert [c["token"] for c in out["candidates"]] == ["1", "2"]


def test_price_table_has_one_row_per_pane():
    estimates = {
        BASE: {
            "label": PANE_LABELS[BASE],
            "extracted_price": None,
            "topk_estimate": None,
            "topk_price": None,
        },
        FINE_TUNED: {
            "label": PANE_LABELS[FINE_TUNED],
            "extracted_price": 12.0,
            "topk_estimate": 1.5,
            "topk_price": 17.0,
        },
    }
    table = views.price_table_markdown(estimates, k=3)
    assert "| Base | n/a | n/a | n/a |" in table
    assert "| Fine-tuned | $12.00 | 1.50 | $17.00 |" in table
    assert "{k}" not in table


@pytest.mark.parametrize("text, shown", [(" 1", "␣1"), ("\n", "\\n"), ("", "(empty)"), ("42", "42")])
def test_display_token(text, shown):
    assert views.display_token(text) == shown


def test_next_token_frame_groups_the_union_of_top_tokens():
    base = _view(BASE, [0.01, 0.6, 0.3, 0.05, 0.02, 0.01, 0.01])  # top: "1", "2", "3"
    tuned = _view(FINE_TUNED, [0.01, 0.05, 0.1, 0.02, 0.02, 0.1, 0.7])  # top: "9", "2"/"x"
    frame = views.next_token_frame({BASE: base, FINE_TUNED: tuned}, top=3)
    assert list(frame.columns) == ["token", "token_id", "pane", "probability"]
    # ordered by the highest probability in any pane: "9" (0.7), "1" (0.6), "2" (0.3)
    assert list(dict.fromkeys(frame["token"])) == ["9", "1", "2"]
    assert len(frame) == 6  # every token has a bar for both panes
    row = frame[(frame["token"] == "1") & (frame["pane"] == PANE_LABELS[FINE_TUNED])]
    assert row["probability"].item() == pytest.approx(0.05, rel=1e-4)  # read from the pane's full logits


def test_next_token_figure_draws_grouped_bars():
    frame = views.next_token_frame(
        {BASE: _view(BASE, [0.1] * 7), FINE_TUNED: _view(FINE_TUNED, [0.2] + [0.8 / 6] * 6)}
    )
    figure = views.next_token_figure(frame)
    axis = figure.axes[0]
    assert len(axis.patches) == len(frame)  # one bar per (token, pane)
    assert [t.get_text() for t in axis.get_legend().get_texts()] == [
        PANE_LABELS[BASE],
        PANE_LABELS[FINE_TUNED],
    ]


# ---------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("value, expected", [(20, 20), (20.0, 20), ("7", 7), (1, 1), (200, 200)])
def test_check_n_items_accepts(value, expected):
    assert inputs.check_n_items(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        (0, "between 1 and 200"),
        (201, "between 1 and 200"),
        (2.5, "whole number"),
        ("many", "must be a number"),
        (float("nan"), "finite"),
        (None, "must be a number"),
        (True, "must be a number"),
        ([3], "must be a number"),
    ],
)
def test_check_n_items_refuses(value, message):
    with pytest.raises(InputError, match=message):
        inputs.check_n_items(value)


def test_check_flag():
    assert inputs.check_flag("use_adapter", True) is True
    assert inputs.check_flag("use_adapter", 0) is False
    with pytest.raises(InputError, match="true or false"):
        inputs.check_flag("use_adapter", "yes")


def test_parse_lora_inputs():
    lora = inputs.parse_lora_inputs("32", 64.0, " q_proj, v_proj ,q_proj")
    assert lora == LoraSettings(r=32, alpha=64, target_modules=("q_proj", "v_proj"))
    assert inputs.parse_lora_inputs(8, 0.5, ["all-linear"]).alpha == 0.5


@pytest.mark.parametrize(
    "r, alpha, targets, message",
    [
        (0, 64, "q_proj", "r must be between 1 and 1024"),
        (1025, 64, "q_proj", "r must be between 1 and 1024"),
        (8.5, 64, "q_proj", "whole number"),
        ("inf", 64, "q_proj", "finite"),
        (8, 0, "q_proj", "alpha must be greater than 0"),
        (8, -1, "q_proj", "alpha must be greater than 0"),
        (8, "nan", "q_proj", "finite"),
        (8, 16, "", "at least one target module"),
        (8, 16, " , ", "at least one target module"),
        (8, 16, "q_proj;drop", "is not a module name"),
        (8, 16, 42, "must be text"),
        (8, 16, ",".join(f"m{i}" for i in range(40)), "At most 32"),
    ],
)
def test_parse_lora_inputs_refuses(r, alpha, targets, message):
    with pytest.raises(InputError, match=message):
        inputs.parse_lora_inputs(r, alpha, targets)


def test_adapter_lora_reads_the_adapter_config(tmp_path: Path):
    fallback = LoraSettings()
    assert profiles.adapter_lora(None, fallback) is fallback
    assert profiles.adapter_lora(tmp_path, fallback) is fallback  # no config there
    (tmp_path / "adapter_config.json").write_text(
        '{"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["v_proj", "q_proj"]}'
    )
    assert profiles.adapter_lora(tmp_path, fallback) == LoraSettings(8, 16, 0.05, ("q_proj", "v_proj"))


# ---------------------------------------------------------------------------------------------------
# Size math and evaluation tables


@pytest.fixture(scope="module")
def reference_report():
    from utils.analysis.sizing import size_report

    return size_report("llama31-pricer")


def test_size_summary_pins_the_reference_numbers(reference_report):
    frame = views.size_summary_frame({"ref": reference_report})
    table = dict(zip(frame["quantity"], frame["ref"], strict=True))
    assert table["Adapter parameters"] == "27,262,976"
    assert table["Adapter in fp32"] == "109,051,904 bytes = 109.05 MB"
    assert table["Base parameters"] == "8,030,261,248 (8.03 B)"
    assert table["Base in fp32"] == "32,121,044,992 bytes = 32.12 GB"
    assert table["Base in NF4 (weights)"] == "5,591,539,712 bytes = 5.59 GB"
    assert table["NF4 base + fp32 adapter"] == "5,700,591,616 bytes = 5.70 GB"


def test_size_chart_has_base_and_adapter_per_dtype(reference_report):
    figure = views.size_chart({"a": reference_report, "b": reference_report})
    assert len(figure.axes) == 2
    heights = [p.get_height() for p in figure.axes[0].patches]
    # base fp32, bf16, NF4 then adapter fp32, bf16, fp32 (QLoRA keeps the adapter in fp32)
    assert heights == [32_121_044_992, 16_060_522_496, 5_591_539_712, 109_051_904, 54_525_952, 109_051_904]


def test_cross_checks_views():
    from utils.analysis.sizing import CrossCheckRow, CrossChecks

    checks = CrossChecks(
        (CrossCheckRow("formula", 16, 7168, 28672, "fp32"), CrossCheckRow("peft model", 16, 7168, 28672)),
        True,
        ("a note",),
    )
    frame = views.cross_checks_frame(checks)
    assert list(frame.columns) == list(checks.headers)
    assert frame.iloc[0].tolist() == ["formula", "16", "7,168", "28,672", "fp32"]
    text = views.cross_checks_markdown(checks, LoraSettings(8, 16, 0.1, ("q_proj",)))
    assert "agree" in text and "r = 8" in text and "- a note" in text
    assert views.cross_checks_json(checks)["rows"][1] == {
        "source": "peft model", "tensors": 16, "params": 7168, "bytes": 28672, "note": ""
    }  # fmt: skip


def _evaluation():
    from utils.task.evaluate import METHODS, EvaluationReport, ItemResult, PaneResult
    from utils.task.pricing import TopKEstimate, price_metrics

    def pane(price):
        return PaneResult(f"{price}", TopKEstimate(None, []), {m: price for m in METHODS})

    items = [
        ItemResult("Red mug", 12.0, {"base": pane(None), "fine-tuned": pane(11.0)}),
        ItemResult("Blue lamp", 40.0, {"base": pane(400.0), "fine-tuned": pane(39.5)}),
    ]
    truths = [i.truth for i in items]
    metrics = {
        p: {m: price_metrics(truths, [i.panes[p].predictions[m] for i in items]) for m in METHODS}
        for p in ("base", "fine-tuned")
    }
    return EvaluationReport(items, metrics, 1.5, 3)


def test_eval_json_uses_the_api_pane_keys():
    out = views.eval_json(_evaluation(), "synthetic!")
    assert out["n_items"] == 2 and out["notice"] == "synthetic!"
    assert set(out["metrics"]) == {"base", "fine_tuned"}
    assert out["metrics"]["fine_tuned"]["greedy"]["mae"] == pytest.approx(0.75)  # (1 + 0.5) / 2
    assert out["metrics"]["base"]["greedy"]["unparsed"] == 1
    assert out["items"][0]["fine_tuned"]["predictions"]["greedy"] == 11.0


def test_eval_items_frame_formats_prices():
    frame = views.eval_items_frame(_evaluation())
    assert frame.columns.tolist() == ["description", "price", "base", "fine-tuned"]
    assert frame.iloc[0].tolist() == ["Red mug", "$12.00", "n/a", "$11.00"]
