"""Engine benchmark on the embedded default: load, time to first token, tokens/s, mixed vs sequential, toggle.

All figures come from one run, so ratios compare like with like on the same machine state. Writes JSON plus a
markdown table (the README's). `--model random-8b` builds a random-init Llama-3.1-8B-architecture model in NF4
with an r=32 q/k/v/o adapter instead (GPU only: 8B random weights are made on the device, never downloaded).

Long because it is one script of independent measurements (one function each) that must share a process,
a loaded model and a machine state, so that the ratios it reports are taken in one run.

    python bench/bench_engine.py [--tokens 48] [--repeats 3] [--out bench/results/engine.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("OMP_NUM_THREADS", "1")  # as app.py does, before torch loads

# torch's CPU kernels, MKL and oneDNN limited to AVX2, and with them the project's kernel (its AVX2 loops); `auto`
# then chooses among the paths an AVX2 CPU has (bitsandbytes' AVX512-BF16 kernel is timed but never chosen)
AS_AVX2 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
}

PROMPT = (
    "How much does this cost to the nearest dollar?\n\n"
    "Premium stainless steel espresso machine, 1.5 litre tank, milk frother, new condition\n\nPrice is $"
)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cold_load_seconds(env: dict) -> float:
    """A fresh process: imports, reading the cache, quantizing to NF4, attaching the adapter."""
    code = (
        "import time; t=time.perf_counter(); "
        "from utils.runtime.loading import load_model_pair; from utils.core.profiles import read_settings; "
        "load_model_pair(read_settings()); print(time.perf_counter()-t)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return float(out.stdout.strip().splitlines()[-1])


def timed_run(engine, mode, settings):
    started = time.perf_counter()
    result = engine.run(PROMPT, mode, settings)
    return time.perf_counter() - started, result


def toggle_cost_us(engine, n: int = 2000) -> dict:
    """Per-request adapter switching as the engine does it, next to peft's own two switches."""
    import torch

    def median_us(action) -> float:
        samples = []
        for _ in range(n):
            started = time.perf_counter()
            action()
            samples.append(time.perf_counter() - started)
        return statistics.median(samples) * 1e6

    def engine_switch():  # what a request does: build the per-row strength plan, set it, clear it
        engine.router.plan = engine.router.plan_for([0.0, 1.0])
        engine.router.plan = None

    def peft_hooks():
        with engine.model._enable_peft_forward_hooks(adapter_names=["__base__", "default"]):
            pass

    def peft_flag_flip():
        with engine.model.disable_adapter():
            pass

    x = torch.zeros(1, 1)  # keeps torch imported and initialised before timing
    del x
    return {
        "toggle_engine_strength_plan_us": median_us(engine_switch),
        "toggle_peft_adapter_names_hooks_us": median_us(peft_hooks),
        "toggle_peft_disable_adapter_us": median_us(peft_flag_flip),
    }


def step_ms(engine, rows, tokens: int) -> float:
    """One run's milliseconds per decode step of these rows (the prefill left out): the span between the first
    row's first and last token."""
    from utils.core.seam import GenerationSettings

    result = engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=tokens, ignore_eos=True))
    state = result.panes[rows[0].key]
    return (state.last_token_s - state.first_token_s) / (state.tokens - 1) * 1000


def step_costs(engine, tokens: int, repeats: int, row_counts=(1, 2, 5)) -> dict:
    """Seconds per decode step for 1, 2 and 5 rows (strengths 0, 0.5, 1, 1.5, 2), and each ratio to 1 row.

    A step's time is the span between a row's first and last token over the steps in between, so the prompt's
    prefill is left out; runs are interleaved so drift in machine load hits every row count alike.
    """

    strengths = [0.0, 0.5, 1.0, 1.5, 2.0]
    samples = {n: [] for n in row_counts}
    for _ in range(repeats):
        for n in row_counts:
            samples[n].append(step_ms(engine, engine.sweep_rows(strengths[:n]), tokens) / 1000)
    step = {n: statistics.median(v) for n, v in samples.items()}
    out = {}
    for n in row_counts:
        out[f"step_ms_{n}_rows"] = step[n] * 1000
        out[f"step_ratio_{n}_rows_to_1"] = step[n] / step[row_counts[0]]
    out["sweep_tokens_per_s_per_pane_5_rows"] = 1 / step[row_counts[-1]]
    return out


def token_lens_cost(engine, tokens: int = 64, repeats: int = 3) -> dict:
    """The token lens after a 64-token comparison, as the Compare view runs it, against that comparison: the run
    keeps its logits and cache (keep_for_scoring), so the lens computes the cross rows over the texts only
    (utils/runtime/kept_run.py)."""
    from utils.analysis.token_lens import score_texts
    from utils.core.seam import GenerationSettings

    generation, scoring = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True, keep_for_scoring=True)
        result = engine.run(PROMPT, "both", settings)
        generation.append(time.perf_counter() - started)
        texts = {key: state.token_ids for key, state in result.panes.items()}
        prompt_ids, _ = engine.encode(PROMPT, tokens)
        started = time.perf_counter()
        score_texts(engine, prompt_ids, texts)
        scoring.append(time.perf_counter() - started)
        engine.release_kept_run()
    gen, lens = statistics.median(generation), statistics.median(scoring)
    return {"lens_generation_s": gen, "lens_scoring_s": lens, "lens_over_generation": lens / gen}


def lens_scores_comparison(engine, tokens: int = 64, repeats: int = 3) -> dict:
    """The token lens's scores (log-probabilities, top 5 candidates, KL of each pane's pair) from 4 rows of
    `tokens` positions over the vocabulary, as scoring.scores_from_logits gets them after a 64-token comparison:
    the kernel library's loops (csrc/lens_scores.cpp) against ATen's operations, milliseconds, on the engine's
    threads, interleaved so that drift hits both alike."""
    import torch

    from utils.runtime import scoring
    from utils.runtime.threads import in_own_thread

    generator = torch.Generator().manual_seed(0)
    vocabulary = engine.vocabulary_size()
    logits = [torch.randn(tokens, vocabulary, generator=generator) * 4 for _ in range(4)]
    sequences = [torch.randint(0, vocabulary, (tokens + 1,), generator=generator).tolist() for _ in range(4)]
    args = (logits, sequences, [0] * 4, 5, [(1, 0), (3, 2)])
    if not scoring.fused_scores_serve(logits):
        return {}
    samples: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(repeats + 1):
        for fused in (True, False):
            started = time.perf_counter()
            in_own_thread(engine.threads, lambda f=fused: scoring.scores_from_logits(*args, fused=f))
            samples[fused].append(time.perf_counter() - started)
    fused_ms, aten_ms = (statistics.median(samples[f][1:]) * 1000 for f in (True, False))
    return {
        "lens_scores_ms": fused_ms,
        "lens_scores_aten_ms": aten_ms,
        "lens_scores_aten_over_loops": aten_ms / fused_ms,
    }


def attention_comparison(engine, cached=(50, 1000)) -> dict:
    """A 2-row decode step's attention of one layer (the embedded model's heads) over `cached` tokens: the
    compiled loop (csrc/decode_math.cpp) against torch's scaled_dot_product_attention, microseconds, on the
    engine's threads."""
    from utils.runtime.threads import in_own_thread

    out = {}
    for length in cached:
        loop_us, sdpa_us = in_own_thread(
            engine.threads, lambda n=length: _attention_us(engine.model.config, n)
        )
        out[f"attention_loop_us_{length}_cached"] = loop_us
        out[f"attention_sdpa_us_{length}_cached"] = sdpa_us
        out[f"attention_sdpa_over_loop_{length}_cached"] = sdpa_us / loop_us
    return out


def attention_shape(config) -> tuple[int, int, int]:
    """The model's query heads, key-value heads and head size."""
    heads, kv_heads = int(config.num_attention_heads), int(config.num_key_value_heads)
    return heads, kv_heads, int(getattr(config, "head_dim", None) or config.hidden_size // heads)


def best_seconds(work, repeats: int) -> float:
    """The least of `repeats` timed calls of `work`, after one untimed call."""
    work()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


def _attention_us(config, cached: int, repeats: int = 2000) -> tuple[float, float]:
    import torch
    import torch.nn.functional as F

    heads, kv_heads, head_dim = attention_shape(config)
    query = torch.randn(2, heads, 1, head_dim)
    keys, values = (torch.randn(2, kv_heads, cached + 128, head_dim).narrow(2, 0, cached) for _ in range(2))
    scale = head_dim**-0.5

    def timed(work) -> float:
        for _ in range(repeats // 10):
            work()
        started = time.perf_counter()
        for _ in range(repeats):
            work()
        return (time.perf_counter() - started) / repeats * 1e6

    loop = timed(lambda: torch.ops.lora_lens.one_token_attention(query, keys, values, scale))
    sdpa = timed(lambda: F.scaled_dot_product_attention(query, keys, values, scale=scale, enable_gqa=True))
    return loop, sdpa


def _attention_loop_loaded() -> bool:
    import torch

    return hasattr(torch.ops.lora_lens, "one_token_attention")


def copy_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """The machine's memory bandwidth as a plain large copy sees it: (read + write) bytes / time."""
    import torch

    src = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - started)
    return 2 * src.numel() * 4 / min(times) / 1e9


def read_bandwidth_gbs(threads: int, mb: int = 512, repeats: int = 5) -> float:
    """The rate at which `threads` threads read a large array (a sum over it): what a decode step's weights, read
    and not written, can stream at most."""
    import torch

    from utils.runtime.threads import in_own_thread

    src = torch.ones(mb * 2**20 // 4, dtype=torch.float32)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        in_own_thread(threads, src.sum)
        times.append(time.perf_counter() - started)
    return src.numel() * 4 / min(times) / 1e9


def float32_peak_gmacs(engine, repeats: int = 5) -> dict:
    """The fastest float32 product this process can call on the engine's threads: torch.mm (MKL's sgemm) at the
    shape of one 4-bit layer's tile in a prefill (80 rows, 576 x 1536) and at a large square one (2048^3), best
    of `repeats`, in G multiply-adds a second: the rate float32_floors takes as reachable here (MKL's own, not
    the cores' arithmetic peak)."""
    import torch

    from utils.runtime.threads import in_own_thread

    def best(m: int, k: int, n: int) -> float:
        a, b = torch.randn(m, k), torch.randn(k, n)
        return m * k * n / best_seconds(lambda: torch.mm(a, b), repeats) / 1e9

    with engine.exclusive():
        tile, square = in_own_thread(engine.threads, lambda: (best(80, 576, 1536), best(2048, 2048, 2048)))
    return {"float32_mm_gmacs_prefill_tile": tile, "float32_mm_gmacs_2048": square}


def four_bit_weights(model) -> int:
    """Weights in the 4-bit layers (each multiplied once per row in a pass), from their quantization state."""
    return sum(math.prod(shape) for shape in dense_product_shapes(model)[0])


def float32_floors(engine, measured: dict, tokens: int = 64) -> dict:
    """How low the time to first token and the token lens could go in float32 on this machine, from the
    multiply-adds they cannot skip and the fastest float32 product measured in the same run (float32_peak_gmacs):
    the prefill of the pricer prompt in both panes (2 rows of its tokens through the 4-bit layers, and the output
    layer at each row's last position), and the lens's cross rows (each pane's `tokens`-token text under the
    other model: 2 x tokens rows through the 4-bit layers and the output layer, as where the two texts differ
    from their first token; a shared start is read from the kept cache). Lower bounds otherwise: attention,
    norms, the LoRA products and everything else are left out, and the product is taken at its best shape."""
    peak = float32_peak_gmacs(engine)
    gmacs = max(peak.values())
    head = engine.model.get_output_embeddings().weight
    weights, head_weights = four_bit_weights(engine.model), head.shape[0] * head.shape[1]
    prompt = len(engine.encode(PROMPT, tokens)[0])
    ttft_floor_ms = (2 * prompt * weights + 2 * head_weights) / gmacs / 1e6
    lens_floor_s = 2 * tokens * (weights + head_weights) / gmacs / 1e9
    return {
        **peak,
        "four_bit_layer_weights": weights,
        "prompt_tokens": prompt,
        "ttft_float32_floor_ms": ttft_floor_ms,
        "ttft_over_its_floor": measured["ttft_ms_both"] / ttft_floor_ms,
        "lens_float32_floor_s": lens_floor_s,
        "lens_over_generation_floor": lens_floor_s / measured["lens_generation_s"],
    }


def dense_product_shapes(model) -> tuple[list, list]:
    """The [outputs, inputs] of every 4-bit layer's weight, and of the first adapter's lora_A and lora_B in each
    layer that has one, one entry a layer (a shape listed as often as it occurs)."""
    layers, lora, seen = [], [], set()
    for module in model.modules():  # a LoRA layer before its base layer, which shares its weight
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is None or id(weight) in seen:
            continue
        seen.add(id(weight))
        layers.append(tuple(int(size) for size in state.shape))
        adapters = getattr(module, "lora_A", None)
        if adapters:
            name = next(iter(adapters))
            lora.append((tuple(adapters[name].weight.shape), tuple(module.lora_B[name].weight.shape)))
    return layers, lora


def dense_float32_floors(engine, measured: dict, tokens: int = 64, repeats: int = 5) -> dict:
    """What the time to first token's and the token lens's products cost in float32 on this machine with every
    weight already dense (no 4-bit de-quantization at all): each of the model's products at its own shape and
    row count, torch.mm (MKL) on the engine's threads, best of `repeats`, summed over the layers, and each layer's
    attention (ATen's scaled_dot_product_attention at the pass's shape). Closer to what float32 itself allows than
    float32_floors (which takes the best rate of any shape for all of them), and still a lower bound: norms, the
    rotary embedding, the residual sums, SiLU and the pass's other operations are left out.

    The prefill: 2 rows of the prompt through every 4-bit layer, the LoRA products on the fine-tuned row only; its
    output layer at each row's last position is timed apart and left out of the total, since the engine reads its
    int8 form there, not this dense one. The lens's cross rows: 2 x `tokens` rows through every 4-bit layer
    after the prompt's cached keys and values, the LoRA products on the `tokens` rows under the fine-tune, the
    output layer at every row; with the lens's scores as measured in the same run (lens_scores_ms), the least part
    of its generation the lens could take here in float32."""
    import torch

    from utils.runtime.threads import in_own_thread

    layers, lora = dense_product_shapes(engine.model)
    head = engine.model.get_output_embeddings().weight
    prompt = len(engine.encode(PROMPT, tokens)[0])

    def timed_ms(rows: int, outputs: int, inputs: int, weights: dict) -> float:
        key = (outputs, inputs)
        if key not in weights:
            weights[key] = torch.randn(outputs, inputs)
        a, w = torch.randn(rows, inputs), weights[key]
        return best_seconds(lambda: torch.mm(a, w.t()), repeats) * 1e3

    config = engine.model.config
    heads, kv_heads, head_dim = attention_shape(config)

    def attention_ms(queries: int, keys: int) -> float:
        """One layer's attention over 2 rows: `queries` new positions after `keys - queries` cached ones."""
        q = torch.randn(2, heads, queries, head_dim)
        k, v = torch.randn(2, kv_heads, keys, head_dim), torch.randn(2, kv_heads, keys, head_dim)
        mask = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
        attend = torch.nn.functional.scaled_dot_product_attention
        return best_seconds(lambda: attend(q, k, v, attn_mask=mask, enable_gqa=True), repeats) * 1e3

    def pass_ms(rows: int, lora_rows: int, head_rows: int, queries: int, keys: int, with_head: bool) -> dict:
        weights, cache = {}, {}

        def once(rows_: int, shape: tuple) -> float:
            if (rows_, shape) not in cache:
                cache[rows_, shape] = timed_ms(rows_, *shape, weights)
            return cache[rows_, shape]

        layer_ms = sum(once(rows, shape) for shape in layers)
        lora_ms = sum(once(lora_rows, down) + once(lora_rows, up) for down, up in lora)
        weights[tuple(head.shape)] = head.detach().float()
        head_ms = timed_ms(head_rows, *head.shape, weights)
        attention = attention_ms(queries, keys) * config.num_hidden_layers
        total = layer_ms + lora_ms + attention + (head_ms if with_head else 0.0)
        return {"layers": layer_ms, "lora": lora_ms, "head": head_ms, "attention": attention, "total": total}

    def both() -> tuple[dict, dict]:
        # Once untimed first: in a new thread the first pass read 25% slower here (80 against 64 ms, the prefill).
        pass_ms(2 * prompt, prompt, 2, prompt, prompt, with_head=False)
        return (
            pass_ms(2 * prompt, prompt, 2, prompt, prompt, with_head=False),
            pass_ms(2 * tokens, tokens, 2 * tokens, tokens, prompt + tokens, with_head=True),
        )

    with engine.exclusive():
        prefill, lens = in_own_thread(engine.threads, both)
    scores_s = measured.get("lens_scores_ms", 0.0) / 1e3
    return {
        "ttft_dense_float32_ms": prefill["total"],
        "ttft_dense_float32_layers_ms": prefill["layers"],
        "ttft_dense_float32_lora_ms": prefill["lora"],
        "ttft_dense_float32_attention_ms": prefill["attention"],
        "ttft_dense_float32_output_layer_ms_not_counted": prefill["head"],
        "ttft_over_dense_float32": measured["ttft_ms_both"] / prefill["total"],
        "lens_dense_float32_s": lens["total"] / 1e3,
        "lens_dense_float32_layers_s": lens["layers"] / 1e3,
        "lens_dense_float32_lora_s": lens["lora"] / 1e3,
        "lens_dense_float32_head_s": lens["head"] / 1e3,
        "lens_dense_float32_attention_s": lens["attention"] / 1e3,
        "lens_over_generation_dense_float32": (lens["total"] / 1e3 + scores_s)
        / measured["lens_generation_s"],
    }


KERNEL_OPS = ("lora_lens::nf4_gemm", "lora_lens::nf4_lora_gemm", "lora_lens::nf4_linears")
OUTPUT_LAYER_OPS = ("lora_lens::q8_rows_gemm", "lora_lens::dense_rows_gemm")


def four_bit_share(engine, steps: int = 8) -> dict:
    """torch.profiler over decode steps of 2 rows: the share of a step inside the 4-bit matmuls (whichever
    kernel serves them), the fused kernel's own time per step, and the step's profile: milliseconds in the
    4-bit kernel, in the output layer, in other ATen operations and compiled glue (the profiler's other self
    times), and outside every recorded operation (Python, with the profiler's own cost)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from utils.runtime import nf4_kernel
    from utils.runtime.router import row_strengths
    from utils.runtime.threads import in_own_thread

    ids, _ = engine.encode(PROMPT, steps + 1)
    model = engine.model

    def profiled():  # in a thread of its own on the engine's CPU threads, as generation runs
        with row_strengths(model, [0.0, 1.0]), torch.inference_mode():
            out = model(input_ids=torch.tensor([ids] * 2), use_cache=True)
            past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            timing = nf4_kernel.STATE.registered and torch.ops.lora_lens.one_region_timing
            if timing:
                timing(True)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                started = time.perf_counter()
                for _ in range(steps):
                    out = model(input_ids=token, past_key_values=past, use_cache=True)
                    past, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
                wall = time.perf_counter() - started
            region = timing(False)[1:] if timing else [0.0] * 4
        return prof, wall, region

    with engine.exclusive():
        prof, wall, region = in_own_thread(engine.threads, profiled)
    averages = prof.key_averages()
    totals = {e.key: e.cpu_time_total for e in averages}
    selves = {e.key: e.self_cpu_time_total for e in averages}
    # Whichever op serves the 4-bit layers: gemm_4bit (stock, or this kernel through it), the kernel called
    # straight from the layers or from the compiled decode layer (nf4_gemm, nf4_lora_gemm with the LoRA
    # updates, nf4_linears for several layers of one input), or bitsandbytes' AVX512-BF16 gemv_4bit. gemm_4bit
    # nests nf4_gemm, so the largest is the total.
    # the layers' one parallel region (csrc/decode_layer.cpp: one_region_stack) is one call to the profiler; its
    # thread 0 times its parts itself: the products (A x, the 4-bit outputs, the LoRA updates), the attention, its
    # own small steps between them and its waits at the barriers
    products_us, attention_us, own_steps_us, waits_us = (seconds * 1e6 for seconds in region)
    fused = sum(selves.get(op, 0.0) for op in KERNEL_OPS) + products_us
    ops = ("bitsandbytes::gemm_4bit", "bitsandbytes::gemv_4bit")
    four_bit = max([fused, *(totals.get(op, 0.0) for op in ops)])
    output_layer = sum(selves.get(op, 0.0) for op in OUTPUT_LAYER_OPS)
    recorded = sum(selves.values())
    per_step = lambda us: us / 1e3 / steps  # noqa: E731
    return {
        "share_in_4bit_matmuls": four_bit / 1e6 / wall,
        "fused_kernel_ms_per_step": per_step(fused),
        "profiled_step_ms": wall / steps * 1000,
        "profile_2_rows_kernel_ms": per_step(four_bit),
        "profile_2_rows_output_layer_ms": per_step(output_layer),
        "profile_2_rows_other_aten_ms": per_step(recorded - fused - output_layer),
        "profile_2_rows_python_ms": max(0.0, wall / steps * 1000 - per_step(recorded)),
        "profile_2_rows_region_attention_ms": per_step(attention_us),
        "profile_2_rows_region_own_steps_ms": per_step(own_steps_us),
        "profile_2_rows_region_waits_ms": per_step(waits_us),
    }


def step_profile(engine) -> dict:
    """The default path's 2-row decode step split into kernel, output layer, other ATen and Python (ms)."""
    return {key: value for key, value in four_bit_share(engine).items() if key.startswith("profile_")}


def weight_bytes(model, adapter: str | None = None) -> tuple[int, int]:
    """Bytes of the 4-bit layers' packed weights and scales, and of the LoRA weights (fp32) of `adapter` (peft's
    name; every adapter's where None), each weight counted once."""
    four_bit = lora = 0
    seen = set()
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if weight is None or id(weight) in seen:  # a peft LoRA layer shows its base layer's weight too
            continue
        seen.add(id(weight))
        state = getattr(weight, "quant_state", None)
        if state is not None:
            four_bit += (
                weight.numel() * weight.element_size() + state.absmax.numel() * state.absmax.element_size()
            )
            continue
        kind, own = name.rsplit(".", 2)[-2:] if name.count(".") >= 2 else ("", "")  # ...lora_A.default
        if kind in ("lora_A", "lora_B") and adapter in (None, own):
            lora += weight.numel() * weight.element_size()
    return four_bit, lora


def kernel_bytes(model) -> int:
    """Bytes the fused kernel reads in a decode step: the 4-bit layers' packed weights and scales, and the LoRA
    weights (fp32) whose updates it adds."""
    return sum(weight_bytes(model))


def decode_step_bytes(engine, tokens: int, row_counts=(1, 2, 5)) -> dict:
    """Megabytes a decode step of step_costs' rows must read from memory, none of it twice: the 4-bit layers'
    packed weights and scales, the LoRA weights (float32) where a row's strength is not 0 (rows 2 to 5 share the
    one adapter), the output layer as the decode path reads it (cpu_decode.compiled_head_args: its exact int8 form
    with the scales, else float32), and the key/value cache at the steps' mean length (the prompt and half the new
    tokens). Against the read bandwidth measured in the same run (bench_decode_floors) it gives how fast a step
    could be here."""
    import torch

    from utils.runtime import cpu_decode

    model = engine.model
    adapter = engine.pair.adapters[0].peft_name if engine.pair.adapters else ""
    four_bit, lora = weight_bytes(model, adapter)
    head = model.get_output_embeddings()
    with torch.no_grad():  # what a decode step's one call reads, as the engine's greedy loop takes it
        served = cpu_decode.compiled_head_args(head, 2) or (head.weight, head.bias)
    head_bytes = sum(t.numel() * t.element_size() for t in served if t is not None)
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    cached = len(engine.encode(PROMPT, tokens)[0]) + tokens / 2
    per_row_cache = 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 4 * cached
    out = {}
    for rows in row_counts:
        total = four_bit + (lora if rows > 1 else 0) + head_bytes + rows * per_row_cache
        out[f"step_bytes_mb_{rows}_rows"] = total / 1e6
    return out


def bench_decode_floors(result: dict, row_counts=(1, 2, 5)) -> dict:
    """Each decode step's bytes (decode_step_bytes) at the read bandwidth measured in the same run: the fastest
    the step could be on this machine's memory, the measured step over it, and the tokens a second per pane that
    a 2-row step at that floor would give."""
    out = {}
    for rows in row_counts:
        floor_ms = result[f"step_bytes_mb_{rows}_rows"] / 1e3 / result["read_bandwidth_gbs"] * 1e3
        out[f"step_bandwidth_floor_ms_{rows}_rows"] = floor_ms
        out[f"step_over_bandwidth_floor_{rows}_rows"] = result[f"step_ms_{rows}_rows"] / floor_ms
    out["tokens_per_s_per_pane_bandwidth_ceiling"] = 1000 / out["step_bandwidth_floor_ms_2_rows"]
    return out


def kernel_comparison(settings, tokens: int, repeats: int) -> dict:
    """The stock bitsandbytes path against the fused kernel in one run: steps/s for 1, 2 and 5 rows, the share
    of a step in the 4-bit matmuls, and the kernel's effective memory bandwidth against a plain copy's.

    Both run on a model of their own, loaded in LORA_LENS_CPU_KERNEL=fused mode (fp32 compute, weights in
    bitsandbytes' own layout), so that on CPUs where bitsandbytes has its AVX512-BF16 kernel the comparison
    still sees the stock path and this kernel rather than that one; the engine's figures above are the
    default's (whichever kernel the header names).
    """
    from dataclasses import replace

    from utils.runtime import nf4_kernel
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair

    with nf4_kernel.mode("fused", settings.cache_dir) as state:
        if not state.registered:
            return {"fused_kernel": state.status}
        pair = load_model_pair(replace(settings, compute_dtype="float32"), has_gpu=False)
    engine = Engine(pair)
    out = {
        "copy_bandwidth_gbs": copy_bandwidth_gbs(),
        "read_bandwidth_gbs": read_bandwidth_gbs(engine.threads),
    }
    for name, enabled in (("stock", False), ("fused", True)):
        nf4_kernel.STATE.enabled = enabled
        try:
            steps = step_costs(engine, tokens, repeats)
            share = four_bit_share(engine)
        finally:
            nf4_kernel.STATE.enabled = True
        for rows in (1, 2, 5):
            out[f"{name}_steps_per_s_{rows}_rows"] = 1000 / steps[f"step_ms_{rows}_rows"]
        out[f"{name}_share_in_4bit_matmuls"] = share["share_in_4bit_matmuls"]
        if enabled:
            out["fused_kernel_ms_per_step"] = share["fused_kernel_ms_per_step"]
            out["fused_kernel_gbs"] = (
                kernel_bytes(engine.model) / (share["fused_kernel_ms_per_step"] / 1000) / 1e9
            )
    out["fused_over_stock_2_rows"] = out["fused_steps_per_s_2_rows"] / out["stock_steps_per_s_2_rows"]
    return out


def output_layer_comparison(engine, tokens: int, repeats: int) -> dict:
    """A 2-row decode step with the output layer as `linear`, as `W @ x^T` and as the compiled kernel's
    dense_rows_gemm (utils/runtime/cpu_decode.py; the last equals the second where the kernel is not loaded)."""
    from utils.runtime import cpu_decode

    out = {}
    for name, enabled, compiled in (
        ("plain", False, False),
        ("streamed", True, False),
        ("compiled", True, True),
    ):
        cpu_decode.SWITCH.enabled, cpu_decode.SWITCH.compiled = enabled, compiled
        try:
            out[f"output_layer_{name}_step_ms_2_rows"] = step_costs(engine, tokens, repeats, (2,))[
                "step_ms_2_rows"
            ]
        finally:
            cpu_decode.SWITCH.enabled = cpu_decode.SWITCH.compiled = True
    return out


def decode_layer_comparison(engine, tokens: int, repeats: int) -> dict:
    """Decode steps of 1 and 2 rows with transformers' LlamaDecoderLayer and with the compiled decode layer
    (utils/runtime/decode_layers.py), and how many layers the latter serves (0 where the fused kernel does not serve
    the model: then both columns are transformers')."""
    from utils.runtime import decode_layers

    out = {"decode_layers_served": engine.pair.report.compiled_layers}
    for name, enabled in (("transformers", False), ("compiled", True)):
        decode_layers.SWITCH.enabled = enabled
        try:
            steps = step_costs(engine, tokens, repeats, (1, 2))
        finally:
            decode_layers.SWITCH.enabled = True
        for rows in (1, 2):
            out[f"decode_layer_{name}_step_ms_{rows}_rows"] = steps[f"step_ms_{rows}_rows"]
    return out


def bench_pair(pair, tokens: int, repeats: int) -> dict:
    from utils.core.seam import BASE, FINE_TUNED, GenerationSettings
    from utils.runtime.engine import Engine

    engine = Engine(pair)
    settings = GenerationSettings(max_new_tokens=tokens, ignore_eos=True)
    engine.run(PROMPT, "both", GenerationSettings(max_new_tokens=4, ignore_eos=True))  # warm-up
    rows = {"mixed_s": [], "base_s": [], "tuned_s": [], "ttft_s": [], "tps_base": [], "tps_tuned": []}
    for _ in range(repeats):
        # Interleaved, so drift in machine load hits all three alike.
        mixed_s, mixed = timed_run(engine, "both", settings)
        base_s, _ = timed_run(engine, "base", settings)
        tuned_s, _ = timed_run(engine, "fine_tuned", settings)
        rows["mixed_s"].append(mixed_s)
        rows["base_s"].append(base_s)
        rows["tuned_s"].append(tuned_s)
        rows["ttft_s"].append(max(mixed.panes[BASE].first_token_s, mixed.panes[FINE_TUNED].first_token_s))
        rows["tps_base"].append(mixed.panes[BASE].tokens_per_s)
        rows["tps_tuned"].append(mixed.panes[FINE_TUNED].tokens_per_s)
    med = {k: statistics.median(v) for k, v in rows.items()}
    result = {
        "tokens_per_pane": tokens,
        "repeats": repeats,
        "ttft_ms_both": med["ttft_s"] * 1000,
        "tokens_per_s_per_pane_both": min(med["tps_base"], med["tps_tuned"]),
        "tokens_per_s_base_pane": med["tps_base"],
        "tokens_per_s_tuned_pane": med["tps_tuned"],
        "mixed_batch_s": med["mixed_s"],
        "sequential_s": med["base_s"] + med["tuned_s"],
        "mixed_over_sequential": med["mixed_s"] / (med["base_s"] + med["tuned_s"]),
        **toggle_cost_us(engine),
        **step_costs(engine, tokens, repeats),
        **(decode_step_bytes(engine, tokens) if pair.report.device == "cpu" else {}),
        **token_lens_cost(engine, 64, repeats),
        **(lens_scores_comparison(engine, 64, repeats) if pair.report.device == "cpu" else {}),
        **(step_profile(engine) if pair.report.device == "cpu" else {}),
        **(output_layer_comparison(engine, tokens, repeats) if pair.report.device == "cpu" else {}),
        **(decode_layer_comparison(engine, tokens, repeats) if pair.report.device == "cpu" else {}),
        **(attention_comparison(engine) if _attention_loop_loaded() else {}),
    }
    if pair.report.device == "cpu":
        result.update(float32_floors(engine, result))
        result.update(dense_float32_floors(engine, result))
    return result


def run_embedded(args) -> dict:
    from utils.core.profiles import DEMO_ADAPTER_DIR, read_settings
    from utils.runtime.loading import load_model_pair

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    settings = read_settings()
    if not (DEMO_ADAPTER_DIR / "adapter_config.json").exists():
        # Before the demo adapter is trained, time a random one of the same shape (r=32 on q/k/v/o).
        from dataclasses import replace

        from utils.runtime.embedded import ensure_cache
        from utils.runtime.tiny import build_random_lora

        stand_in = Path(args.work_dir) / "random-smollm2-lora"
        if not stand_in.exists():
            build_random_lora(ensure_cache(settings.cache_dir), stand_in, r=32, alpha=64)
        settings = replace(settings, adapter=str(stand_in))
        env["LORA_LENS_ADAPTER"] = str(stand_in)
    cold = cold_load_seconds(env)
    started = time.perf_counter()
    pair = load_model_pair(settings, has_gpu=False)
    warm = time.perf_counter() - started
    result = {
        "model": pair.report.title,
        "device": pair.report.device,
        "precision": pair.report.precision,
        "compute_dtype": pair.report.compute_dtype,
        "threads": pair.report.cpu_threads,
        "cold_load_s": cold,
        "warm_load_s": warm,
        "base_footprint_mb": pair.report.base_footprint_bytes / 1e6,
        "footprint_with_adapter_mb": pair.report.footprint_with_adapter_bytes / 1e6,
        "adapter_params": pair.report.adapter_params,
        "kernel": pair.report.kernel,
        **bench_pair(pair, args.tokens, args.repeats),
        **kernel_comparison(settings, args.tokens, args.repeats),
    }
    if args.compare_dtypes:
        from dataclasses import replace

        other = "bfloat16" if pair.report.compute_dtype == "float32" else "float32"
        del pair
        alt = load_model_pair(replace(settings, compute_dtype=other), has_gpu=False)
        alt_row = bench_pair(alt, args.tokens, 1)
        result[f"{other}_compute_tokens_per_s_per_pane"] = alt_row["tokens_per_s_per_pane_both"]
        result[f"{other}_compute_mixed_over_sequential"] = alt_row["mixed_over_sequential"]
    if "read_bandwidth_gbs" in result:
        result.update(bench_decode_floors(result))
    result["peak_rss_mb"] = peak_rss_mb()
    return result


def run_random_8b(args) -> dict:
    """GPU: a random-init Llama-3.1-8B-architecture model in NF4 plus an r=32 q/k/v/o adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from utils.core.profiles import REFERENCE_CONFIG_DIR, SMOLLM2_PRICER, read_settings
    from utils.runtime.loading import LoadedPair, LoadReport, quantization_config

    if not torch.cuda.is_available():
        raise SystemExit("--model random-8b needs a CUDA GPU.")
    started = time.perf_counter()
    config = AutoConfig.from_pretrained(REFERENCE_CONFIG_DIR)
    folder = Path(args.work_dir) / "random-llama-3.1-8b"
    if not (folder / "config.json").exists():
        with torch.device("cuda"):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        del model
        torch.cuda.empty_cache()
    from utils.runtime.embedded import ensure_cache

    tokenizer = AutoTokenizer.from_pretrained(ensure_cache(read_settings().cache_dir))
    model = AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization_config(), device_map="cuda"
    )
    base_fp = model.get_memory_footprint()
    lora = LoraConfig(
        r=32,
        lora_alpha=64,
        lora_dropout=0.1,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora).eval()
    # Token ids beyond SmolLM2's vocabulary never occur, so its tokenizer is enough to drive a random model.
    pair = LoadedPair(
        model=model,
        tokenizer=tokenizer,
        profile=SMOLLM2_PRICER,
        adapter_dir=folder,
        report=LoadReport(
            "random-8b",
            "random Llama-3.1-8B + r=32 LoRA",
            str(folder),
            "random",
            "cuda:0",
            "nf4",
            "bfloat16",
            0,
            base_fp,
            model.get_memory_footprint(),
            0,
            0,
            time.perf_counter() - started,
        ),
    )
    return {
        "model": pair.report.title,
        "device": torch.cuda.get_device_name(0),
        "base_footprint_mb": base_fp / 1e6,
        "footprint_with_adapter_mb": model.get_memory_footprint() / 1e6,
        "load_s": pair.report.load_seconds,
        **bench_pair(pair, args.tokens, args.repeats),
        "peak_gpu_mb": torch.cuda.max_memory_allocated() / 1e6,
    }


def cpu_description() -> str:
    """The CPU's model name and the vector extensions the figures depend on, from /proc/cpuinfo.

    Example: "AMD EPYC, family 25 model 17 (avx2, avx512f, avx512_bf16)". The family and model name the chip where a
    virtual machine's model name does not ("Intel(R) Xeon(R) Processor").
    """
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or "unknown"

    def field(key: str) -> str:
        return next(
            (
                line.split(":", 1)[1].strip()
                for line in text.splitlines()
                if line.split(":")[0].strip() == key
            ),
            "",
        )

    flags = set(field("flags").split())
    has = [flag for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16") if flag in flags]
    chip = f", family {field('cpu family')} model {field('model')}" if field("cpu family") else ""
    return f"{field('model name') or 'unknown'}{chip} ({', '.join(has) or 'no AVX2'})"


def run_fields(pair, as_avx2: bool) -> dict:
    """What every benchmark's JSON starts with: the date, the CPU, and the path the model runs on."""
    return {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_description(),
        "as_avx2": bool(as_avx2),
        "kernel": pair.report.kernel,
        "compute_dtype": pair.report.compute_dtype,
    }


def parse_bench_args(parser, argv, out: str):
    """The arguments of a benchmark script with the options they all take (--as-avx2, --out), re-running the
    script in a fresh interpreter on the AVX2 path where --as-avx2 asks (the ISA is fixed when torch loads)."""
    parser.add_argument("--as-avx2", action="store_true", help="as bench_engine.py's --as-avx2")
    parser.add_argument("--out", default=out)
    args = parser.parse_args(argv)
    if args.as_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        os.environ.update(AS_AVX2)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    return args


def embedded_pair():
    """The embedded default with its demo adapter alone (no checkpoints), on the CPU."""
    from utils.core.profiles import read_settings
    from utils.runtime.loading import load_model_pair

    return load_model_pair(replace(read_settings(), profile="smollm2-pricer", adapters=()), has_gpu=False)


def write_result(path: str, result: dict) -> None:
    """The benchmark's JSON written, and each field printed."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    for key, value in result.items():
        print(f"{key}: {value:,.3f}" if isinstance(value, float) else f"{key}: {value}")


def table(result: dict) -> str:
    lines = ["| measure | value |", "|---|---|"]
    for key, value in result.items():
        shown = (
            f"{value:,.3f}" if isinstance(value, float) else f"{value:,}" if isinstance(value, int) else value
        )
        lines.append(f"| {key} | {shown} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["embedded", "random-8b"], default="embedded")
    parser.add_argument("--tokens", type=int, default=48, help="new tokens per pane in each timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--compare-dtypes", action="store_true", help="also time the other CPU compute dtype")
    parser.add_argument("--work-dir", default="/tmp/lora-lens-bench")
    parser.add_argument("--out", default="bench/results/engine.json")
    parser.add_argument(
        "--as-avx2",
        action="store_true",
        help="on a CPU with AVX-512: torch's own kernels limited to AVX2 and the fused 4-bit kernel serving, "
        "the closest stand-in here for a CPU without AVX-512",
    )
    args = parser.parse_args(argv)
    if args.as_avx2 and os.environ.get("ATEN_CPU_CAPABILITY") != "avx2":
        # These are read when torch and its libraries load, so the benchmark starts again with them set.
        os.environ.update(AS_AVX2)
        os.execv(sys.executable, [sys.executable, *sys.argv])
    result = run_embedded(args) if args.model == "embedded" else run_random_8b(args)
    isa = " (--as-avx2: " + ", ".join(f"{k}={v}" for k, v in AS_AVX2.items()) + ")" if args.as_avx2 else ""
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_description(),
        "machine": f"{platform.machine()} {os.cpu_count()} cores{isa}",
        **result,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"\nwritten: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
