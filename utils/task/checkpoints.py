"""Training checkpoints: one kept under --checkpoint-dir, holding adapter, optimizer, scheduler and RNG states
with the run's fingerprint, written to a staging folder and renamed, so `--resume` continues the same run step
for step or refuses a different one; and warm starts from an earlier adapter's weights."""

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
