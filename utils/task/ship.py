"""Shipping a fine-tune: the merge check with the task's own evaluation, the reference file a serving engine is
checked against, and a CLI for every export.

    python -m utils.task.ship check [--adapter NAME] [--items 20] [--json FILE]
    python -m utils.task.ship adapter --strength 0.5 --out DIR      # peft folder, lora_B scaled by s
    python -m utils.task.ship gguf --out FILE [--outtype f32|f16]    # GGUF LoRA for llama.cpp
    python -m utils.task.ship merged --route bf16 --out DIR          # the merged model as safetensors
    python -m utils.task.ship reference --items 20 --out FILE        # greedy texts and log p, base and fine-tune

The CLI loads the model the app would load (LORA_LENS_* settings; the embedded default without any).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from utils.analysis import merge_check
from utils.core.errors import InputError
from utils.core.seam import BASE, FINE_TUNED, Backend, GenerationSettings, Row, Use
from utils.task.catalog import load_split
from utils.task.pricing import build_prompt, extract_price, price_metrics

TEXT_TOKENS = 24  # greedy tokens of the prompt's base and fine-tuned texts, scored under each merged copy
ANSWER_TOKENS = 8  # greedy tokens of each answer under each copy ("999.99" is six digit-tokens for SmolLM2)
MAX_ITEMS = 50


@dataclass
class ShipCheck:
    """The merge check and, for pricer profiles, each route's price metrics on the items."""

    check: merge_check.MergeCheck
    prompt: str
    items: int
    metrics: dict[str, dict] = field(default_factory=dict)  # "unmerged" or route -> {"mae", "hit_rate", ...}

    def as_json(self) -> dict:
        out = merge_check.check_json(self.check)
        out.update(prompt=self.prompt, items=self.items, metrics=self.metrics)
        return out


def default_prompt(profile) -> str:
    """The merge check's prompt when none is given: the first catalog test item (pricers), else a general one."""
    if profile.is_pricer:
        return build_prompt(load_split("test", 1)[0].description, profile.task_prompt)
    return REFERENCE_PROMPTS[0]


def _metrics(items, texts) -> dict:
    m = price_metrics([item.price for item in items], [extract_price(t) for t in texts])
    return {k: (v if not isinstance(v, float) or math.isfinite(v) else None) for k, v in vars(m).items()}


def run_check(
    backend: Backend, profile, adapter: str, prompt: str, n_items: int = 20, run_routes=None
) -> ShipCheck:
    """The merge check of `adapter` on `prompt` (base and fine-tuned texts, teacher-forced under each merged
    copy) and, for a pricer profile, on `n_items` test items (their greedy prices under each copy)."""
    name = backend.adapter_named(adapter)["name"]
    settings = GenerationSettings(max_new_tokens=TEXT_TOKENS)
    rows = [Row(BASE, "Base", 0.0, None), Row(FINE_TUNED, name, 1.0, name)]
    result = backend.run_rows(prompt, rows, settings)
    prompt_ids = backend.encode(prompt, TEXT_TOKENS)[0]
    texts = [list(result.panes[key].token_ids) for key in (BASE, FINE_TUNED)]
    sequences = [prompt_ids + t for t in texts if t]
    keep_from = [len(prompt_ids) - 1] * len(sequences)
    items = load_split("test", n_items) if profile.is_pricer and n_items else []
    prompts = [prompt] + [build_prompt(item.description, profile.task_prompt) for item in items]
    reference = [a.text for a in backend.evaluate_chunk(prompts, [Use(name, 1.0)], TEXT_TOKENS, 1)[0]]
    check = merge_check.check(
        backend, name, sequences, keep_from, prompts, reference, TEXT_TOKENS, run_routes
    )
    out = ShipCheck(check, prompt, len(items))
    if items:
        out.metrics["unmerged"] = _metrics(items, reference[1:])
        for route, runs in check.behaviour.items():
            out.metrics[route] = _metrics(items, runs.texts[1:])
    return out


REFERENCE_PROMPTS = (
    "The three primary colours are",
    "Write a haiku about autumn leaves.",
    "def fibonacci(n):",
)


def reference_file(backend: Backend, profile, n_items: int, out: Path) -> Path:
    """For the evaluation prompts (test items for a pricer, else a few general prompts), the greedy tokens of
    the base and the fine-tune, and the log-probability of each under its model: what a serving engine's output
    is checked against (same prompt ids, same greedy tokens, log p within the engine's tolerance)."""
    if profile.is_pricer:
        prompts = [
            build_prompt(item.description, profile.task_prompt) for item in load_split("test", n_items)
        ]
    else:
        prompts = list(REFERENCE_PROMPTS[: max(1, n_items)])
    rows = [Row(BASE, "Base", 0.0, None), Row(FINE_TUNED, "Fine-tuned", 1.0)]
    settings = GenerationSettings(max_new_tokens=TEXT_TOKENS)
    records = []
    for prompt in prompts:
        prompt_ids = backend.encode(prompt, TEXT_TOKENS)[0]
        result = backend.run_rows(prompt, rows, settings)
        record = {"prompt": prompt, "prompt_ids": prompt_ids}
        for row in rows:
            ids = list(result.panes[row.key].token_ids)
            scores = backend.score_rows([prompt_ids + ids], [row], len(prompt_ids) - 1) if ids else None
            record[row.key] = {
                "text": result.panes[row.key].text,
                "token_ids": ids,
                "logprobs": scores.rows[0].logprobs if scores else [],
            }
        records.append(record)
    payload = {"base": backend.report.base, "adapter": backend.report.adapter, "max_new_tokens": TEXT_TOKENS}
    Path(out).write_text(json.dumps({**payload, "greedy": True, "items": records}, indent=1))
    return Path(out)


def export_adapter(backend: Backend, strength: float, out: Path) -> Path:
    """The loaded primary adapter at strength s as a peft folder (utils/runtime/exports.py)."""
    from utils.runtime.exports import write_scaled_adapter

    _require_files(backend)
    return write_scaled_adapter(backend.adapter_dir, strength, out)


def export_gguf(backend: Backend, out: Path, outtype: str = "f32") -> Path:
    """The loaded primary adapter as a GGUF LoRA for llama.cpp (utils/runtime/exports.py)."""
    from utils.runtime.exports import write_gguf_lora

    _require_files(backend)
    return write_gguf_lora(backend.adapter_dir, backend.config.to_dict(), out, outtype)


def _require_files(backend: Backend) -> None:
    if backend.adapter_dir is None:
        raise InputError("No adapter is loaded (base-only): there is nothing to export.")


def _load():
    from utils.core.profiles import read_settings
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair

    pair = load_model_pair(read_settings())
    if not pair.has_adapter:
        raise InputError("No adapter loaded: " + "; ".join(pair.report.notices))
    return pair, Engine(pair)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m utils.task.ship", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="the merge check, printed (and saved with --json)")
    check.add_argument("--adapter", default=FINE_TUNED)
    check.add_argument("--items", type=int, default=20)
    check.add_argument("--prompt", default=None)
    check.add_argument("--json", type=Path, default=None)
    scaled = sub.add_parser("adapter", help="the adapter at a strength, as a peft folder")
    scaled.add_argument("--strength", type=float, default=1.0)
    scaled.add_argument("--out", type=Path, required=True)
    gguf = sub.add_parser("gguf", help="the adapter as a GGUF LoRA for llama.cpp")
    gguf.add_argument("--out", type=Path, required=True)
    gguf.add_argument("--outtype", choices=("f32", "f16"), default="f32")
    merged = sub.add_parser("merged", help="the merged model as safetensors")
    merged.add_argument("--route", choices=merge_check.ROUTES, default="fp32")
    merged.add_argument("--out", type=Path, required=True)
    reference = sub.add_parser("reference", help="greedy texts and log p under base and fine-tune")
    reference.add_argument("--items", type=int, default=20)
    reference.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)

    pair, engine = _load()
    if args.command == "check":
        prompt = args.prompt or default_prompt(pair.profile)
        result = run_check(engine, pair.profile, args.adapter, prompt, args.items)
        print(result.check.verdict())
        for route in result.check.routes:
            kl = result.check.mean_kl(route)
            print(
                f"{route:9s} update lost {100 * result.check.median_lost(route):8.3f}% (median layer), "
                f"KL {'-' if kl is None else f'{kl:.3g}'} nats a token, metrics {result.metrics.get(route, '-')}"
            )
        if args.json:
            args.json.write_text(json.dumps(result.as_json(), indent=1))
    elif args.command == "adapter":
        print(export_adapter(engine, args.strength, args.out))
    elif args.command == "gguf":
        print(export_gguf(engine, args.out, args.outtype))
    elif args.command == "merged":
        from utils.runtime.exports import save_merged

        with engine.adapter_weights() as layers:
            print(save_merged(pair, layers, args.route, args.out))
    else:
        print(reference_file(engine, pair.profile, args.items, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
