"""Across adapters: the cosine and subspace overlaps from r x r products equal a brute-force computation on the
materialised ΔW; the token lens over panes equals plain forward passes; panes are checked with clear messages."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from utils.analysis.pane_lens import lens_json, score_panes
from utils.analysis.similarity import growth, module_similarity, similarity
from utils.core.errors import InputError
from utils.core.panes import MAX_PANES, Pane, cross_panes, pane_rows, parse_panes
from utils.core.seam import GenerationSettings, LoraWeights, Use
from utils.runtime.engine import Engine
from utils.runtime.loading import load_model_pair

PROMPT = "How much does this cost to the nearest dollar?\n\nSteel water bottle, 750 ml\n\nPrice is $"


def _layer(name, r, out, inp, scaling, seed):
    g = torch.Generator().manual_seed(seed)
    return LoraWeights(
        name, torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), scaling, lambda: None
    )


def _brute(a: LoraWeights, b: LoraWeights, k: int):
    da = a.scaling * (a.b.double() @ a.a.double())
    db = b.scaling * (b.b.double() @ b.a.double())
    cosine = float((da * db).sum() / (da.norm() * db.norm()))
    ua, _, vha = torch.linalg.svd(da)
    ub, _, vhb = torch.linalg.svd(db)
    out = float((ua[:, :k].T @ ub[:, :k]).square().sum()) / k
    inp = float((vha[:k] @ vhb[:k].T).square().sum()) / k
    return cosine, out, inp, float(da.norm()), float(db.norm())


@pytest.mark.parametrize("ranks,top_k", [((8, 4), 8), ((16, 16), 5), ((4, 12), 3)])
def test_cosine_and_overlaps_equal_brute_force_on_the_full_matrices(ranks, top_k):
    a = _layer("model.layers.3.self_attn.q_proj", ranks[0], 96, 64, 2.0, 1)
    b = _layer("model.layers.3.self_attn.q_proj", ranks[1], 96, 64, -0.5, 2)
    got = module_similarity(a, b, top_k)
    k = min(top_k, *ranks)
    cosine, out, inp, norm_a, norm_b = _brute(a, b, k)
    assert got.k == k and (got.layer, got.module) == (3, "q_proj")
    assert got.cosine == pytest.approx(cosine, abs=1e-9)
    assert got.overlap_out == pytest.approx(out, abs=1e-9)
    assert got.overlap_in == pytest.approx(inp, abs=1e-9)
    assert (got.norm_a, got.norm_b) == (pytest.approx(norm_a, rel=1e-9), pytest.approx(norm_b, rel=1e-9))


def test_an_adapter_is_identical_to_itself_and_opposite_to_its_negation():
    a = _layer("model.layers.0.self_attn.v_proj", 8, 32, 64, 1.0, 3)
    same = module_similarity(a, a)
    assert same.cosine == pytest.approx(1.0) and same.overlap_out == pytest.approx(1.0)
    negated = module_similarity(a, replace(a, scaling=-3.0))
    assert negated.cosine == pytest.approx(-1.0) and negated.overlap_in == pytest.approx(1.0)


def test_layers_only_one_adapter_adapts_are_listed_apart():
    shared = _layer("model.layers.0.self_attn.q_proj", 4, 32, 32, 1.0, 1)
    only = _layer("model.layers.0.mlp.up_proj", 4, 64, 32, 1.0, 2)
    result = similarity("a", [shared, only], "b", [shared])
    assert [m.module for m in result.modules] == ["q_proj"] and result.only_a == [only.name]
    assert result.overall_cosine() == pytest.approx(1.0)
    with pytest.raises(InputError, match="no layer in common"):
        similarity("a", [only], "b", [shared])


def test_growth_is_ordered_by_step_per_module_type():
    from utils.analysis.anatomy import compute_anatomy

    series = []
    for step, scale in ((400, 3.0), (100, 1.0)):
        layers = [
            replace(
                _layer(f"model.layers.{i}.self_attn.{m}", 4, 16, 16, scale, i),
                base_weight=lambda: torch.eye(16),
            )
            for i in range(2)
            for m in ("q_proj", "v_proj")
        ]
        series.append((f"step-{step}", step, compute_anatomy(layers, 4, 8)))
    points = growth(series)
    assert [(p.step, p.module) for p in points] == [
        (100, "q_proj"),
        (100, "v_proj"),
        (400, "q_proj"),
        (400, "v_proj"),
    ]
    assert points[2].delta_fro == pytest.approx(3 * points[0].delta_fro)


# ---------------------------------------------------------------------------------------------------
# On the tiny Llama with three adapters (tests/test_adapters.py builds them)


@pytest.fixture(scope="module")
def engine(tiny_settings, extra_adapter_dirs):
    extras = tuple((name, str(path)) for name, path in extra_adapter_dirs.items())
    settings = replace(tiny_settings, adapters=extras, compute_dtype="float32")
    return Engine(load_model_pair(settings, has_gpu=False)), settings, extra_adapter_dirs


def test_the_loaded_adapters_compare_as_their_materialised_updates(engine):
    backend, _, _ = engine
    with backend.adapter_weights("second") as second:
        pass
    with backend.adapter_weights("third") as third:
        pass
    result = similarity("second", second, "third", third)
    assert [m.module for m in result.modules] == ["q_proj", "q_proj"]  # both adapt q_proj only in common
    assert len(result.only_a) == 4 and len(result.only_b) == 4  # v, up and o, down in 2 layers
    for m, a, b in zip(
        result.modules,
        [x for x in second if "q_proj" in x.name],
        [x for x in third if "q_proj" in x.name],
        strict=True,
    ):
        cosine, out, _, _, _ = _brute(a, b, m.k)
        assert m.cosine == pytest.approx(cosine, abs=1e-9) and m.overlap_out == pytest.approx(out, abs=1e-9)


def test_panes_are_checked_with_clear_messages(engine):
    backend, _, _ = engine
    primary = backend.adapter_names[0]
    assert parse_panes([{"adapter": None}, {"adapter": "fine_tuned", "strength": 0.5}], backend) == [
        Pane(None, 0.0),
        Pane(primary, 0.5),
    ]
    assert parse_panes('[{"adapter": "second"}]', backend) == [Pane("second", 1.0)]
    for panes, message in [
        ([], "at least one pane"),
        ([{"adapter": "nope"}], "No adapter is called 'nope'"),
        ([{"adapter": "second"}] * 2, "Pane 2 repeats pane 1"),
        ([{"adapter": "second", "strength": s} for s in range(MAX_PANES + 1)], "At most 6 panes"),
        ([{"adapter": "second", "strength": 9}], "between -2.0 and 3.0"),
        ([{"adapter": "second", "colour": 1}], "Pane 1 must be"),
        ("not json", "panes must be a list"),
        ([{"adapter": 5}], "must be a name"),
    ]:
        with pytest.raises(InputError, match=message):
            parse_panes(panes, backend)
    assert cross_panes("base, second, third", [1.0], backend) == [
        Pane(None, 0.0),
        Pane("second"),
        Pane("third"),
    ]
    with pytest.raises(InputError, match="8 panes"):
        cross_panes(["second", "third"], [0.5, 1, 1.5, 2], backend)


def test_the_lens_over_panes_equals_plain_forward_passes(engine):
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer

    from utils.core.profiles import resolve_profile
    from utils.runtime.loading import load_base

    backend, settings, dirs = engine
    panes = [Pane(None, 0.0), Pane("second", 1.0), Pane("third", 0.5)]
    rows = pane_rows(panes)
    result = backend.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=8))
    prompt_ids = backend.encode(PROMPT, 8)[0]
    texts = {row.key: list(result.panes[row.key].token_ids) for row in rows}
    models = {row.key: Use(row.adapter, row.strength) for row in rows}
    lens = score_panes(backend, prompt_ids, texts, models, {r.key: r.label for r in rows}, ("p2", "p1"))
    for row, pane in zip(rows, panes, strict=True):
        model, _ = load_base(resolve_profile(settings), settings, device="cpu")
        if pane.adapter:
            model = PeftModel.from_pretrained(model, str(dirs[pane.adapter])).eval()
            for module in model.modules():
                if isinstance(module, LoraLayer):
                    module.set_scale("default", pane.strength)
        for text, ids in texts.items():
            with torch.inference_mode():
                logits = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float()
            logp = torch.log_softmax(logits[len(prompt_ids) - 1 : -1], dim=-1)
            expected = logp.gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
            assert lens.logprobs[(text, row.key)] == pytest.approx(expected.tolist(), abs=1e-4)
    assert lens.kl_vs_base[("p1", "p0")] == [0.0] * len(texts["p1"])
    assert all(v >= 0 for v in lens.kl_vs_base[("p1", "p2")])
    shape = lens_json(lens)
    assert [p["label"] for p in shape["panes"]] == ["Base", "second", "third (s = 0.5)"]
    assert shape["pair"]["a"] == "third (s = 0.5)" and shape["pair"]["b"] == "second"
    assert math.isclose(
        shape["panes"][1]["logprob_under"]["Base"], sum(lens.logprobs[("p1", "p0")]), rel_tol=1e-12
    )
