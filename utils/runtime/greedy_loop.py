"""Greedy decoding without generate()'s per-step machinery, for the CPU decode path.

transformers' generate() and the forward of peft's and transformers' wrappers cost about a millisecond of Python
a decode step on a CPU (measured on a 2-core AMD EPYC, SmolLM2-135M, 2 rows: 1.0-1.3 ms outside the compiled
decoder call and the output layer, in a 10 ms step): preparing inputs, growing them, three stopping criteria, a
logits-processor list, and every layer's modules, hooks, the mask and the positions checked again each step.
This loop with decode_stack.RunSteps leaves about 0.5 ms. `greedy_generate` makes the same model calls with the same
inputs (the prompt with `logits_to_keep=1`, then one token a row at the next position, the attention mask
grown by a column of ones) and picks each token as generate() does; where the rows are unpadded and the compiled
decoder serves every step, the steps skip the model's forward and take the same operations directly
(decode_stack.RunSteps), several steps a compiled call where the output layer is compiled too (1, 2, 4, then 8:
their tokens are streamed together, and a stop event is seen between calls). Its tokens and logits are the same
bits as generate()'s (tests/test_greedy_loop.py: padded and unpadded rows, end-of-sequence stops inside a call,
`ignore_eos`, a stop event). Only a plain greedy run takes it:
a model whose generation config asks for any logits processing (a repetition penalty, a minimum length,
suppressed tokens, ...) keeps generate().
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from utils.runtime import decode_stack

# generation-config fields and the value that leaves greedy decoding plain (no logits processing, no other
# search); transformers 5 leaves unset fields at None
PLAIN_GREEDY_DEFAULTS = {
    "num_beams": 1,
    "num_beam_groups": 1,
    "penalty_alpha": None,
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "bad_words_ids": None,
    "force_words_ids": None,
    "min_length": 0,
    "min_new_tokens": None,
    "suppress_tokens": None,
    "begin_suppress_tokens": None,
    "forced_bos_token_id": None,
    "forced_eos_token_id": None,
    "sequence_bias": None,
    "exponential_decay_length_penalty": None,
    "renormalize_logits": False,
    "guidance_scale": None,
    "watermarking_config": None,
    "assistant_model": None,
    "prompt_lookup_num_tokens": None,
    "max_time": None,
    "stop_strings": None,
}


def serves(model) -> bool:
    """Whether a greedy run of this model may take `greedy_generate`: a decoder-only model on the CPU whose
    generation config asks for nothing but plain greedy decoding."""
    config = getattr(model, "generation_config", None)
    model_config = getattr(model, "config", None)
    if config is None or model_config is None or getattr(model_config, "is_encoder_decoder", False):
        return False
    if next(model.parameters()).device.type != "cpu":
        return False
    return all(getattr(config, name, None) in (None, plain) for name, plain in PLAIN_GREEDY_DEFAULTS.items())


# Compiled steps a call after the prompt's first token: 1, 2, 4, then 8 (decode_stack.RunSteps.greedy_steps). A call
# returns its tokens together, so the first ones stream at once and later ones at most 8 steps apart (about 0.1 s
# for SmolLM2's two panes on 2 cores), while the Python a call costs (0.4-0.6 ms on the Xeon with AMX) comes to
# under 0.1 ms a step.
MOST_STEPS_A_CALL = 8


def _steps_a_call(done: int) -> int:
    return min(MOST_STEPS_A_CALL, 1 << (done.bit_length() - 1))  # done >= 1: the prompt's token


@dataclass
class GreedyOutput:
    """The fields of generate()'s GenerateDecoderOnlyOutput that the engine reads."""

    sequences: torch.Tensor  # [rows, prompt width + steps]
    logits: tuple | None  # each step's raw logits [rows, vocabulary] in float32, where kept
    past_key_values: object  # the DynamicCache, holding every token but the last


def greedy_generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_ids: list[int],
    pad_id: int,
    ignore_eos: bool = False,
    streamer=None,
    stop_event: threading.Event | None = None,
    keep_logits: bool = False,
) -> GreedyOutput:
    """generate(do_sample=False) over left-padded rows: up to `max_new_tokens` tokens a row; a row that writes an
    end-of-sequence token is finished and gets `pad_id` from then on; the run ends when every row is finished,
    the tokens are spent, or `stop_event` is set. `ignore_eos` rules the end-of-sequence tokens out, as
    generation.NoEndOfSequence does. The streamer gets the prompt, each step's tokens and the end, as from
    generate()."""
    from transformers.cache_utils import DynamicCache

    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be at least 1")
    rows = input_ids.shape[0]
    cache = DynamicCache(config=model.config.get_text_config(decoder=True))
    # generate()'s positions: counted over the mask, pads at 0
    positions = attention_mask.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask == 0, 0)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    eos_index = torch.tensor(eos_ids, dtype=torch.long)
    end_ids = set(eos_ids)
    unfinished = [True] * rows
    steps: list[torch.Tensor] = []
    kept: list[torch.Tensor] = []
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    ).logits[:, -1]
    unpadded = bool(attention_mask.all())
    steps_through = None
    fed = 0  # tokens the mask and positions cover beyond the prompt: the direct steps need neither

    def take(tokens: torch.Tensor, logits: torch.Tensor | None) -> None:
        """A step's tokens (finished rows already padded) recorded, streamed and checked for ends."""
        nonlocal unfinished
        if keep_logits:
            kept.append(logits)
        steps.append(tokens)
        if streamer is not None:
            streamer.put(tokens)
        unfinished = [
            alive and token not in end_ids for token, alive in zip(tokens.tolist(), unfinished, strict=True)
        ]

    def pick(logits: torch.Tensor) -> torch.Tensor:
        scores = logits.index_fill(1, eos_index, -math.inf) if ignore_eos else logits
        chosen = torch.argmax(scores, dim=-1).tolist()
        chosen = [token if alive else pad_id for token, alive in zip(chosen, unfinished, strict=True)]
        return torch.tensor(chosen, dtype=input_ids.dtype)

    logits = out.to(copy=True, dtype=torch.float32)
    del out
    take(pick(logits), logits)
    while (
        any(unfinished)
        and len(steps) < max_new_tokens
        and not (stop_event is not None and stop_event.is_set())
    ):
        tokens = steps[-1]
        if unpadded and steps_through is None and len(steps) == 1:
            # an unpadded batch's steps go straight through the compiled decoder where it serves them all
            steps_through = decode_stack.run_steps(model, rows, cache)
        if steps_through is not None:
            count = min(_steps_a_call(len(steps)), max_new_tokens - len(steps))
            taken = steps_through.greedy_steps(
                tokens, cache, count, unfinished, eos_index, ignore_eos, pad_id, keep_logits
            )
            if taken is not None:
                chosen, step_logits = taken
                for i in range(chosen.shape[0]):
                    take(chosen[i], step_logits[i] if keep_logits else None)
                continue
            out = steps_through.logits(tokens, cache)
        else:
            out = None
        if out is None:
            # the mask grown by a column of ones for each token since, the positions moved on as many
            attention_mask = torch.cat(
                [attention_mask, attention_mask.new_ones((rows, len(steps) - fed))], dim=-1
            )
            positions = positions[:, -1:] + (len(steps) - fed)
            fed = len(steps)
            out = model(
                input_ids=tokens[:, None],
                attention_mask=attention_mask,
                position_ids=positions,
                past_key_values=cache,
                use_cache=True,
            ).logits[:, -1]
        logits = out.to(copy=True, dtype=torch.float32)
        del out
        take(pick(logits), logits)
    if steps_through is not None:
        steps_through.settle(cache)
    if streamer is not None:
        streamer.end()
    sequences = torch.cat([input_ids, torch.stack(steps, dim=1)], dim=1)
    return GreedyOutput(sequences, tuple(kept) if keep_logits else None, cache)
