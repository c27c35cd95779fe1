"""Prompt formats through gradio_client: /render_prompt shows what each pane is given, /compare and /token_lens
run the base and the fine-tune in different formats in one batch, each pane equal to /generate in that pane's
format alone, and a bad format or template gets a clear message with the app alive."""

from __future__ import annotations

import pytest

from tests.test_app_api import client_for, serve
from utils.runtime.engine import Engine

PROMPT = "Name a colour of the sky."


@pytest.fixture(scope="module")
def app(tiny_pair):
    engine = Engine(tiny_pair)
    demo, url = serve(engine)
    yield client_for(url), engine
    demo.close()


@pytest.fixture(scope="module")
def client(app):
    return app[0]


def test_render_prompt_shows_each_pane_as_its_model_gets_it(client, app):
    engine = app[1]
    shown = client.predict(prompt=PROMPT, prompt_format="chat", base_format="raw", api_name="/render_prompt")
    base, tuned = shown["panes"]
    assert base["format"] == "Raw text (as typed)" and base["text"] == PROMPT
    expected = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True
    )
    assert tuned["text"] == expected and tuned["template_from"] == "the base's tokenizer"
    ids = engine.tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPT}], add_generation_prompt=True
    )
    assert tuned["token_count"] == len(ids["input_ids"])
    assert tuned["tokens"][0] == "<|im_start|>" and "".join(tuned["tokens"]) == expected
    # the tiny model's <|im_end|> row is zero: the warning says so, here and in the pane
    assert any("'<|im_end|>'" in w for w in shown["warnings"]) and tuned["warnings"]


def test_compare_in_two_formats_equals_each_format_alone(client):
    base, tuned = client.predict(
        prompt=PROMPT, max_new_tokens=10, prompt_format="chat", base_format="raw", api_name="/compare"
    )
    assert base == client.predict(prompt=PROMPT, use_adapter=False, max_new_tokens=10, api_name="/generate")
    assert tuned == client.predict(
        prompt=PROMPT, max_new_tokens=10, prompt_format="chat", api_name="/generate"
    )
    assert tuned != client.predict(
        prompt=PROMPT, max_new_tokens=10, api_name="/generate"
    )  # the format matters
    panes = [{"adapter": None, "format": "raw"}, {"adapter": "fine_tuned", "format": "chat"}]
    texts, labels = client.predict(prompt=PROMPT, max_new_tokens=10, panes=panes, api_name="/compare")
    assert texts == [base, tuned] and labels[0] == "Base [raw]" and labels[1].endswith("[chat]")


def test_the_token_lens_and_the_sweep_take_a_format(client):
    lens = client.predict(
        prompt=PROMPT, max_new_tokens=6, prompt_format="chat", base_format="raw", api_name="/token_lens"
    )
    _, tuned = client.predict(
        prompt=PROMPT, max_new_tokens=6, prompt_format="chat", base_format="raw", api_name="/compare"
    )
    assert lens["panes"]["fine_tuned"]["text"] == tuned
    sweep = client.predict(
        prompt=PROMPT, strengths="1", max_new_tokens=6, prompt_format="chat", api_name="/sweep"
    )
    assert sweep[0]["text"] == client.predict(
        prompt=PROMPT, max_new_tokens=6, prompt_format="chat", api_name="/generate"
    )


@pytest.mark.parametrize(
    "fmt, message",
    [
        ("jinja", "must be one of"),
        ("adapter", "ships no chat template"),
        ({"kind": "custom", "template": "{{ messages.__class__ }}"}, "tried to reach something"),
        ({"kind": "custom", "template": "{% for i in range(99999) %}{% for j in range(99999) %}x{% endfor %}"
          "{% endfor %}"}, "stopped"),
        ({"kind": "custom"}, "needs its Jinja template"),
    ],
)  # fmt: skip
def test_bad_formats_get_a_clear_message_and_the_app_lives(client, fmt, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(prompt=PROMPT, max_new_tokens=4, prompt_format=fmt, api_name="/compare")
    assert (
        client.predict(prompt=PROMPT, api_name="/render_prompt")["panes"][0]["format"]
        == "Raw text (as typed)"
    )
