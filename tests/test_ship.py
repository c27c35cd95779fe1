"""Shipping a fine-tune: each merge route's weights against peft's own merge and brute force, the merged copies'
behaviour against plain models, and the exports (a scaled peft folder, a GGUF LoRA, a merged model, a reference
file) read back by peft, gguf's reader and transformers."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import pytest
import torch

from tests.test_adapters import _alone
from utils.analysis import merge_check
from utils.core.errors import InputError
from utils.core.seam import FINE_TUNED, GenerationSettings
from utils.runtime.engine import Engine
from utils.runtime.exports import _permute, save_merged, write_gguf_lora, write_scaled_adapter
from utils.runtime.loading import load_model_pair
from utils.runtime.weights import base_weight
from utils.task import ship

PROMPT = "How much does this cost to the nearest dollar?\n\nSteel water bottle, 750 ml\n\nPrice is $"


@pytest.fixture(scope="module")
def engine(tiny_settings):
    """A pair of its own: the merge check loads the base again and the tests merge peft copies beside it."""
    return Engine(load_model_pair(tiny_settings, has_gpu=False))


@pytest.fixture(scope="module")
def layers(engine):
    with engine.adapter_weights() as weights:
        return weights


def test_the_nf4_route_is_peft_merge_and_unload_weight_for_weight(engine, layers, tiny_settings):
    merged = load_model_pair(tiny_settings, has_gpu=False).model.merge_and_unload()
    for lw in layers:
        base = lw.base_weight()
        delta = (lw.b.float() @ lw.a.float()) * lw.scaling
        ours = merge_check.route_weight("nf4", base, delta, lw)
        theirs = base_weight(merged.get_submodule(lw.name.removeprefix("base_model.model.")))
        assert torch.equal(ours, theirs), lw.name


def test_the_dense_routes_and_the_lost_share_against_brute_force(engine, layers, tiny_adapter_dir):
    from safetensors.torch import load_file

    files = load_file(str(tiny_adapter_dir / "adapter_model.safetensors"))
    config = json.loads((tiny_adapter_dir / "adapter_config.json").read_text())
    scaling = config["lora_alpha"] / config["r"]
    modules = merge_check.survival(layers, ["bf16", "fp16", "fp32", "original"])
    for lw, module in zip(layers, modules, strict=True):
        key = lw.name.replace("base_model.model.", "base_model.model.", 1)
        a, b = files[key + ".lora_A.weight"].float(), files[key + ".lora_B.weight"].float()
        delta = scaling * (b @ a)
        base = lw.base_weight()
        fp32 = merge_check.route_weight("fp32", base, lw.b.float() @ lw.a.float() * lw.scaling, lw)
        assert torch.allclose(fp32, base + delta, atol=1e-6)
        brute_bf16 = ((base + delta).bfloat16().float() - base - delta).norm() / delta.norm()
        assert module.lost["bf16"] == pytest.approx(float(brute_bf16), rel=1e-4)
        assert module.lost["fp32"] < 1e-6  # float32's own rounding of W + ΔW
        original = lw.original_weight()
        assert module.lost["original"] == pytest.approx(
            float((original - base).norm() / delta.norm()), rel=1e-4
        )
        assert module.delta_fro == pytest.approx(float(delta.norm()), rel=1e-5)


def test_a_zero_adapter_survives_every_route(layers):
    zero = [replace(lw, b=torch.zeros_like(lw.b)) for lw in layers]
    for module in merge_check.survival(zero, ["nf4", "bf16", "fp32"]):
        assert module.lost == {"nf4": 0.0, "bf16": 0.0, "fp32": 0.0}


def test_a_merged_copy_behaves_as_a_plain_merged_model(engine, tiny_settings, tmp_path):
    """KL(unmerged || merged) along a text equals the same computed from plain models: peft's unmerged model,
    and the nf4 merge saved to disk and loaded by transformers alone; the fp32 copy matches the unmerged
    adapter, greedy answer included."""
    from transformers import AutoModelForCausalLM

    ids = engine.encode(PROMPT, 8)[0]
    text = [500, 600, 700, 800]
    keep = len(ids) - 1
    both = engine.merged_runs(FINE_TUNED, ["nf4", "fp32"], [ids + text], [keep], [PROMPT], 6)
    runs, exact = both["nf4"], both["fp32"]
    with engine.adapter_weights() as layers:  # the weights merged_runs read, as served
        saved = save_merged(engine.pair, layers, "nf4", tmp_path / "nf4")
    unmerged = load_model_pair(tiny_settings, has_gpu=False).model
    merged = AutoModelForCausalLM.from_pretrained(str(saved))
    for module in merged.modules():  # float32 as the engine computes, not bitsandbytes' bf16 CPU kernel
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    x = torch.tensor([ids + text])
    with torch.inference_mode():
        p = torch.log_softmax(unmerged(input_ids=x).logits[0, keep:-1].float(), -1)
        q = torch.log_softmax(merged(input_ids=x).logits[0, keep:-1].float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).clamp_min(0)
    assert runs.kl[0] == pytest.approx(kl.tolist(), abs=1e-5)
    assert max(runs.kl[0]) > 1e-4  # the nf4 route changes this model
    assert max(exact.kl[0]) < 1e-3
    tuned = engine.run_rows(PROMPT, engine.rows_for("fine_tuned"), GenerationSettings(max_new_tokens=6))
    assert exact.texts == [tuned.text(FINE_TUNED)]


def test_a_copy_that_would_not_fit_is_refused_with_the_figure(engine, monkeypatch):
    from utils.runtime import merging

    monkeypatch.setattr(merging, "free_bytes", lambda device: 10_000_000)
    runs = engine.merged_runs(FINE_TUNED, ["fp32", "original"], [], [], [PROMPT], 4)
    assert all(r.texts == [] for r in runs.values())
    assert (
        runs["fp32"].refused.startswith("a merged copy needs 0.0")
        and "0.01 GB is free" in runs["fp32"].refused
    )
    with pytest.raises(InputError, match="routes must be among"):
        engine.merged_runs(FINE_TUNED, ["int8"], [], [], [PROMPT], 4)


def test_the_check_names_the_safest_route(engine, tiny_settings):
    from utils.core.profiles import resolve_profile

    result = ship.run_check(engine, resolve_profile(tiny_settings), FINE_TUNED, PROMPT, n_items=3)
    check = result.check
    assert check.routes == ["nf4", "bf16", "fp16", "fp32", "original"]
    assert check.median_lost("fp32") < 1e-6 and check.median_lost("nf4") > check.median_lost("bf16")
    assert "Safest merge" in check.verdict() and "fp32" in check.verdict()
    assert set(result.metrics) == {"unmerged", *check.routes} and result.metrics["unmerged"]["count"] == 3
    assert (
        result.metrics["fp32"] == result.metrics["unmerged"]
    )  # a merge that keeps the update keeps the answers
    out = result.as_json()
    assert {r["route"] for r in out["routes"]} == set(check.routes) and len(out["modules"]) == len(
        check.modules
    )


@pytest.mark.parametrize("strength", [0.5, -1.0])
def test_the_scaled_export_reproduces_the_in_app_strength(
    engine, tiny_settings, tiny_adapter_dir, tmp_path, strength
):
    from tests.test_engine import _plain_greedy

    folder = write_scaled_adapter(tiny_adapter_dir, strength, tmp_path / "scaled")
    model, tokenizer = _alone(tiny_settings, folder, 1.0)  # plain peft, the copy at its own scale
    expected = _plain_greedy(model, tokenizer, PROMPT, 12)
    rows = engine.rows_for("fine_tuned", strength)
    got = engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=12)).panes[FINE_TUNED].token_ids
    assert got == expected


def test_the_gguf_lora_holds_what_llama_cpp_reads(tiny_adapter_dir, tiny_model_dir, tmp_path):
    import gguf
    from safetensors.torch import load_file

    config = json.loads((tiny_model_dir / "config.json").read_text())
    path = write_gguf_lora(tiny_adapter_dir, config, tmp_path / "lora.gguf")
    reader = gguf.GGUFReader(str(path))

    def text(key):
        field = reader.fields[key]
        return bytes(field.parts[field.data[0]]).decode()

    assert text("general.architecture") == "llama" and text("general.type") == "adapter"
    assert text("adapter.type") == "lora"
    alpha = json.loads((tiny_adapter_dir / "adapter_config.json").read_text())["lora_alpha"]
    assert float(reader.fields["adapter.lora.alpha"].parts[-1][0]) == alpha
    tensors = {t.name: t for t in reader.tensors}
    source = load_file(str(tiny_adapter_dir / "adapter_model.safetensors"))
    names = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output"}
    n_head, n_kv = config["num_attention_heads"], config["num_key_value_heads"]
    assert len(tensors) == len(source)
    for key, value in source.items():
        layer = int(key.split("layers.")[1].split(".")[0])
        module = key.split(".")[-3]
        part = "lora_a" if ".lora_A." in key else "lora_b"
        stored = tensors[f"blk.{layer}.{names[module]}.weight.{part}"]
        assert list(stored.shape) == list(reversed(value.shape))  # GGUF's ne order
        expected = value.float()
        if part == "lora_b" and module in ("q_proj", "k_proj"):
            expected = _permute(expected, n_head, n_head if module == "q_proj" else n_kv)
        assert torch.equal(torch.from_numpy(stored.data.copy()).reshape(value.shape), expected)


def test_the_merged_model_saves_as_a_plain_model(engine, layers, tmp_path):
    from transformers import AutoModelForCausalLM

    out = save_merged(engine.pair, layers, "bf16", tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.dtype == torch.bfloat16 and not hasattr(model.config, "quantization_config")
    lw = layers[0]
    saved = model.get_submodule(lw.name.removeprefix("base_model.model.")).weight.float()
    expected = (lw.base_weight() + (lw.b.float() @ lw.a.float()) * lw.scaling).bfloat16().float()
    assert torch.equal(saved, expected)


def test_the_reference_file_holds_greedy_tokens_and_their_logprobs(engine, tiny_settings, tmp_path):
    from utils.core.profiles import resolve_profile

    path = ship.reference_file(engine, resolve_profile(tiny_settings), 2, tmp_path / "reference.json")
    data = json.loads(path.read_text())
    assert len(data["items"]) == 2 and data["greedy"]
    item = data["items"][0]
    rows = engine.rows_for("both")
    result = engine.run_rows(item["prompt"], rows, GenerationSettings(max_new_tokens=ship.TEXT_TOKENS))
    for row in rows:
        ids = item[row.key]["token_ids"]
        assert ids == result.panes[row.key].token_ids
        scores = engine.score_rows([item["prompt_ids"] + ids], [row], len(item["prompt_ids"]) - 1)
        assert item[row.key]["logprobs"] == pytest.approx(scores.rows[0].logprobs, abs=1e-5)
        assert all(math.isfinite(v) for v in item[row.key]["logprobs"])


def test_exports_through_the_api(tiny_pair, tmp_path):
    from gradio_client.exceptions import AppError

    from tests.test_app_api import client_for, serve

    demo, url = serve(Engine(tiny_pair))
    try:
        client = client_for(url)
        checked = client.predict(adapter="fine_tuned", n_items=2, api_name="/merge_check")
        assert "Safest merge" in checked["verdict"] and len(checked["routes"]) == 5
        zipped = client.predict(kind="adapter", strength=0.5, api_name="/export")
        folder = tmp_path / "unzipped"
        shutil.unpack_archive(zipped["path"] if isinstance(zipped, dict) else zipped, folder)
        assert sorted(p.name for p in folder.iterdir()) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        for kind, message in [("onnx", "kind must be one of"), ("adapter", "strength must be")]:
            with pytest.raises(AppError, match=message):
                client.predict(kind=kind, strength=9 if kind == "adapter" else 1, api_name="/export")
        with pytest.raises(AppError, match="n_items must be between 0 and 50"):
            client.predict(adapter="fine_tuned", n_items=51, api_name="/merge_check")
        with pytest.raises(AppError, match="No adapter is called"):
            client.predict(adapter="/etc/passwd", n_items=1, api_name="/merge_check")
    finally:
        demo.close()
