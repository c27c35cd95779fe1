"""The decode-step output layer: the compiled kernel and `W @ x^T` equal `linear` to float rounding for the rows
they serve, the plain path for everything else, and the embedded default's greedy answers token-exact with
either path."""

import pytest
import torch

from utils.runtime import cpu_decode, nf4_kernel


@pytest.fixture(params=["compiled kernel", "W @ x^T"])
def output_path(request, cache_dir, monkeypatch):
    """Both ways of computing the product: the compiled dense_rows_gemm and, without it, `W @ x^T`."""
    if request.param == "compiled kernel":
        if not nf4_kernel.cpu_has_avx2_fma():
            pytest.skip("the compiled kernels need AVX2 and FMA")
        nf4_kernel.enable(cache_dir)
        assert nf4_kernel.STATE.enabled, nf4_kernel.STATE.status
    else:
        monkeypatch.setattr(nf4_kernel.STATE, "enabled", False)
    return request.param


@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
@pytest.mark.parametrize("with_bias", [False, True])
def test_product_equals_linear(rows, with_bias, output_path):
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(4096, 576, generator=generator)
    bias = torch.randn(4096, generator=generator) if with_bias else None
    x = torch.randn(rows, 1, 576, generator=generator)
    expected = torch.nn.functional.linear(x, weight, bias)
    got = cpu_decode.output_layer_product(x, weight, bias)
    assert got.shape == expected.shape == (rows, 1, 4096)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_the_compiled_kernel_serves_decode_rows(cache_dir, monkeypatch):
    if not nf4_kernel.cpu_has_avx2_fma():
        pytest.skip("the compiled kernels need AVX2 and FMA")
    nf4_kernel.enable(cache_dir)
    calls = []
    real = torch.ops.lora_lens.dense_rows_gemm
    monkeypatch.setattr(
        torch.ops.lora_lens, "dense_rows_gemm", lambda *a: calls.append(a[0].shape) or real(*a), raising=False
    )
    weight = torch.randn(300, 64)
    cpu_decode.output_layer_product(torch.randn(2, 1, 64), weight, None)
    monkeypatch.setattr(nf4_kernel.STATE, "enabled", False)
    cpu_decode.output_layer_product(torch.randn(2, 1, 64), weight, None)
    assert calls == [(2, 1, 64)]


def test_the_output_layer_takes_it_for_decode_rows_only(monkeypatch):
    head = torch.nn.Linear(64, 300, bias=False)
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    assert cpu_decode.speed_up_output_layer(model)
    assert cpu_decode.speed_up_output_layer(model)  # a second call changes nothing
    calls = []
    real = cpu_decode.output_layer_product
    monkeypatch.setattr(cpu_decode, "output_layer_product", lambda *a: calls.append(a[0].shape) or real(*a))
    with torch.inference_mode():
        head(torch.randn(2, 1, 64))
        head(torch.randn(1, cpu_decode.MAX_ROWS + 1, 64))  # a prefill
    head(torch.randn(2, 1, 64))  # autograd on: the plain path
    assert calls == [(2, 1, 64)]


def test_other_dtypes_keep_their_output_layer():
    model = torch.nn.Module()
    head = torch.nn.Linear(64, 300).to(torch.bfloat16)
    model.get_output_embeddings = lambda: head
    assert not cpu_decode.speed_up_output_layer(model)


@pytest.mark.slow
def test_smollm2_greedy_is_token_exact_with_the_plain_output_layer(smollm2_pair):
    from tests.greedy import greedy_answers_with_and_without
    from utils.runtime.engine import Engine

    runs = greedy_answers_with_and_without(Engine(smollm2_pair), cpu_decode.SWITCH)
    assert runs[True] == runs[False]


def _q8_weight(n=4096, k=576, seed=0):
    """A float32 weight of GGUF Q8_0's form: int8 in -127..127 times one float16 scale per 32, the largest |q|
    of each block 127 (as the quantizer puts it), as a GGUF embedding de-quantizes."""
    generator = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k // 32, 32), generator=generator, dtype=torch.int32)
    q[:, :, 0] = torch.where(torch.rand(n, k // 32, generator=generator) < 0.5, 127, -127)
    scales = (torch.rand(n, k // 32, 1, generator=generator) * 0.01).half().float()
    return (q.float() * scales).reshape(n, k)


def test_the_exact_int8_form_is_found_and_rebuilds_every_weight():
    weight = _q8_weight()
    q, scales = cpu_decode.exact_int8_form(weight)
    assert q.dtype == torch.int8 and scales.shape == (4096, 18)
    rebuilt = (q.float().reshape(4096, 18, 32) * scales.unsqueeze(-1)).reshape(4096, 576)
    assert torch.equal(rebuilt, weight)


def test_a_weight_without_that_form_has_none():
    weight = _q8_weight()
    weight[7, 3] = weight[7, 3] * 1.0001  # one value off the grid
    assert cpu_decode.exact_int8_form(weight) is None
    assert cpu_decode.exact_int8_form(torch.randn(64, 576)) is None
    assert cpu_decode.exact_int8_form(torch.randn(64, 40)) is None  # not a multiple of 32
    assert cpu_decode.exact_int8_form(_q8_weight(64).bfloat16()) is None


@pytest.mark.parametrize("width", [256, 512])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
# 1027: the AVX-512 loop's last outputs fewer than a pass's four
@pytest.mark.parametrize("outputs", [4096, 1027])
def test_the_int8_output_layer_equals_linear(cache_dir, width, rows, outputs):
    if not nf4_kernel.cpu_has_avx2_fma():
        pytest.skip("the compiled kernels need AVX2 and FMA")
    nf4_kernel.enable(cache_dir)
    if width == 512 and not nf4_kernel.runs_avx512():
        pytest.skip("this CPU (or torch's setting) does not run AVX-512")
    weight = _q8_weight(n=outputs, seed=rows)
    x = torch.randn(rows, 1, 576, generator=torch.Generator().manual_seed(rows))
    expected = torch.nn.functional.linear(x, weight)
    previous = nf4_kernel.STATE.vector_bits
    torch.ops.lora_lens.set_vector_width(width)
    try:
        got = cpu_decode.output_layer_product(x, weight, None, cpu_decode.exact_int8_form(weight))
    finally:
        torch.ops.lora_lens.set_vector_width(previous)
    assert got.shape == (rows, 1, outputs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_an_int8_output_row_has_the_same_bits_beside_any_rows(cache_dir):
    """With the AVX-512 loop (four outputs a pass up to 2 rows, two up to 4, then one), a row's logits do not depend
    on the rows beside it: a pane alone, in a comparison, in a 5-row sweep (the AVX2 loops sum in an order that
    depends on the row count, as test_nf4_kernel's)."""
    if not nf4_kernel.cpu_has_avx2_fma():
        pytest.skip("the compiled kernels need AVX2 and FMA")
    nf4_kernel.enable(cache_dir)
    if not nf4_kernel.runs_avx512():
        pytest.skip("this CPU (or torch's setting) does not run AVX-512")
    weight = _q8_weight(n=1027)
    form = cpu_decode.exact_int8_form(weight)
    x = torch.randn(8, 1, 576, generator=torch.Generator().manual_seed(3))
    previous = nf4_kernel.STATE.vector_bits
    torch.ops.lora_lens.set_vector_width(512)
    try:
        alone = [cpu_decode.output_layer_product(x[i : i + 1], weight, None, form) for i in range(8)]
        for rows in (2, 5, 8):
            together = cpu_decode.output_layer_product(x[:rows], weight, None, form)
            for i in range(rows):
                assert torch.equal(together[i], alone[i][0])
    finally:
        torch.ops.lora_lens.set_vector_width(previous)


def test_a_model_whose_output_layer_has_the_form_streams_it(cache_dir, monkeypatch):
    """The output layer found in int8 form at set-up, used for decode rows, and dropped for a changed weight."""
    if not nf4_kernel.cpu_has_avx2_fma():
        pytest.skip("the compiled kernels need AVX2 and FMA")
    nf4_kernel.enable(cache_dir)
    head = torch.nn.Linear(576, 4096, bias=False)
    with torch.no_grad():
        head.weight.copy_(_q8_weight())
    model = torch.nn.Module()
    model.get_output_embeddings = lambda: head
    assert cpu_decode.speed_up_output_layer(model)
    calls = []
    real = torch.ops.lora_lens.q8_rows_gemm
    monkeypatch.setattr(
        torch.ops.lora_lens, "q8_rows_gemm", lambda *a: calls.append(1) or real(*a), raising=False
    )
    x = torch.randn(2, 1, 576)
    with torch.inference_mode():
        head(x)
    assert calls == [1]
    with torch.no_grad():
        head.weight[0, 0] += 1e-3  # off the grid: the float32 path again
    with torch.inference_mode():
        torch.testing.assert_close(head(x), torch.nn.functional.linear(x, head.weight), rtol=1e-5, atol=1e-4)
    assert calls == [1]
