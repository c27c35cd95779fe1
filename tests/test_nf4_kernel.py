"""The fused 4-bit CPU kernel: equal to bitsandbytes' stock computation (de-quantize, then matmul) to float
rounding, for NF4 and FP4, nested and plain scales, 1 to 16 rows, with a bias; the stock path for what it does
not cover; a clear status when it cannot be built; bitsandbytes' own AVX512-BF16 kernel left in place unless
asked; and token-exact greedy output on the embedded default (with the kernel made to serve it on every CPU)."""

import pytest
import torch

from utils.runtime import nf4_kernel

pytestmark = pytest.mark.skipif(
    not nf4_kernel.cpu_has_avx2_fma(), reason="the fused kernel needs AVX2 and FMA"
)


@pytest.fixture(scope="module")
def kernel(cache_dir):
    status = nf4_kernel.enable(cache_dir)
    assert nf4_kernel.STATE.registered, status
    return nf4_kernel


def _quantized(n, k, quant_type, nested, seed=0):
    import bitsandbytes.functional as F

    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(seed))
    packed, state = F.quantize_4bit(weight, blocksize=64, quant_type=quant_type, compress_statistics=nested)
    args = (packed, state.shape, state.state2.absmax if nested else state.absmax, state.blocksize, quant_type)
    kwargs = (
        dict(absmax_8bit=state.absmax, absmax_code=state.state2.code, absmax_offset=state.offset)
        if nested
        else {}
    )
    return args, kwargs


def _both(kernel, a, args, kwargs):
    """(stock, fused) results of bitsandbytes::gemm_4bit for the same inputs."""
    kernel.STATE.enabled = False
    try:
        stock = torch.ops.bitsandbytes.gemm_4bit.default(a, *args, **kwargs)
    finally:
        kernel.STATE.enabled = True
    return stock, torch.ops.bitsandbytes.gemm_4bit.default(a, *args, **kwargs)


@pytest.fixture(params=[256, 512], ids=["avx2", "avx512"])
def vector_width(request, kernel):
    """Each of the kernel's loops: AVX2, and AVX-512 where the CPU runs it."""
    if request.param == 512 and not nf4_kernel.runs_avx512():
        pytest.skip("this CPU (or torch's setting) does not run AVX-512")
    previous = kernel.STATE.vector_bits
    torch.ops.lora_lens.set_vector_width(request.param)
    yield request.param
    torch.ops.lora_lens.set_vector_width(previous)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 5, 8, 9, 16])
def test_fused_equals_stock(kernel, vector_width, quant_type, nested, rows):
    args, kwargs = _quantized(1536, 576, quant_type, nested)
    a = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
    stock, fused = _both(kernel, a, args, kwargs)
    assert fused.shape == stock.shape == (rows, 1536)
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5 * float(stock.abs().max()))


def test_batch_shape_and_bias(kernel):
    args, kwargs = _quantized(192, 64, "nf4", True)
    a = torch.randn(2, 3, 64)  # [batch, tokens, features], as a decoder layer passes it
    bias = torch.randn(192)
    stock, fused = _both(kernel, a, args, kwargs | {"bias": bias})
    assert fused.shape == (2, 3, 192)
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-4)


def test_what_it_does_not_cover_runs_the_stock_path(kernel, monkeypatch):
    """bf16 inputs, and a block size the kernel does not divide, go to bitsandbytes' own computation."""
    calls = []
    monkeypatch.setattr(torch.ops.lora_lens, "nf4_gemm", lambda *a: calls.append(a), raising=False)
    args, kwargs = _quantized(128, 128, "nf4", True)
    stock, other = _both(kernel, torch.randn(2, 128, dtype=torch.bfloat16), args, kwargs)
    assert torch.equal(stock, other)
    assert calls == []


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("rows", [17, 80, 300])
def test_many_rows_take_the_tiled_path_and_equal_stock(kernel, vector_width, nested, rows):
    """A prefill's rows: tiles of 64 outputs de-quantized (the last one short here: 1540 = 24 x 64 + 4) and
    multiplied by BLAS, equal to de-quantize-then-matmul to float rounding; with a bias, and with the rows of a
    [batch, tokens, features] input."""
    args, kwargs = _quantized(1540, 576, "nf4", nested, seed=rows)
    a = torch.randn(rows, 576, generator=torch.Generator().manual_seed(rows))
    bias = torch.randn(1540, generator=torch.Generator().manual_seed(3))
    stock, fused = _both(kernel, a, args, kwargs | {"bias": bias})
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5 * float(stock.abs().max()))
    stock, fused = _both(kernel, a.reshape(1, rows, 576), args, kwargs)
    assert fused.shape == (1, rows, 1540)
    torch.testing.assert_close(fused, stock, rtol=1e-5, atol=1e-5 * float(stock.abs().max()))


def test_many_rows_with_a_lora_update_equal_peft_arithmetic(kernel, vector_width):
    args, kwargs = _quantized(192, 576, "nf4", True, seed=9)
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(2, 20, 576, generator=generator)
    lora_a = torch.randn(32, 576, generator=generator) * 0.05
    lora_b = torch.randn(192, 32, generator=generator) * 0.05
    factors = torch.tensor([0.0, 2.0])
    spans = torch.tensor([[0, 32], [0, 32]], dtype=torch.long)
    packed, (n, k), absmax, blocksize, quant_type = args
    kernel_args = (packed, n, k, absmax, blocksize, nf4_kernel._code(quant_type)) + tuple(
        kwargs.get(name) for name in ("absmax_8bit", "absmax_code", "absmax_offset")
    )
    base = torch.ops.lora_lens.nf4_gemm(x, *kernel_args, None)
    got = torch.ops.lora_lens.nf4_lora_gemm(
        x, *kernel_args, None, lora_a, lora_b.T.contiguous(), factors, spans
    )
    expected = base.clone()
    expected[1] += torch.nn.functional.linear(torch.nn.functional.linear(x[1], lora_a), lora_b) * 2.0
    assert torch.equal(got[0], base[0])
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))


def test_direct_forward_equals_the_layers_own_forward(kernel, monkeypatch):
    """A 4-bit layer calling the kernel itself gives bitsandbytes' stock result for decode rows, and leaves
    prefills, bf16 inputs and autograd to the layer's own forward."""
    import bitsandbytes as bnb

    weight = torch.randn(192, 128, generator=torch.Generator().manual_seed(5))
    layer = bnb.nn.Linear4bit(128, 192, bias=True, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", compress_statistics=True)
    layer = layer.to("cpu").eval()
    layer.support_avx512bf16_for_cpu = False  # the stock layout, as prepare() keeps it
    x = torch.randn(2, 1, 128, generator=torch.Generator().manual_seed(6))
    kernel.STATE.enabled = False
    try:
        with torch.inference_mode():
            stock = layer(x)
    finally:
        kernel.STATE.enabled = True
    nf4_kernel.direct_forward(layer)
    calls = []
    real = torch.ops.lora_lens.nf4_gemm
    monkeypatch.setattr(
        torch.ops.lora_lens, "nf4_gemm", lambda *a: calls.append(1) or real(*a), raising=False
    )
    with torch.inference_mode():
        direct = layer(x)
        layer(torch.randn(1, nf4_kernel.MAX_FUSED_ROWS + 1, 128))  # a prefill: through gemm_4bit, tiled
    assert len(calls) == 2
    torch.testing.assert_close(direct, stock, rtol=1e-5, atol=1e-5 * float(stock.abs().max()))


@pytest.mark.parametrize("nested", [True, False])
@pytest.mark.parametrize("shape", [(2, 1, 576), (5, 1, 576), (2, 3, 576), (4, 576)])
def test_lora_update_in_the_kernel_equals_peft_arithmetic(kernel, vector_width, nested, shape):
    """base + (B_k (A_k x)) * factor[batch row], as peft computes it for the row's own adapter k alone (two
    matmuls, a multiply, an add), with the adapter (a block of the stacked ranks: r = 32 and r = 8 here) and
    the factor set per batch row; a zero factor adds exactly nothing."""
    args, kwargs = _quantized(192, 576, "nf4", nested, seed=7)
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(*shape, generator=generator)
    lora_a = torch.randn(40, 576, generator=generator) * 0.05  # adapter 0: rows 0-31, adapter 1: rows 32-39
    lora_b = torch.randn(192, 40, generator=generator) * 0.05
    factors = torch.randn(shape[0], generator=generator)
    factors[1] = 0.0
    blocks = [(0, 32), (32, 8)]
    spans = torch.tensor([blocks[row % 2] for row in range(shape[0])], dtype=torch.long)
    packed, (n, k), absmax, blocksize, quant_type = args
    kernel_args = (packed, n, k, absmax, blocksize, nf4_kernel._code(quant_type)) + tuple(
        kwargs.get(name) for name in ("absmax_8bit", "absmax_code", "absmax_offset")
    )
    base = torch.ops.lora_lens.nf4_gemm(x, *kernel_args, None)
    expected = base.clone()
    for row in range(shape[0]):
        start, rank = blocks[row % 2]
        a, b = lora_a[start : start + rank], lora_b[:, start : start + rank].contiguous()
        update = torch.nn.functional.linear(torch.nn.functional.linear(x[row], a), b) * factors[row]
        expected[row] += update
    got = torch.ops.lora_lens.nf4_lora_gemm(
        x, *kernel_args, None, lora_a, lora_b.T.contiguous(), factors, spans
    )
    assert got.shape == expected.shape == (*shape[:-1], 192)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert torch.equal(got[1], base[1])
    outside = torch.tensor([[36, 8]] * shape[0], dtype=torch.long)
    with pytest.raises(RuntimeError, match="outside the stacked rank"):
        torch.ops.lora_lens.nf4_lora_gemm(
            x, *kernel_args, None, lora_a, lora_b.T.contiguous(), factors, outside
        )


@pytest.mark.parametrize("rows", [2, 40], ids=["decode step", "tiled"])
def test_the_lora_update_is_the_same_bits_on_one_thread_and_two(kernel, rows):
    """The threads share the A x dots before the updates read them: the split changes nothing, and it is what
    peft computes."""
    from utils.runtime.threads import in_own_thread

    args, kwargs = _quantized(576, 576, "nf4", True, seed=9)
    generator = torch.Generator().manual_seed(10)
    x = torch.randn(rows, 576, generator=generator)
    lora_a = torch.randn(32, 576, generator=generator) * 0.05
    lora_b = torch.randn(576, 32, generator=generator) * 0.05
    factors = torch.ones(rows)
    factors[0] = 0.0
    spans = torch.tensor([[0, 32]] * rows, dtype=torch.long)
    packed, (n, k), absmax, blocksize, quant_type = args
    kernel_args = (packed, n, k, absmax, blocksize, nf4_kernel._code(quant_type)) + tuple(
        kwargs.get(name) for name in ("absmax_8bit", "absmax_code", "absmax_offset")
    )

    def run():
        return torch.ops.lora_lens.nf4_lora_gemm(
            x, *kernel_args, None, lora_a, lora_b.T.contiguous(), factors, spans
        )

    one, two = in_own_thread(1, run), in_own_thread(2, run)
    assert torch.equal(one, two)
    base = torch.ops.lora_lens.nf4_gemm(x, *kernel_args, None)
    expected = base + torch.nn.functional.linear(torch.nn.functional.linear(x, lora_a), lora_b)
    expected[0] = base[0]
    torch.testing.assert_close(two, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_the_strength_router_hands_the_update_to_the_kernel(tiny_settings, monkeypatch):
    """In a model the kernel serves, a LoRA layer of a decode step is one kernel call, with the result of
    base(x) + s * scaling * B A x per row; with the kernel off, the same through torch."""
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair
    from utils.runtime.router import row_strengths

    with nf4_kernel.mode("fused", tiny_settings.cache_dir):
        pair = load_model_pair(tiny_settings, has_gpu=False)
    engine = Engine(pair)
    layer = engine.router.layers[0]
    x = torch.randn(3, 1, layer.base_layer.in_features, generator=torch.Generator().manual_seed(0))
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    calls = []
    real = torch.ops.lora_lens.nf4_lora_gemm
    monkeypatch.setattr(
        torch.ops.lora_lens, "nf4_lora_gemm", lambda *a: calls.append(1) or real(*a), raising=False
    )
    strengths = [0.0, -1.5, 2.5]
    with engine.exclusive(), torch.inference_mode():
        base = layer.base_layer(x)
        with row_strengths(pair.model, strengths):
            fused = layer(x)
            nf4_kernel.STATE.enabled = False
            try:
                through_torch = layer(x)
            finally:
                nf4_kernel.STATE.enabled = True
    assert len(calls) == 1
    expected = base + torch.tensor(strengths).view(3, 1, 1) * layer.scaling["default"] * (x @ a.T @ b.T)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, through_torch, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    assert torch.equal(fused[0], base[0]), "strength 0 must add exactly nothing"


def test_a_threads_count_holds_through_the_kernels_first_loop(kernel):
    """set_thread_count in a new thread survives the kernel's first parallel loop there, whatever torch's
    process-wide default (the kernel's library sets a thread's count up on first use from that default)."""
    import threading

    args, kwargs = _quantized(256, 128, "nf4", True)
    packed, (n, k), absmax, blocksize, quant_type = args
    kernel_args = (packed, n, k, absmax, blocksize, nf4_kernel._code(quant_type)) + tuple(
        kwargs.get(name) for name in ("absmax_8bit", "absmax_code", "absmax_offset")
    )
    seen = {}

    def work():
        nf4_kernel.set_thread_count(2)
        torch.ops.lora_lens.nf4_gemm(torch.randn(2, 128), *kernel_args, None)
        seen["threads"] = torch.get_num_threads()

    previous = torch.get_num_threads()
    torch.set_num_threads(1)  # an explicit process-wide default, as any library may set
    try:
        thread = threading.Thread(target=work)
        thread.start()
        thread.join()
    finally:
        torch.set_num_threads(previous)
    assert seen == {"threads": 2}


def test_a_failed_build_leaves_the_stock_path_and_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(nf4_kernel, "STATE", nf4_kernel.KernelState())
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    status = nf4_kernel.enable(tmp_path)
    assert status.startswith("stock bitsandbytes (the fused kernel could not be built")
    assert not nf4_kernel.STATE.registered and not nf4_kernel.STATE.enabled


def test_an_unknown_mode_counts_as_auto_and_says_so(kernel, cache_dir):
    with nf4_kernel.mode("fast", cache_dir) as state:
        assert state.status.endswith("LORA_LENS_CPU_KERNEL='fast' is not one of auto, fused, off: auto")
        assert state.probe is not None and "load-time probe" in state.status  # auto: the probe decided
    with nf4_kernel.mode("off", cache_dir) as state:
        assert state.status == "stock bitsandbytes (LORA_LENS_CPU_KERNEL=off)"
        assert not state.enabled
    assert nf4_kernel.STATE.enabled


def test_it_can_be_switched_off(tmp_path, monkeypatch):
    monkeypatch.setattr(nf4_kernel, "STATE", nf4_kernel.KernelState())
    monkeypatch.setenv("LORA_LENS_CPU_KERNEL", "off")
    assert nf4_kernel.enable(tmp_path) == "stock bitsandbytes (LORA_LENS_CPU_KERNEL=off)"


def test_the_header_says_which_kernel_runs_and_why(tiny_pair):
    from utils.runtime import kernel_probe

    choice = nf4_kernel.STATE.probe.choice
    width = {kernel_probe.AVX512: "AVX-512", kernel_probe.AVX2: "AVX2"}.get(choice)
    if width:
        assert tiny_pair.report.kernel.startswith(f"fused 4-bit kernel ({width}, float32")
    assert (
        "fastest exact path in the" in tiny_pair.report.kernel
        and "ms per 2-row product" in tiny_pair.report.kernel
    )
    assert tiny_pair.report.compute_dtype == "float32"  # every exact path computes in float32
    assert f"4-bit kernel: {tiny_pair.report.kernel}" in tiny_pair.report.as_text()


def test_fused_mode_takes_over_from_bitsandbytes_own_kernel(tiny_settings, monkeypatch):
    """LORA_LENS_CPU_KERNEL=fused: fp32 compute, no repacking, and the 4-bit layers go through this kernel."""
    from utils.runtime.loading import load_model_pair

    with nf4_kernel.mode("fused", tiny_settings.cache_dir):
        pair = load_model_pair(tiny_settings, has_gpu=False)
        assert pair.report.kernel.startswith("fused 4-bit kernel")
        assert pair.report.compute_dtype == "float32"
        calls = []
        real = torch.ops.lora_lens.nf4_gemm
        monkeypatch.setattr(
            torch.ops.lora_lens, "nf4_gemm", lambda *a: calls.append(1) or real(*a), raising=False
        )
        with torch.inference_mode():
            pair.model(input_ids=torch.tensor([[1, 2, 3]]))
        assert calls, "the 4-bit layers did not reach the fused kernel"
        assert not any(
            getattr(getattr(m.weight, "quant_state", None), "packing_format_for_cpu", False)
            for m in pair.model.modules()
            if hasattr(m, "weight")
        )


@pytest.mark.slow
def test_smollm2_greedy_is_token_exact_with_the_stock_path(cache_dir, kernel):
    """The embedded default's greedy answers on the test prompts, both panes, stock against fused (loaded in
    fused mode, so that the kernel serves it on CPUs with AVX512-BF16 too)."""
    from tests.greedy import greedy_answers_with_and_without
    from utils.core.profiles import Settings
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair

    with nf4_kernel.mode("fused", cache_dir):
        pair = load_model_pair(Settings(profile="smollm2-pricer", cache_dir=cache_dir), has_gpu=False)
    runs = greedy_answers_with_and_without(Engine(pair), kernel.STATE)
    assert runs[True] == runs[False]


def test_a_row_gets_the_same_bits_whatever_rows_are_beside_it(kernel, vector_width):
    """A row's product does not depend on the batch: so a pane in a mixed batch computes what it would alone."""
    args, kwargs = _quantized(1540, 576, "nf4", True, seed=11)  # 1540: outputs in blocks of 4 and 2, and not
    a = torch.randn(8, 576, generator=torch.Generator().manual_seed(12))
    if vector_width == 256:
        pytest.skip("the AVX2 loops sum in an order that depends on the row count")
    full = torch.ops.bitsandbytes.gemm_4bit.default(a, *args, **kwargs)
    for rows in range(1, 8):  # each row count's loop: 4 outputs at once up to 2 rows, 2 up to 6, then 1
        assert torch.equal(torch.ops.bitsandbytes.gemm_4bit.default(a[:rows], *args, **kwargs), full[:rows])


@pytest.mark.parametrize("threads", [1, 2])
def test_nested_scales_give_the_bits_of_the_same_scales_held_plain(kernel, vector_width, threads):
    """Nested scales, worked out before the loops by the AVX-512 ones (16 at a time, with a part-filled last
    vector where a thread's share of blocks is no multiple of 16) and inside them by the AVX2 ones: the product
    is the same bits as with those scales handed to the kernel as plain float32, which bitsandbytes works out
    on its own."""
    import bitsandbytes.functional as F

    from utils.runtime.threads import in_own_thread

    args, kwargs = _quantized(1540, 576, "nf4", True, seed=13)  # 1540 x 9 blocks: shares of 16 and less
    packed, shape, outer, blocksize, quant_type = args
    scales = F.dequantize_blockwise(
        kwargs["absmax_8bit"], absmax=outer, code=kwargs["absmax_code"], blocksize=256
    )
    scales = scales + kwargs["absmax_offset"]
    a = torch.randn(3, 576, generator=torch.Generator().manual_seed(14))
    nested = in_own_thread(threads, lambda: torch.ops.bitsandbytes.gemm_4bit.default(a, *args, **kwargs))
    plain = in_own_thread(
        threads,
        lambda: torch.ops.bitsandbytes.gemm_4bit.default(a, packed, shape, scales, blocksize, quant_type),
    )
    assert torch.equal(nested, plain)


def test_the_router_transposes_lora_b_once_and_again_after_a_change(tiny_settings):
    """The kernel reads lora_B transposed: the router keeps that copy between requests (a plan costs no
    transposes) and makes it afresh when the adapter's weights are changed in place."""
    from utils.runtime.engine import Engine
    from utils.runtime.loading import load_model_pair

    with nf4_kernel.mode("fused", tiny_settings.cache_dir):
        engine = Engine(load_model_pair(tiny_settings, has_gpu=False))
    router = engine.router
    first = router.plan_for([0.0, 1.0]).fused
    again = router.plan_for([1.0, 0.5]).fused
    index = next(i for i, f in enumerate(first) if f is not None)
    assert again[index][2] is first[index][2]
    torch.testing.assert_close(first[index][2], router.stacks[index].b.t())
    layer = router.layers[index]
    with torch.no_grad():
        layer.lora_B[router.adapter_name].weight.mul_(2.0)
    changed = router.plan_for([0.0, 1.0]).fused[index][2]
    assert changed is not first[index][2]
    torch.testing.assert_close(changed, router.stacks[index].b.t())
