"""Adapter anatomy: norms and singular values against a brute-force SVD of the materialized ΔW, the base norm
against the 4-bit layer's own output, rank-1 adapters, ablation against base and fine-tune, and the API."""

import pytest
import torch

from ui.anatomy import AnatomyTab
from ui.lens import Lens
from utils.analysis import anatomy as anat
from utils.core.errors import InputError
from utils.core.seam import GenerationSettings, Row
from utils.runtime.engine import Engine
from utils.runtime.router import StrengthRouter
from utils.runtime.weights import lora_weights

PROMPT = "How much does this cost to the nearest dollar?\n\nSteel water bottle, 750 ml\n\nPrice is $"


@pytest.fixture(scope="module")
def tiny_tab(tiny_pair):
    return AnatomyTab(Lens(Engine(tiny_pair)))


def _brute_force(layer, scaling):
    a = layer.lora_A["default"].weight.double()
    b = layer.lora_B["default"].weight.double()
    delta = scaling * (b @ a)
    return delta, torch.linalg.svdvals(delta)


def _layer_output_rel() -> float:
    """How closely a 4-bit layer's own output can match the de-quantized weight: float rounding, or bf16's
    (2^-8) where bitsandbytes' AVX512-BF16 kernel computes the layer (bf16 inputs, scales and outputs)."""
    from utils.runtime.nf4_kernel import bitsandbytes_has_own_kernel, requested_mode

    return 2.0**-8 if bitsandbytes_has_own_kernel() and requested_mode() != "fused" else 1e-5


def test_norms_and_singular_values_equal_brute_force(tiny_tab):
    data = tiny_tab.anatomy_data()
    router = tiny_tab.lens.backend.router
    assert len(data.modules) == len(router.layers) == 8
    for m, layer, scaling in zip(data.modules, router.layers, router.scalings, strict=True):
        delta, svals = _brute_force(layer, scaling)
        assert m.delta_fro == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-5)
        r = len(m.singular_values)
        assert m.singular_values == pytest.approx(svals[:r].tolist(), rel=1e-5, abs=1e-9)
        # the 4-bit base weight, read independently: the layer's own output for the identity matrix is W^T
        with torch.inference_mode():
            identity = torch.eye(layer.base_layer.in_features)
            w_t = layer.base_layer(identity).double()
        assert m.base_fro == pytest.approx(float(torch.linalg.matrix_norm(w_t)), rel=_layer_output_rel())
        assert m.relative == pytest.approx(m.delta_fro / m.base_fro)
        assert m.stable_rank == pytest.approx(float((svals**2).sum() / svals[0] ** 2), rel=1e-5)
    assert (data.modules[0].layer, data.modules[0].module) == (0, "q_proj")


def test_base_weight_reads_bitsandbytes_cpu_packed_layout():
    """After bitsandbytes repacks a weight for its AVX512-BF16 kernel, the anatomy still reads W: the same
    values as before repacking (up to the bf16 scales) and as the layer's own output on the identity."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    from utils.runtime.nf4_kernel import bitsandbytes_has_own_kernel
    from utils.runtime.weights import base_weight

    if not bitsandbytes_has_own_kernel():
        pytest.skip("bitsandbytes repacks CPU weights only where it has its AVX512-BF16 kernel")
    weight = torch.randn(96, 256, generator=torch.Generator().manual_seed(3))
    layer = bnb.nn.Linear4bit(256, 96, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu").eval()
    before = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    with torch.inference_mode():
        w_t = layer(torch.eye(256))
    assert layer.weight.quant_state.packing_format_for_cpu
    after = base_weight(layer)
    scale = float(before.abs().max())
    torch.testing.assert_close(after, before, rtol=0, atol=2.0**-8 * scale)
    torch.testing.assert_close(after, w_t.T.float(), rtol=0, atol=2.0**-7 * scale)


def test_rank_one_update_has_effective_rank_one(tiny_settings):
    """A LoRA whose A has identical rows makes B A rank 1, whatever B is."""
    from peft import LoraConfig, get_peft_model

    from utils.core.profiles import resolve_profile
    from utils.runtime.loading import load_base

    base, _ = load_base(resolve_profile(tiny_settings), tiny_settings, device="cpu")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.randn(1, a.shape[1], generator=generator).expand_as(a))
                b.copy_(torch.randn(b.shape, generator=generator))
    data = anat.compute_anatomy(lora_weights(StrengthRouter(model)), r=4, alpha=8)
    assert [m.effective_rank_90 for m in data.modules] == [1] * 4
    assert all(m.stable_rank == pytest.approx(1.0) for m in data.modules)
    assert all(m.singular_values[1] < 1e-9 * m.singular_values[0] for m in data.modules)


def test_rank_helpers_by_hand():
    assert anat.effective_rank([3, 1, 0]) == 1  # 9 of 10 = 90%
    assert anat.effective_rank([1, 1, 1]) == 3  # 2/3 < 90%
    assert anat.effective_rank([0, 0]) == 0
    assert anat.stable_rank([2, 2]) == 2.0
    assert anat.layer_blocks(12, 5) == [(0, 4), (5, 9), (10, 11)]
    assert anat.parse_module_name("base_model.model.model.layers.3.self_attn.q_proj") == (3, "q_proj")


@pytest.mark.parametrize(
    "text,message",
    [
        ("", "layers must be text"),
        ("0-40", "Layer 40 does not exist"),
        ("4-2", "runs backwards"),
        ("a-b", "is not a layer or a range"),
        ("1-2-3", "is not a layer or a range"),
    ],
)
def test_bad_layer_ranges(text, message):
    with pytest.raises(InputError, match=message):
        anat.parse_layers(text, 30)


def test_all_layers_is_every_layer_of_the_loaded_model():
    assert anat.parse_layers("all", 3) == [0, 1, 2] and anat.parse_layers(" ALL ", 1) == [0]
    with pytest.raises(InputError, match="layers 0 to 1"):
        anat.parse_layers("x", 2)


def test_layer_ranges_and_modules():
    assert anat.parse_layers("0-2, 5 7", 30) == [0, 1, 2, 5, 7]
    assert anat.parse_modules("q_proj, v_proj q_proj", ["q_proj", "k_proj", "v_proj"]) == ["q_proj", "v_proj"]
    with pytest.raises(InputError, match="Unknown module"):
        anat.parse_modules("gate_proj", ["q_proj"])


def test_ablating_everything_is_the_base_and_nothing_the_fine_tune(tiny_tab):
    engine = tiny_tab.lens.backend
    names = engine.router.names
    rows = [
        Row("base", "base", 0.0),
        Row("tuned", "tuned", 1.0),
        Row(
            "all_off",
            "all off",
            anat.ablation_strengths(names, [0, 1], ["q_proj", "k_proj", "v_proj", "o_proj"]),
        ),
        Row("none_off", "none off", anat.ablation_strengths(names, [], ["q_proj"])),
        Row("some_off", "layer 1 v off", anat.ablation_strengths(names, [1], ["v_proj"])),
    ]
    assert rows[4].strength == (1.0,) * 6 + (0.0, 1.0)  # router order: layer 1's v_proj is the 7th
    result = engine.run_rows(PROMPT, rows, GenerationSettings(max_new_tokens=16))
    ids = {row.key: result.panes[row.key].token_ids for row in rows}
    assert ids["all_off"] == ids["base"] and ids["none_off"] == ids["tuned"]
    assert ids["base"] != ids["tuned"]


def test_anatomy_and_ablate_endpoints(tiny_pair):
    from gradio_client.exceptions import AppError

    from tests.test_app_api import client_for, plain_greedy, serve

    demo, url = serve(Engine(tiny_pair))
    try:
        client = client_for(url)
        out = client.predict(api_name="/anatomy")
        assert out["r"] == tiny_tab_r(tiny_pair)
        assert len(out["modules"]) == 8 and set(out["modules"][0]) == {
            "layer", "module", "delta_fro", "base_fro", "relative", "singular_values", "effective_rank_90",
            "stable_rank",
        }  # fmt: skip
        ablation = client.predict(prompt=PROMPT, layers="0-1", max_new_tokens=12, api_name="/ablate")
        assert ablation["base"] == ablation["ablated"] == plain_greedy(tiny_pair, PROMPT, 12, adapter=False)
        assert ablation["full"] == plain_greedy(tiny_pair, PROMPT, 12, adapter=True)
        assert set(ablation["prices"]) == {"base", "full", "ablated"}  # a pricer prompt
        everything = client.predict(prompt=PROMPT, max_new_tokens=12, api_name="/ablate")  # layers="all"
        assert everything["ablated"] == everything["base"]  # every layer of the loaded model switched off
        with pytest.raises(AppError, match="Layer 29 does not exist: this model has layers 0 to 1"):
            client.predict(prompt=PROMPT, layers="0-29", api_name="/ablate")
        with pytest.raises(AppError, match="Unknown module"):
            client.predict(prompt=PROMPT, layers="0", modules="up_proj", api_name="/ablate")
    finally:
        demo.close()


def tiny_tab_r(pair) -> int:
    return int(pair.model.peft_config["default"].r)


def test_block_sweep_ranks_blocks(tiny_tab):
    ranking = tiny_tab.block_sweep(PROMPT, ["q_proj", "k_proj", "v_proj", "o_proj"])
    assert [row["layers switched off"] for row in ranking] == ["0-1"]  # 2 layers: one block
    assert (
        ranking[0]["drop from the full adapter"] > 0
    )  # removing the whole adapter makes its text less likely


@pytest.mark.slow
def test_smollm2_demo_adapter_anatomy_is_pinned(smollm2_pair):
    """The shipped adapter, computed independently here (materialized ΔW, full SVD) and pinned."""
    tab = AnatomyTab(Lens(Engine(smollm2_pair)))
    if not tab.lens.has_adapter:
        pytest.skip("the demo adapter did not load")
    data = tab.anatomy_data()
    assert (data.r, data.alpha, len(data.modules)) == (32, 64.0, 120)
    ranks = []
    for m, layer, scaling in zip(
        data.modules, tab.lens.backend.router.layers, tab.lens.backend.router.scalings, strict=True
    ):
        delta, svals = _brute_force(layer, scaling)
        assert m.singular_values == pytest.approx(svals[:32].tolist(), rel=1e-5, abs=1e-9)
        assert m.delta_fro == pytest.approx(float(torch.linalg.matrix_norm(delta)), rel=1e-5)
        ranks.append(anat.effective_rank(svals[:32].tolist()))
    assert [m.effective_rank_90 for m in data.modules] == ranks
    assert sum(ranks) == PINNED_RANK_SUM
    assert max(data.modules, key=lambda m: m.relative).name.endswith(PINNED_LARGEST)


PINNED_RANK_SUM = 495  # 4.1 dimensions of 32 on average over 120 modules
PINNED_LARGEST = "layers.0.self_attn.v_proj"


def test_the_controls_never_compute_the_anatomy_only_the_opening_does(tiny_pair):
    """Opened from the Architecture tab, the module selector changes before the tab's opening fills it; its
    handler (outside the model slot) must not start a second computation, a second GPU call on ZeroGPU."""
    tab = AnatomyTab(Lens(Engine(tiny_pair)))
    calls = []
    compute = tab.lens.anatomy
    tab.lens.anatomy = lambda *names: calls.append(1) or compute(*names)
    assert tab.ui_module("0:q_proj") is not None and calls == []  # gr.skip(): nothing computed
    assert tab.ui_heatmap("absolute") is not None and calls == []
    summary, heatmap, spectrum, table = tab.ui_open("absolute", "0:q_proj")
    assert calls == [1] and "dimensions on average" in summary and spectrum is not None
    tab.ui_module("1:v_proj")
    tab.ui_open("relative", "1:v_proj")
    assert calls == [1]  # cached from then on
