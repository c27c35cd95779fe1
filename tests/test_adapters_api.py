"""The several-adapter endpoints through gradio_client, against an app holding three adapters on the tiny Llama:
each pane of a /compare batch equals that adapter run alone through /generate, every view takes adapters by
name, and bad input gets a clear message."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

import pytest

from tests.test_app_api import PROMPT, client_for, serve
from utils.runtime.engine import Engine
from utils.runtime.loading import load_model_pair


@pytest.fixture(scope="module")
def multi_app(tiny_settings, extra_adapter_dirs):
    extras = tuple((name, str(path)) for name, path in extra_adapter_dirs.items())
    engine = Engine(load_model_pair(replace(tiny_settings, adapters=extras), has_gpu=False))
    demo, url = serve(engine)
    yield client_for(url), engine
    demo.close()


@pytest.fixture(scope="module")
def client(multi_app):
    return multi_app[0]


def test_adapters_lists_what_the_server_loaded(client, multi_app):
    listed = client.predict(api_name="/adapters")
    assert [a["name"] for a in listed["adapters"]] == multi_app[1].adapter_names
    assert [a["r"] for a in listed["adapters"]] == [8, 4, 16] and listed["left_out"] == []
    assert listed["adapters"][0]["primary"] and not listed["adapters"][1]["primary"]


def test_each_pane_of_one_batch_equals_that_adapter_through_generate(client):
    panes = [
        {"adapter": None},
        {"adapter": "fine_tuned", "strength": 1},
        {"adapter": "second", "strength": 0.5},
        {"adapter": "third", "strength": 1.5},
    ]
    texts, labels = client.predict(prompt=PROMPT, max_new_tokens=12, panes=panes, api_name="/compare")
    assert labels[0] == "Base" and labels[2] == "second (s = 0.5)" and labels[3] == "third (s = 1.5)"
    alone = [
        client.predict(prompt=PROMPT, use_adapter=False, max_new_tokens=12, api_name="/generate"),
        client.predict(prompt=PROMPT, max_new_tokens=12, api_name="/generate"),
        client.predict(
            prompt=PROMPT, max_new_tokens=12, adapter="second", strength=0.5, api_name="/generate"
        ),
        client.predict(prompt=PROMPT, max_new_tokens=12, adapter="third", strength=1.5, api_name="/generate"),
    ]
    assert texts == alone
    assert len(set(texts)) == 4
    base, tuned = client.predict(prompt=PROMPT, max_new_tokens=12, api_name="/compare")  # unchanged call
    assert [base, tuned] == texts[:2]


@pytest.mark.parametrize(
    "panes,message",
    [
        ([], "at least one pane"),
        (
            [{"adapter": "second", "strength": s} for s in (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)],
            "At most 6 panes",
        ),
        ([{"adapter": "second"}, {"adapter": "second", "strength": 1.0}], "Pane 2 repeats pane 1"),
        ([{"adapter": "nope"}], "No adapter is called 'nope'"),
        ([{"adapter": "second", "strength": "x"}], "must be a number"),
    ],
)
def test_bad_panes_get_a_clear_message(client, panes, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(prompt=PROMPT, panes=panes, api_name="/compare")


def test_the_sweep_runs_over_adapters_and_strengths(client):
    out = client.predict(
        prompt=PROMPT, strengths="1", adapters="base, second, third", max_new_tokens=8, api_name="/sweep"
    )
    assert [(p["adapter"], p["label"]) for p in out] == [
        (None, "Base"),
        ("second", "second"),
        ("third", "third"),
    ]
    texts, _ = client.predict(
        prompt=PROMPT, max_new_tokens=8, panes=[{"adapter": None}, {"adapter": "second"}, {"adapter": "third"}],
        api_name="/compare",
    )  # fmt: skip
    assert [p["text"] for p in out] == texts
    classic = client.predict(prompt=PROMPT, strengths="0, 1", max_new_tokens=8, api_name="/sweep")
    assert [p["strength"] for p in classic] == [0.0, 1.0] and "adapter" not in classic[0]


def test_the_token_lens_over_panes(client):
    panes = [{"adapter": None}, {"adapter": "second"}, {"adapter": "third"}]
    out = client.predict(prompt=PROMPT, max_new_tokens=8, panes=panes, pair=[3, 2], api_name="/token_lens")
    assert [p["label"] for p in out["panes"]] == ["Base", "second", "third"]
    assert out["pair"]["a"] == "third" and out["pair"]["b"] == "second" and out["pair"]["kl_a_b"] >= 0
    for pane in out["panes"]:
        for model, total in pane["logprob_under"].items():
            assert total == pytest.approx(sum(t["logprob_under"][model] for t in pane["tokens"]), abs=1e-6)
        assert all(t["kl_vs_base"]["Base"] == 0 for t in pane["tokens"])
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match="two different pane positions"):
        client.predict(prompt=PROMPT, panes=panes, pair=[2, 2], api_name="/token_lens")


def test_the_lens_over_panes_refuses_what_would_read_too_many_tokens(client, monkeypatch):
    """3 texts under 4 models (the base added) read 12 x (prompt + 8 tokens); over the cap, it is refused."""
    from gradio_client.exceptions import AppError

    import ui.durations

    monkeypatch.setattr(ui.durations, "PANE_LENS_TOKENS", 200)
    panes = [{"adapter": None}, {"adapter": "second"}, {"adapter": "third"}]
    with pytest.raises(AppError, match="would read more than 200 tokens"):
        client.predict(prompt=PROMPT, max_new_tokens=8, panes=panes, api_name="/token_lens")


def test_anatomy_and_similarity_take_adapters_by_name(client):
    from gradio_client.exceptions import AppError

    second = client.predict(adapter="second", api_name="/anatomy")
    assert second["r"] == 4 and len(second["modules"]) == 6  # q, v, up in 2 layers
    assert {m["module"] for m in second["modules"]} == {"q_proj", "v_proj", "up_proj"}
    primary = client.predict(api_name="/anatomy")
    assert primary["r"] == 8 and len(primary["modules"]) == 8
    sim = client.predict(a="second", b="third", top_k=4, api_name="/adapter_similarity")
    assert {m["module"] for m in sim["modules"]} == {"q_proj"} and len(sim["only_a"]) == len(
        sim["only_b"]
    ) == 4
    assert all(-1 <= m["cosine"] <= 1 and 0 <= m["overlap_out"] <= 1 and m["k"] == 4 for m in sim["modules"])
    for kwargs, message in [
        (dict(a="second", b="second"), "the same adapter"),
        (dict(a="second", b="nope"), "No adapter is called 'nope'"),
        (dict(a="second", b="third", top_k=0), "top_k must be between 1 and 64"),
    ]:
        with pytest.raises(AppError, match=message):
            client.predict(**kwargs, api_name="/adapter_similarity")
    with pytest.raises(AppError, match="at least two loaded adapters with a known training step"):
        client.predict(api_name="/checkpoint_growth")


def test_evaluate_scores_several_adapters_and_their_flips(client):
    report = client.predict(n_items=4, adapters="second, third", api_name="/evaluate")
    assert set(report["metrics"]) == {"base", "fine_tuned", "second", "third"}
    assert len(report["flips"]) == 6  # every two of the four panes
    for flip in report["flips"]:
        right_a = set(flip["right_a_wrong_b"])
        assert not right_a & set(flip["right_b_wrong_a"]) and all(0 <= i < 4 for i in right_a)
    assert all({"second", "third"} <= set(item) for item in report["items"])


def test_concurrent_requests_on_different_adapters_give_their_serial_results(client):
    calls = [
        dict(adapter="second", strength=1.0),
        dict(adapter="third", strength=0.5),
        dict(adapter="fine_tuned", strength=2.0),
        dict(adapter="second", strength=-1.0),
    ]

    def run(kwargs):
        return client.predict(prompt=PROMPT, max_new_tokens=8, api_name="/generate", **kwargs)

    serial = [run(c) for c in calls]
    with ThreadPoolExecutor(max_workers=4) as pool:
        assert list(pool.map(run, calls)) == serial


def test_a_flipped_item_opens_in_compare(multi_app):
    """Selecting a row of the flips table (description, price, ...) puts the item in Compare's task prompt."""
    from types import SimpleNamespace

    import gradio as gr

    from ui.compare import CompareTab
    from ui.lens import Lens
    from utils.task.pricing import build_prompt

    tab = CompareTab(Lens(multi_app[1]))
    selected, prompt = tab.ui_open_item(
        SimpleNamespace(row_value=["Oak bookshelf, five shelves", 120.0, "a", "b"])
    )
    assert selected.selected == "compare"
    assert prompt == build_prompt("Oak bookshelf, five shelves", tab.lens.profile.task_prompt)
    placeholder = tab.ui_open_item(SimpleNamespace(row_value=["No item flips between any two panes."]))
    assert placeholder == (gr.skip(), gr.skip())  # the "no flips" row opens nothing
