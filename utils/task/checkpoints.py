"""Training checkpoints: one kept under --checkpoint-dir, holding adapter, optimizer, scheduler and RNG states
with the run's fingerprint, written to a staging folder and renamed, so `--resume` continues the same run step
for step or refuses a different one; warm starts from an earlier adapter's weights; and a checkpoint series
(--series-dir): an fp16 adapter per checkpoint in transformers' Trainer layout, for LoRA Lens to compare."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from utils.core.errors import InputError

CHECKPOINT_NAME = "last"  # the one checkpoint kept under --checkpoint-dir


def save_checkpoint(checkpoint_dir: Path, model, optimizer, scheduler, state: dict) -> None:
    import torch

    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    staging = checkpoint_dir / f".{CHECKPOINT_NAME}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    model.save_pretrained(staging / "adapter", save_embedding_layers=False)
    torch.save(
        {
            **state,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(),
        },
        staging / "state.pt",
    )
    target = checkpoint_dir / CHECKPOINT_NAME
    if target.exists():
        shutil.rmtree(target)
    os.replace(staging, target)


def load_checkpoint(checkpoint_dir: Path, model, optimizer, scheduler, fingerprint: dict) -> dict:
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    target = checkpoint_dir / CHECKPOINT_NAME
    if not (target / "state.pt").is_file():
        raise InputError(f"No checkpoint to resume in {checkpoint_dir}; run without --resume first.")
    state = torch.load(target / "state.pt", weights_only=False)
    if state["fingerprint"] != fingerprint:
        changed = sorted(k for k in fingerprint if state["fingerprint"].get(k) != fingerprint[k])
        raise InputError(
            f"The checkpoint in {checkpoint_dir} was made with other settings ({', '.join(changed)}); "
            "resume with the same options, or start afresh without --resume."
        )
    set_peft_model_state_dict(model, load_file(str(target / "adapter" / "adapter_model.safetensors")))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state


def warm_start(model, adapter_dir: Path) -> dict:
    """Load an earlier adapter's LoRA weights into `model`; returns what its training_log says about it."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = Path(adapter_dir) / "adapter_model.safetensors"
    if not weights.is_file():
        raise InputError(f"No adapter_model.safetensors in {adapter_dir} to warm-start from.")
    result = set_peft_model_state_dict(model, load_file(str(weights)))
    if getattr(result, "unexpected_keys", None):
        raise InputError(f"The adapter in {adapter_dir} does not fit this model and LoRA settings.")
    log_file = Path(adapter_dir) / "training_log.json"
    earlier = json.loads(log_file.read_text()) if log_file.is_file() else {}
    keep = ("steps", "batch_size", "lr", "seed", "train_size", "seconds", "final_loss_last_10", "val_losses")
    return {"from": str(adapter_dir), **{k: earlier[k] for k in keep if k in earlier}}


def save_series_checkpoint(series_dir: Path, model, step: int, state: dict, config, base_name: str) -> Path:
    """`series_dir/checkpoint-STEP`: the adapter as it is at this step, in fp16, with a `trainer_state.json` as
    transformers' Trainer writes it (global_step, log_history), so any checkpoint folder reads the same way.

    fp16 halves the file; a LoRA weight's values (|w| < 1, no outliers) keep 11 significant bits.
    """
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    target = Path(series_dir) / f"checkpoint-{step}"
    target.mkdir(parents=True, exist_ok=True)
    model.peft_config["default"].save_pretrained(str(target))
    weights = {
        k: v.detach().to(torch.float16).contiguous() for k, v in get_peft_model_state_dict(model).items()
    }
    save_file(weights, str(target / "adapter_model.safetensors"), metadata={"format": "pt"})
    os.chmod(target / "adapter_model.safetensors", 0o644)  # save_file writes 0600; the series is shared
    losses = state["losses"]
    log_history = [{"step": i + 1, "loss": round(loss, 5)} for i, loss in enumerate(losses)]
    log_history += [{"step": s, "eval_loss": round(v, 5)} for s, v in state["val_losses"]]
    trainer_state = {
        "global_step": step,
        "max_steps": config.steps,
        "train_batch_size": config.batch_size,
        "log_history": sorted(log_history, key=lambda entry: entry["step"]),
        "lora_lens": {
            "base": base_name,
            "lr": config.lr,
            "seed": config.seed,
            "train_size": config.train_size,
            "loss_last_10": round(sum(losses[-10:]) / max(1, len(losses[-10:])), 5),
            "eval_loss": round(state["val_losses"][-1][1], 5) if state["val_losses"] else None,
            "stored": "fp16",
        },
    }
    (target / "trainer_state.json").write_text(json.dumps(trainer_state, indent=1) + "\n")
    return target
