"""The engine's own greedy loop (utils/runtime/greedy_loop.py) against transformers' generate() on the same
model and rows: the same tokens, the same raw logits bit for bit, the same cache length, the same stops."""

import copy
import threading

import pytest
import torch
from transformers import LogitsProcessorList, StoppingCriteriaList

from tests.greedy import counting_compiled_steps
from utils.runtime import greedy_loop
from utils.runtime.generation import NoEndOfSequence, RowStreamer, StopOnEvent, left_padded
from utils.runtime.router import row_strengths

PROMPTS = ["How much does this cost? A red mug, large", "Price of a small tent for two people, green"]


@pytest.fixture
def rows(tiny_pair):
    tokenizer = tiny_pair.tokenizer
    prompts = [tokenizer(text)["input_ids"] for text in PROMPTS]
    assert len(prompts[0]) != len(prompts[1])  # left padding on one row
    return left_padded(prompts, tokenizer.pad_token_id or 0)


def _both(model, input_ids, attention_mask, eos, pad, tokens, ignore_eos=False, event=None):
    """(generate()'s output, the loop's output) for rows at strengths 0 and 1."""
    with row_strengths(model, [0.0, 1.0]), torch.inference_mode():
        expected = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=pad,
            eos_token_id=eos,
            logits_processor=LogitsProcessorList([NoEndOfSequence(eos)] if ignore_eos else []),
            stopping_criteria=StoppingCriteriaList([StopOnEvent(event or threading.Event())]),
            output_logits=True,
            return_dict_in_generate=True,
        )
        got = greedy_loop.greedy_generate(
            model,
            input_ids,
            attention_mask,
            max_new_tokens=tokens,
            eos_ids=eos,
            pad_id=pad,
            ignore_eos=ignore_eos,
            stop_event=event,
            keep_logits=True,
        )
    return expected, got


def _assert_same(expected, got):
    assert torch.equal(got.sequences, expected.sequences)
    assert len(got.logits) == len(expected.logits)
    for mine, theirs in zip(got.logits, expected.logits, strict=True):
        assert torch.equal(mine, theirs)
    assert got.past_key_values.get_seq_length() == expected.past_key_values.get_seq_length()


def test_padded_rows_match_generate(tiny_pair, rows):
    assert greedy_loop.serves(tiny_pair.model)
    expected, got = _both(tiny_pair.model, *rows, eos=[2], pad=2, tokens=10, ignore_eos=True)
    assert got.sequences.shape[1] == rows[0].shape[1] + 10
    _assert_same(expected, got)


def test_unpadded_rows_go_straight_through_the_compiled_decoder_with_the_same_bits(tiny_pair, monkeypatch):
    """Where every row has the prompt's length, the steps skip the model's forward (decode_stack.RunSteps) and
    still give generate()'s tokens and logits bit for bit."""
    from utils.runtime import decode_stack

    model, tokenizer = tiny_pair.model, tiny_pair.tokenizer
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]] * 2)
    made = []
    real = decode_stack.run_steps
    monkeypatch.setattr(decode_stack, "run_steps", lambda *a: made.append(real(*a)) or made[-1])
    expected, got = _both(model, ids, torch.ones_like(ids), eos=[2], pad=2, tokens=10, ignore_eos=True)
    assert len(made) == 1 and made[0] is not None and made[0].position == ids.shape[1] + 9
    _assert_same(expected, got)


def test_a_hook_on_the_model_keeps_every_step_on_the_models_forward(tiny_pair):
    """What the direct steps would go around (here a hook on the causal LM) makes the loop call the model every
    step, so the hook sees every step."""
    model, tokenizer = tiny_pair.model, tiny_pair.tokenizer
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]] * 2)
    seen = []
    causal_lm = model.base_model.model  # what the direct steps go around
    handle = causal_lm.register_forward_hook(lambda module, args, out: seen.append(out.logits.shape[1]))
    try:
        with row_strengths(model, [0.0, 1.0]), torch.inference_mode():
            greedy_loop.greedy_generate(
                model, ids, torch.ones_like(ids), max_new_tokens=5, eos_ids=[2], pad_id=2, ignore_eos=True
            )
    finally:
        handle.remove()
    assert seen == [1] * 5  # the prompt's last position, then four decode steps


def test_end_of_sequence_finishes_a_row_as_generate_does(tiny_pair, rows):
    model = tiny_pair.model
    _, free = _both(model, *rows, eos=[2], pad=2, tokens=8, ignore_eos=True)
    width = rows[0].shape[1]
    # an end token that row 0 writes at its third step and row 1 never writes before it
    stop_token = int(free.sequences[0, width + 2])
    assert stop_token not in free.sequences[1, width : width + 3].tolist()
    pad = 0 if stop_token != 0 else 1
    expected, got = _both(model, *rows, eos=[stop_token], pad=pad, tokens=8)
    _assert_same(expected, got)
    assert got.sequences[0, width + 3 :].tolist() == [pad] * (got.sequences.shape[1] - width - 3)


def test_a_set_stop_event_ends_after_one_step(tiny_pair, rows):
    event = threading.Event()
    event.set()
    expected, got = _both(tiny_pair.model, *rows, eos=[2], pad=2, tokens=8, ignore_eos=True, event=event)
    assert got.sequences.shape[1] == rows[0].shape[1] + 1
    _assert_same(expected, got)


def test_the_streamer_gets_what_generate_hands_it(tiny_pair, rows):
    import queue

    out = queue.Queue()
    with row_strengths(tiny_pair.model, [0.0, 1.0]), torch.inference_mode():
        got = greedy_loop.greedy_generate(
            tiny_pair.model, *rows, max_new_tokens=4, eos_ids=[2], pad_id=2, streamer=RowStreamer(out)
        )
    items = [out.get_nowait() for _ in range(out.qsize())]
    width = rows[0].shape[1]
    assert items[-1] == ("end", None)
    assert [row for _, row in items[:-1]] == got.sequences[:, width:].T.tolist()
    assert got.logits is None


def test_logits_processing_in_the_generation_config_keeps_generate(tiny_pair):
    model = tiny_pair.model
    saved = model.generation_config
    try:
        model.generation_config = copy.deepcopy(saved)
        model.generation_config.repetition_penalty = 1.2
        assert not greedy_loop.serves(model)
    finally:
        model.generation_config = saved
    assert greedy_loop.serves(model)


def _ends_at(sequence: list[int], others: list[list[int]], first: int) -> tuple[int, int]:
    """(step, token): the first step from `first` whose token `sequence` has not written before and no other row
    writes up to that step."""
    for step in range(first, len(sequence)):
        token = sequence[step]
        if token not in sequence[:step] and all(token not in other[: step + 1] for other in others):
            return step, token
    raise AssertionError("no token ends this row alone")


def test_compiled_steps_finish_a_row_inside_a_call_as_generate_does(tiny_pair, monkeypatch):
    """Unpadded rows take several steps a compiled call (decode_stack.RunSteps.greedy_steps: 1, 2, 4, then 8): a
    row that writes an end token inside a call is padded from the next step on, as generate() pads it, with the
    same logits bit for bit."""
    model, tokenizer = tiny_pair.model, tiny_pair.tokenizer
    ids = torch.tensor([tokenizer(PROMPTS[1])["input_ids"]] * 2)
    width = ids.shape[1]
    _, free = _both(model, ids, torch.ones_like(ids), eos=[2], pad=2, tokens=12, ignore_eos=True)
    texts = free.sequences[:, width:].tolist()
    step, token = _ends_at(texts[0], [texts[1]], 4)  # inside the call of steps 4-7
    pad = 0 if token != 0 else 1
    calls = counting_compiled_steps(monkeypatch)
    expected, got = _both(model, ids, torch.ones_like(ids), eos=[token], pad=pad, tokens=12)
    assert calls and calls[:3] == [1, 2, 4]
    _assert_same(expected, got)
    assert got.sequences[0, width + step + 1 :].tolist() == [pad] * (12 - step - 1)


def test_compiled_steps_stop_once_every_row_has_finished(tiny_pair, monkeypatch):
    """A call stops at the step where its last unfinished row writes an end token, and the run ends there, as
    generate() ends."""
    model, tokenizer = tiny_pair.model, tiny_pair.tokenizer
    ids = torch.tensor([tokenizer(PROMPTS[0])["input_ids"]])
    width = ids.shape[1]
    pair = ids.repeat(2, 1)
    _, free = _both(model, pair, torch.ones_like(pair), eos=[2], pad=2, tokens=12, ignore_eos=True)
    text = free.sequences[0, width:].tolist()
    step, token = _ends_at(text, [], 4)
    calls = counting_compiled_steps(monkeypatch)
    with row_strengths(model, [0.0]), torch.inference_mode():
        expected = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=12,
            do_sample=False,
            pad_token_id=0,
            eos_token_id=[token],
            output_logits=True,
            return_dict_in_generate=True,
        )
        got = greedy_loop.greedy_generate(
            model, ids, torch.ones_like(ids), max_new_tokens=12, eos_ids=[token], pad_id=0, keep_logits=True
        )
    assert got.sequences.shape[1] == width + step + 1
    # the prompt's token, then calls of 1, 2, 4, 8 steps, the last cut at the end token
    steps_taken, taken = [], 1
    while taken < step + 1:
        steps_taken.append(
            min(greedy_loop.MOST_STEPS_A_CALL, 1 << (taken.bit_length() - 1), step + 1 - taken)
        )
        taken += steps_taken[-1]
    assert calls == steps_taken
    _assert_same(expected, got)
