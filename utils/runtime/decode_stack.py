"""A Llama decoder's decode step in one compiled call, where every one of its layers takes the compiled decode
layer (utils/runtime/decode_layers.py).

The decoder (LlamaModel) otherwise calls its layers from Python, two compiled calls each plus transformers'
key/value cache update between them: 30 layers a token for SmolLM2, and for the few rows of a CPU decode step
that Python and the conversion of each call's lists cost milliseconds. `decode_stack` (csrc/decode_layer.cpp)
runs every layer's two halves with the cache update between them: the values DynamicLayer.update's torch.cat
gives, written into buffers with room for later tokens instead of allocated afresh every step (growing
allocations come back from the system as fresh pages). The same operations in the same order as the per-layer
calls, so the same bits (tests/test_decode_layers.py); only the embedding, the rotary tables, the mask check and
the final norm stay in Python. The layers' weights and the strength plan's factors are handed over once per plan, as a StackPlan.
Where every layer's products and shapes are ones its loops take (SWITCH.one_region), the call runs all the layers in
one parallel region, the threads meeting at barriers, instead of one region per product with a thread setting each
up in between (csrc/decode_layer.cpp: one_region_stack): the same loops on the same values, so the same bits.
Anything it does not serve (a prefill, a mask, hooks, outputs asked for, another cache) takes LlamaModel's own
forward. A greedy run of unpadded rows (utils/runtime/greedy_loop.py) takes its steps through `RunSteps`, the same
operations without the model's forward around them, checked once for the run; where the output layer is one of the
compiled products (SWITCH.whole_step), those steps run several to a call from the tokens to the next tokens
(decode_steps), so that no Python or small ATen operation runs between the stack and the output layer, nor between
steps, with its code and data pushed out of the caches by the weights just streamed.
"""

from __future__ import annotations

import torch

from utils.runtime import nf4_kernel
from utils.runtime.decode_layers import GLOBAL_HOOK_TABLES, SWITCH, only_switched_off


def speed_up_decode_stack(model) -> bool:
    """Route the decode steps of the model's Llama decoder (LlamaModel) through one `decode_stack` call where
    every one of its layers takes the compiled decode steps; True if done."""
    from transformers.models.llama.modeling_llama import LlamaModel

    decoder = next((m for m in model.modules() if type(m) is LlamaModel), None)
    if decoder is None or decoder.__dict__.get("_lora_lens_decode_stack"):
        return decoder is not None
    layers = list(decoder.layers[: decoder.config.num_hidden_layers])
    infos = [layer.__dict__.get("_lora_lens_decode_info") for layer in layers]
    if not infos or any(info is None for info in infos):
        return False
    first = infos[0]
    if not all(i.serves_gqa for i in infos) or any(
        (i.head_dim, i.enable_gqa, i.scaling) != (first.head_dim, first.enable_gqa, first.scaling)
        for i in infos
    ):
        return False
    DecodeStack(decoder, layers, infos).install()
    return True


# rotary embeddings whose frequencies are fixed at load (transformers' "dynamic" and "longrope" change them with
# the sequence's length, so they are computed every step)
STATIC_ROPE_TYPES = ("default", "linear", "llama3")
MAX_ROTATIONS = 8192  # positions whose (cos, sin) are kept: a few kB each


class DecodeStack:
    """The decoder's forward for decode steps that every layer's compiled calls serve: one `decode_stack` call
    for the layers; anything else (a prefill, a mask, hooks, outputs asked for, another cache) takes
    LlamaModel's own forward."""

    def __init__(self, decoder, layers, infos):
        self.decoder, self.layers, self.infos = decoder, layers, infos
        self.plain = decoder.forward
        self.norm_weights = [n.weight for info in infos for n in info.norms]
        self.eps = [float(n.variance_epsilon) for info in infos for n in info.norms]
        self.watched = (decoder, decoder.embed_tokens, decoder.rotary_emb, decoder.norm)
        self.planned: tuple = (None, None)  # (the layers' packed entries, the StackPlan built from them)
        self.rotations = Rotations(decoder.rotary_emb)

    def install(self) -> None:
        self.decoder.forward = self.forward
        self.decoder._lora_lens_decode_stack = self

    def packed(self, input_ids, past_key_values, inputs_embeds, kwargs):
        """Each layer's packed entry for this step, or None where the stack does not serve it."""
        from transformers.cache_utils import DynamicCache, DynamicLayer

        if not (
            SWITCH.enabled
            and SWITCH.stack
            and nf4_kernel.STATE.enabled
            and input_ids is not None
            and inputs_embeds is None
            and input_ids.dim() == 2
            and input_ids.shape[1] == 1
            and input_ids.shape[0] <= nf4_kernel.MAX_FUSED_ROWS
            and (not kwargs or only_switched_off(kwargs))
            and type(past_key_values) is DynamicCache
            and not torch.is_grad_enabled()
            and self.decoder.config._attn_implementation == "sdpa"
            and not any(t for m in self.watched for t in (m._forward_hooks, m._forward_pre_hooks))
            and not any(GLOBAL_HOOK_TABLES)
        ):
            return None
        cache_layers = past_key_values.layers
        if len(cache_layers) != len(self.layers) or any(
            type(layer) is not DynamicLayer or not layer.is_initialized for layer in cache_layers
        ):
            return None
        rows = input_ids.shape[0]
        entries = []
        for info in self.infos:
            entry = info.packed_for(rows)  # None too where a hook is set
            if entry is None:
                return None
            entries.append(entry)
        return entries

    def stack_plan(self, entries):
        """The compiled StackPlan of these layer entries: made once per strength plan, not every step."""
        known, plan = self.planned
        if (
            known is not None
            and len(known) == len(entries)
            and all(a is b for a, b in zip(known, entries, strict=True))
        ):
            return plan
        first = self.infos[0]
        plan = torch.classes.lora_lens.StackPlan(
            self.norm_weights,
            self.eps,
            [t for e in entries for t in e.attention_tensors],
            [i for e in entries for i in e.attention_ints],
            [t for e in entries for t in e.output_tensors],
            [i for e in entries for i in e.output_ints],
            first.head_dim,
            first.scaling,
            first.enable_gqa,
        )
        self.planned = (entries, plan)
        return plan

    def step(self, entries, tokens, cache, position: int):
        """The decoder's last hidden states (normed) for one token a row at `position`, through the stack: what
        forward gives for the same step where every row sits at that position (an unpadded batch). None, with
        nothing done, where the embedding is not float32."""
        decoder = self.decoder
        hidden = decoder.embed_tokens(tokens)
        if hidden.dtype != torch.float32:
            return None
        cos, sin = self.rotations.at_position(hidden, position)
        return decoder.norm(self.layers_step(hidden, cos, sin, entries, cache))

    def layers_step(self, hidden, cos, sin, entries, cache):
        """Every layer for the step in one decode_stack call; the cache's layers then hold its results."""
        cache_layers = cache.layers
        out, *kept = torch.ops.lora_lens.decode_stack(
            hidden, cos, sin, self.stack_plan(entries), *_cache_lists(cache_layers), SWITCH.one_region
        )
        _keep(cache_layers, *kept)
        return out

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        past_key_values=None,
        inputs_embeds=None,
        use_cache=None,
        **kwargs,
    ):
        from transformers.masking_utils import create_causal_mask
        from transformers.modeling_outputs import BaseModelOutputWithPast

        entries = self.packed(
            input_ids, past_key_values, inputs_embeds, kwargs
        )  # the mask: create_causal_mask
        hidden = None
        if entries is not None:
            decoder = self.decoder
            hidden = decoder.embed_tokens(input_ids)
            if position_ids is None:
                position_ids = (torch.arange(1) + past_key_values.get_seq_length()).unsqueeze(0)
            # sdpa takes no mask for one new token over an unpadded cache (create_causal_mask's own rule); that
            # function costs 0.2 ms of Python a step, so it is asked only where some position is masked
            unpadded = attention_mask is None or (attention_mask.dim() == 2 and bool(attention_mask.all()))
            mask = None
            if not unpadded:
                mask = create_causal_mask(
                    config=decoder.config,
                    inputs_embeds=hidden,
                    attention_mask=attention_mask,
                    past_key_values=past_key_values,
                    position_ids=position_ids,
                )
            if mask is not None or hidden.dtype != torch.float32:
                hidden = None
        if hidden is None:
            return self.plain(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                **kwargs,
            )
        cos, sin = self.rotations.at(hidden, position_ids)
        out = self.layers_step(hidden, cos, sin, entries, past_key_values)
        return BaseModelOutputWithPast(last_hidden_state=decoder.norm(out), past_key_values=past_key_values)


def _plain_embedding_and_norm(decoder) -> bool:
    """Whether the decoder's embedding and final norm are the plain float32 modules decode_steps reproduces
    (an embedding lookup with no max_norm, LlamaRMSNorm)."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    embed, norm = decoder.embed_tokens, decoder.norm
    return (
        type(embed) is torch.nn.Embedding
        and embed.max_norm is None
        and embed.weight.dtype == torch.float32
        and embed.weight.is_contiguous()
        and type(norm) is LlamaRMSNorm
        and norm.weight.dtype == torch.float32
    )


def _cache_lists(cache_layers) -> tuple[list, list, list, list]:
    """The cache's keys and values, and the buffers that hold them (None before a compiled step made one), as
    decode_stack takes them."""
    buffers = [layer.__dict__.get("_lora_lens_buffers", (None, None)) for layer in cache_layers]
    return (
        [layer.keys for layer in cache_layers],
        [layer.values for layer in cache_layers],
        [pair[0] for pair in buffers],
        [pair[1] for pair in buffers],
    )


def _keep(cache_layers, keys, values, key_buffers, value_buffers) -> None:
    """The cache's layers set to a compiled step's results: views of buffers with room for later tokens
    (csrc/decode_layer.cpp: append_token), the buffers kept beside them for the next step."""
    for layer, key, value, key_buffer, value_buffer in zip(
        cache_layers, keys, values, key_buffers, value_buffers, strict=True
    ):
        layer.keys, layer.values = key, value
        layer._lora_lens_buffers = (key_buffer, value_buffer)


class Rotations:
    """The rotary embedding's (cos, sin) for a decode step: computed once per position and kept, where every
    row is at the same position and the embedding's frequencies do not change with the length (0.1 ms of Python
    and small operations a step otherwise); the same computation, on one row, so the same values."""

    def __init__(self, rotary):
        self.rotary = rotary
        self.known: dict = {}  # (position, inv_freq's identity and version, dtype) -> (cos, sin)

    def at(self, hidden, position_ids):
        rotary = self.rotary
        if getattr(rotary, "rope_type", None) not in STATIC_ROPE_TYPES or position_ids.shape[-1] != 1:
            return rotary(hidden, position_ids=position_ids)
        column = position_ids[:, 0]
        position = int(column[0])
        if column.numel() > 1 and not bool((column == position).all()):
            return rotary(hidden, position_ids=position_ids)
        return self.at_position(hidden, position)

    def at_position(self, hidden, position: int):
        """(cos, sin) for every row at `position`."""
        rotary = self.rotary
        if getattr(rotary, "rope_type", None) not in STATIC_ROPE_TYPES:
            return rotary(hidden, position_ids=torch.full((hidden.shape[0], 1), position, dtype=torch.long))
        inv_freq = rotary.inv_freq
        key = (position, inv_freq.data_ptr(), inv_freq._version, hidden.dtype)
        known = self.known.get(key)
        if known is None:
            if len(self.known) >= MAX_ROTATIONS:
                self.known.clear()
            known = self.known[key] = rotary(hidden[:1], position_ids=torch.tensor([[position]]))
        return known


class RunSteps:
    """The decode steps of one greedy run (utils/runtime/greedy_loop.py) straight through the stack: the same
    operations as the model's forward for those steps (embedding, decode_stack, final norm, output layer), without
    what that forward re-checks every step (peft's and transformers' wrappers, each layer's modules and hooks,
    the mask, the positions): 0.5-0.8 ms of Python a 2-row SmolLM2 step. Checked once, at the run's first
    decode step: the engine's lock keeps the model, its hooks and the strength plan as they are for the whole run.
    Where the output layer is one of the compiled products, `greedy_steps` takes several steps, tokens picked, in
    one call; their cache stays in a compiled StepCache until `settle` hands it back to the run's DynamicCache."""

    def __init__(self, stack: DecodeStack, head, entries, position: int, head_args=None):
        self.stack, self.head, self.entries, self.position = stack, head, entries, position
        self.head_args = head_args  # the output layer for decode_steps, None: the head's own forward
        # the StepCache the compiled steps keep the cache in; None: the DynamicCache holds it
        self.held = None

    def logits(self, tokens, cache):
        """The output layer's logits [rows, vocabulary] after `tokens` [rows], one a row, through the stack's
        step and the head's own forward; None, with nothing done, where the stack does not take the step."""
        self.settle(cache)
        hidden = self.stack.step(self.entries, tokens[:, None], cache, self.position)
        if hidden is None:
            return None
        self.position += 1
        return self.head(hidden)[:, -1]

    def greedy_steps(
        self, tokens, cache, count: int, unfinished, eos_ids, ignore_eos: bool, pad_id: int, keep_logits
    ):
        """Up to `count` greedy steps after `tokens` [rows] in one compiled call (decode_steps: each step's
        embedding rows, the stack, the final norm, the output layer as head_args gives it, and its tokens picked as
        greedy_loop picks them; it stops early where every row has finished): (tokens [steps, rows], float32 logits
        [steps, rows, vocabulary] where `keep_logits`, else None). None, with nothing done, where the output layer
        is not compiled or the embedding or the final norm is not the plain float32 module that call reproduces."""
        stack = self.stack
        decoder = stack.decoder
        if self.head_args is None or not _plain_embedding_and_norm(decoder):
            return None
        if self.held is None:
            self.held = torch.classes.lora_lens.StepCache(*_cache_lists(cache.layers))
        weight, norm = decoder.embed_tokens.weight, decoder.norm
        rotations = [stack.rotations.at_position(weight[:1][None], self.position + i) for i in range(count)]
        chosen, logits = torch.ops.lora_lens.decode_steps(
            tokens,
            weight,
            [cos for cos, _ in rotations],
            [sin for _, sin in rotations],
            stack.stack_plan(self.entries),
            self.held,
            SWITCH.one_region,
            norm.weight,
            norm.variance_epsilon,
            *self.head_args,
            torch.tensor(unfinished, dtype=torch.bool),
            eos_ids,
            ignore_eos,
            pad_id,
            keep_logits,
        )
        self.position += chosen.shape[0]
        return chosen, logits if keep_logits else None

    def settle(self, cache) -> None:
        """The cache's layers given what the compiled steps kept (nothing to do where none ran since)."""
        if self.held is not None:
            _keep(cache.layers, *self.held.contents())
            self.held = None


def run_steps(model, rows: int, cache) -> RunSteps | None:
    """RunSteps for an unpadded batch of `rows` rows whose prompt `cache` holds, where every step of it takes the
    stack (checked now) and nothing wraps the causal LM's own decoder-then-output-layer forward; else None."""
    from transformers.cache_utils import DynamicCache

    causal_lm, wrappers = _causal_lm_of(model)
    if causal_lm is None:
        return None
    decoder, head = causal_lm.model, causal_lm.lm_head
    stack = decoder.__dict__.get("_lora_lens_decode_stack")
    # the decoder's forward replaced since the stack was installed (a patch, a test's fault) takes the model's path
    if not isinstance(stack, DecodeStack) or decoder.__dict__.get("forward") != stack.forward:
        return None
    watched = (*wrappers, causal_lm, head)
    if type(cache) is not DynamicCache or any(GLOBAL_HOOK_TABLES):
        return None
    if any(table for module in watched for table in (module._forward_hooks, module._forward_pre_hooks)):
        return None
    probe = torch.zeros((rows, 1), dtype=torch.long)
    entries = stack.packed(probe, cache, None, {})
    if entries is None or cache.get_seq_length() <= 0:
        return None
    from utils.runtime.cpu_decode import compiled_head_args

    head_args = compiled_head_args(head, rows) if SWITCH.whole_step else None
    return RunSteps(stack, head, entries, cache.get_seq_length(), head_args)


def _causal_lm_of(model):
    """(the LlamaForCausalLM, the modules whose forward only passes through to it: peft's LoRA wrappers), or
    (None, []) where anything else wraps it."""
    from transformers.models.llama.modeling_llama import LlamaForCausalLM

    if type(model) is LlamaForCausalLM:
        return model, []
    from peft import PeftModelForCausalLM
    from peft.tuners.lora import LoraModel

    if type(model) is not PeftModelForCausalLM or type(model.base_model) is not LoraModel:
        return None, []
    config = model.active_peft_config
    if config.is_prompt_learning or getattr(config, "alora_invocation_tokens", None) is not None:
        return None, []
    inner = model.base_model.model
    return (inner, [model, model.base_model]) if type(inner) is LlamaForCausalLM else (None, [])
