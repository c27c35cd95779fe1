"""Train the demo pricer LoRA on the synthetic catalog: `python -m utils.task.train_adapter`.

A plain PyTorch loop (AdamW, warmup + cosine schedule, gradient clipping) in fp32 on CPU, with the loss on
the price and EOS only. It trades speed for clarity and exact resumption: the batch order is a pure
function of (seed, step), and a checkpoint holds adapter, optimizer, scheduler and RNG states, so
`--resume` continues the same run step for step. Checkpoints live under the cache dir, never in the repo.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from utils.core.errors import InputError, LoraLensError
from utils.core.profiles import DEMO_ADAPTER_DIR, EMBEDDED_BASE, PRICER_PROMPT, LoraSettings, read_settings
from utils.task.catalog import DEFAULT_SEED, SYNTHETIC_NOTICE, load_split
from utils.task.checkpoints import (
    CHECKPOINT_NAME,
    load_checkpoint,
    save_checkpoint,
    save_series_checkpoint,
    warm_start,
)
from utils.task.training_data import (
    batch_indices,
    collate,
    completion_loss,
    encode_example,
    lora_param_count,
    lr_factor,
    validation_loss,
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; the same config and seed give the same adapter."""

    steps: int = 400  # optimizer steps in the whole run (resumed runs count from the checkpoint)
    batch_size: int = 8  # examples per step
    lr: float = 5e-4  # peak learning rate of AdamW
    warmup_steps: int = 20  # linear warmup from 0 to lr, then cosine decay to 10% of lr
    weight_decay: float = 0.0  # AdamW weight decay on the LoRA matrices
    max_grad_norm: float = 1.0  # gradients are clipped to this global norm
    seed: int = 42  # torch / batch-order seed
    data_seed: int = DEFAULT_SEED  # catalog seed (utils.task.catalog)
    train_size: int = 3200  # distinct training items drawn from the train split
    val_size: int = 64  # validation items for the periodic validation loss
    max_length: int = 96  # prompt + completion tokens; longer prompts are cut from the left
    base: str | None = None  # model folder; None = the embedded SmolLM2 cache
    output: Path | None = None  # where the adapter and training_log.json go; None: the cache (default_output)
    checkpoint_dir: Path | None = None  # None = <cache dir>/training/smollm2-pricer
    checkpoint_every: int = 50  # steps between checkpoints (and one at the end)
    eval_every: int = 50  # steps between validation losses (and one at the end)
    log_every: int = 10  # steps between progress lines
    resume: bool = False  # continue from the checkpoint in checkpoint_dir
    init_adapter: Path | None = (
        None  # warm start: LoRA weights of an earlier run (a new run, fresh optimizer)
    )
    stop_at: int | None = None  # stop after this step as if interrupted (tests of --resume)
    series_dir: Path | None = None  # keep an fp16 adapter at each checkpoint: series_dir/checkpoint-STEP
    template: str = PRICER_PROMPT  # the task prompt
    lora: LoraSettings = field(default_factory=LoraSettings)  # r, alpha, dropout, target modules
    threads: int = 2  # torch.set_num_threads


@dataclass(frozen=True)
class TrainResult:
    """What a run produced."""

    output: Path  # folder with adapter_config.json, adapter_model.safetensors, training_log.json
    step: int  # last step done
    losses: list[float]  # training loss per step, from step 1
    val_losses: list[tuple[int, float]]  # (step, validation loss)
    seconds: float  # training time over all resumed parts
    trainable_params: int  # LoRA parameters


def _resolve(config: TrainConfig) -> tuple[str, str, Path]:
    """(model folder, name recorded in the adapter, checkpoint dir)."""
    settings = read_settings()
    if config.base is None:
        from utils.runtime.embedded import ensure_cache

        folder, name = str(ensure_cache(settings.cache_dir)), EMBEDDED_BASE
    else:
        folder = name = str(config.base)
    checkpoint_dir = config.checkpoint_dir or settings.cache_dir / "training" / "smollm2-pricer"
    return folder, name, Path(checkpoint_dir)


def _fingerprint(config: TrainConfig, base_name: str) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    keys = ("steps", "batch_size", "lr", "warmup_steps", "weight_decay", "seed", "data_seed", "train_size")
    out = {k: getattr(config, k) for k in keys}
    out.update(
        max_length=config.max_length, template=config.template, lora=asdict(config.lora), base=base_name
    )
    out["lora"]["target_modules"] = list(config.lora.target_modules)
    return out


def train(config: TrainConfig, log: Callable[[str], None] = print) -> TrainResult:
    """Run (or resume) one training run and save the adapter to config.output."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if config.steps < 1 or config.batch_size < 1 or config.train_size < 1:
        raise InputError("--steps, --batch-size and --train-size must be at least 1.")
    torch.set_num_threads(config.threads)
    folder, base_name, checkpoint_dir = _resolve(config)
    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    lora = LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        target_modules=list(config.lora.target_modules),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.peft_config["default"].base_model_name_or_path = base_name
    warm_started = warm_start(model, config.init_adapter) if config.init_adapter else None
    n_params = lora_param_count(model)
    log(
        f"LoRA r={config.lora.r} alpha={config.lora.alpha} on {', '.join(config.lora.target_modules)}: "
        f"{n_params:,} trainable parameters ({n_params * 4 / 1e6:.1f} MB in fp32)"
    )

    train_items = load_split("train", config.train_size, config.data_seed)
    val_items = load_split("validation", config.val_size, config.data_seed)
    encode = lambda item: encode_example(item, tokenizer, config.template, config.max_length)  # noqa: E731
    train_examples = [encode(item) for item in train_items]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    val_examples = [encode(item) for item in val_items]
    val_batches = [
        collate(val_examples[i : i + config.batch_size], pad_id)
        for i in range(0, len(val_examples), config.batch_size)
    ]
    log(
        f"{SYNTHETIC_NOTICE}\n{len(train_examples)} training items, {len(val_examples)} validation items "
        f"(catalog seed {config.data_seed})."
    )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, config.steps, config.warmup_steps)
    )
    fingerprint = _fingerprint(config, base_name)
    state = {"fingerprint": fingerprint, "step": 0, "losses": [], "val_losses": [], "seconds": 0.0}
    if config.resume:
        state = load_checkpoint(checkpoint_dir, model, optimizer, scheduler, fingerprint)
        state = {k: state[k] for k in ("fingerprint", "step", "losses", "val_losses", "seconds")}
        log(f"Resumed from {checkpoint_dir / CHECKPOINT_NAME} at step {state['step']}.")

    model.train()
    start_step, started = state["step"], time.perf_counter()
    window: list[float] = []
    last = min(config.steps, config.stop_at or config.steps)
    for step in range(start_step, last):
        batch = collate(
            [
                train_examples[i]
                for i in batch_indices(step, config.batch_size, len(train_examples), config.seed)
            ],
            pad_id,
        )
        loss = completion_loss(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
        lr_now = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        state["step"] = done
        state["losses"].append(loss.item())
        window.append(loss.item())
        elapsed = time.perf_counter() - started
        if done % config.log_every == 0 or done == last:
            per_step = elapsed / (done - start_step)
            eta = per_step * (config.steps - done)
            log(
                f"step {done}/{config.steps}  loss {sum(window) / len(window):.4f}  lr {lr_now:.2e}  "
                f"{per_step:.2f} s/step  ETA {eta / 60:.1f} min"
            )
            window = []
        if done % config.eval_every == 0 or done == config.steps:
            val = validation_loss(model, val_batches)
            state["val_losses"].append((done, val))
            log(f"step {done}: validation loss {val:.4f}")
        if config.series_dir is not None and done % config.checkpoint_every == 0:
            save_series_checkpoint(Path(config.series_dir), model, done, state, config, base_name)
            log(f"step {done}: kept {Path(config.series_dir) / f'checkpoint-{done}'}")
        if done % config.checkpoint_every == 0 or done == last:
            save_checkpoint(
                checkpoint_dir,
                model,
                optimizer,
                scheduler,
                {**state, "seconds": state["seconds"] + time.perf_counter() - started},
            )
    seconds = state["seconds"] + time.perf_counter() - started

    output = (
        Path(config.output)
        if config.output is not None
        else read_settings().cache_dir / "training" / "adapter"
    )
    if state["step"] >= config.steps:
        output.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output, save_embedding_layers=False)
        training_log = {
            "synthetic_notice": SYNTHETIC_NOTICE,
            "base": base_name,
            "data_seed": config.data_seed,
            "seed": config.seed,
            "steps": config.steps,
            "batch_size": config.batch_size,
            "lr": config.lr,
            "warmup_steps": config.warmup_steps,
            "train_size": len(train_examples),
            "max_length": config.max_length,
            "lora": fingerprint["lora"],
            "trainable_params": n_params,
            "seconds": round(seconds, 1),
            "final_loss": state["losses"][-1] if state["losses"] else None,
            "final_loss_last_10": sum(state["losses"][-10:]) / max(1, len(state["losses"][-10:])),
            "val_losses": [[s, round(v, 5)] for s, v in state["val_losses"]],
            "losses": [round(x, 5) for x in state["losses"]],
        }
        if warm_started is not None:
            training_log["warm_start"] = warm_started
        (output / "training_log.json").write_text(json.dumps(training_log, indent=1) + "\n")
        (output / "README.md").write_text(model_card(training_log))
        log(f"Saved the adapter to {output} after {seconds / 60:.1f} min.")
    else:
        log(f"Stopped at step {state['step']}; continue with --resume (checkpoint in {checkpoint_dir}).")
    return TrainResult(
        output, state["step"], list(state["losses"]), list(state["val_losses"]), seconds, n_params
    )


def model_card(training_log: dict) -> str:
    """The adapter folder's README.md (replacing peft's template): what it is, how it was made."""
    lora = training_log["lora"]
    minutes = training_log["seconds"] / 60
    return f"""# smollm2-pricer: a demo LoRA for LoRA Lens

A LoRA adapter for SmolLM2-135M-Instruct (`{training_log["base"]}`) that reads a product description and
writes its price after the prompt's "Price is $". {training_log["synthetic_notice"]}

- LoRA: r={lora["r"]}, alpha={lora["alpha"]}, dropout={lora["dropout"]}, on {", ".join(lora["target_modules"])};
  {training_log["trainable_params"]:,} parameters, saved in fp32.
- Training: {training_log["steps"]} steps x batch {training_log["batch_size"]} on {training_log["train_size"]:,} items
  of the train split (catalog seed {training_log["data_seed"]}), AdamW lr {training_log["lr"]} with
  {training_log["warmup_steps"]} warmup steps and cosine decay, fp32 on CPU, {minutes:.0f} min; loss on the
  price and EOS only. Final loss (mean of the last 10 steps) {training_log["final_loss_last_10"]:.3f}.
- Made with `{training_log.get("command") or _default_command(training_log)}`;
  `training_log.json` holds every step's loss and the validation losses.{_warm_start_note(training_log)}
- Evaluated with `python -m utils.task.evaluate` on the test split, which training never sees.
"""


def _default_command(training_log: dict) -> str:
    return f"python -m utils.task.train_adapter --steps {training_log['steps']} --lr {training_log['lr']}"


def _warm_start_note(training_log: dict) -> str:
    earlier = training_log.get("warm_start")
    if not earlier:
        return ""
    return (
        f"\n- Warm-started (`--init-adapter`) from an earlier run of {earlier.get('steps', '?')} steps x batch "
        f"{earlier.get('batch_size', '?')} on {earlier.get('train_size', '?')} items at lr {earlier.get('lr', '?')} "
        f"({earlier.get('seconds', 0) / 60:.0f} min); the two runs together took "
        f"{(earlier.get('seconds', 0) + training_log['seconds']) / 60:.0f} min."
    )


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    defaults = TrainConfig()
    parser = argparse.ArgumentParser(
        prog="python -m utils.task.train_adapter", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--lr", type=float, default=defaults.lr)
    parser.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--data-seed", type=int, default=defaults.data_seed)
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where the adapter goes (default: CACHE/training/adapter); the shipped demo adapter is only "
        "written over with --replace-demo-adapter",
    )
    parser.add_argument(
        "--replace-demo-adapter",
        action="store_true",
        help=f"write the adapter to {DEMO_ADAPTER_DIR.relative_to(DEMO_ADAPTER_DIR.parents[1])}, replacing the shipped one",
    )
    parser.add_argument("--base", default=None, help="model folder (default: the embedded SmolLM2 cache)")
    parser.add_argument("--train-size", type=int, default=defaults.train_size)
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--checkpoint-dir", type=Path, default=None)
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every)
    parser.add_argument("--eval-every", type=int, default=defaults.eval_every)
    parser.add_argument("--log-every", type=int, default=defaults.log_every)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--series-dir",
        type=Path,
        default=None,
        help="also keep an fp16 adapter at every checkpoint, as DIR/checkpoint-STEP (transformers' Trainer "
        "layout, with trainer_state.json): a checkpoint series LoRA Lens compares (LORA_LENS_ADAPTERS)",
    )
    parser.add_argument("--stop-at", type=int, default=None, help="stop after this step (a partial run)")
    parser.add_argument(
        "--init-adapter", type=Path, default=None, help="warm-start from this adapter's weights"
    )
    args = parser.parse_args(argv)
    output = DEMO_ADAPTER_DIR if args.replace_demo_adapter else args.output
    if (
        output is not None
        and Path(output).resolve() == DEMO_ADAPTER_DIR.resolve()
        and not args.replace_demo_adapter
    ):
        parser.error("--output is the shipped demo adapter: add --replace-demo-adapter to write over it.")
    return replace(
        defaults,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        seed=args.seed,
        data_seed=args.data_seed,
        output=output,
        base=args.base,
        train_size=args.train_size,
        max_length=args.max_length,
        checkpoint_dir=args.checkpoint_dir,
        checkpoint_every=args.checkpoint_every,
        eval_every=args.eval_every,
        log_every=args.log_every,
        resume=args.resume,
        init_adapter=args.init_adapter,
        series_dir=args.series_dir,
        stop_at=args.stop_at,
    )


def main(argv: list[str] | None = None) -> int:
    try:
        train(parse_args(argv), log=lambda line: print(line, flush=True))
    except LoraLensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
