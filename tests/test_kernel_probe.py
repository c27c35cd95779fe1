"""The load-time probe that picks `auto`'s 4-bit CPU path: the fastest path exact to float32 rounding, never
bitsandbytes' bf16 kernel however fast, the stock path where the project's kernel is wrong; cached per CPU and
versions and read back without timing again; and a header line that gives every path's time."""

import json

import pytest
import torch

from utils.runtime import kernel_probe, nf4_kernel
from utils.runtime.kernel_probe import AVX2, AVX512, OWN_BF16, STOCK, ProbeResult

pytestmark = pytest.mark.skipif(not nf4_kernel.cpu_has_avx2_fma(), reason="the probe times the fused kernel")


def test_the_fastest_exact_path_is_chosen():
    assert kernel_probe.decide({AVX512: 0.14, AVX2: 0.23, STOCK: 2.7, OWN_BF16: 0.15}) == AVX512
    assert kernel_probe.decide({AVX512: 0.30, AVX2: 0.23, STOCK: 2.7}) == AVX2
    assert kernel_probe.decide({AVX2: 0.23, STOCK: 0.1}) == STOCK
    assert kernel_probe.decide({AVX512: 0.2, AVX2: 0.2}) == AVX512, "a tie goes to the first in EXACT"


def test_bitsandbytes_bf16_kernel_is_never_chosen_and_a_wrong_path_never():
    assert kernel_probe.decide({AVX512: 0.20, AVX2: 0.25, STOCK: 2.7, OWN_BF16: 0.01}) == AVX512
    assert kernel_probe.decide({AVX512: None, AVX2: 0.25, STOCK: 2.7}) == AVX2
    assert kernel_probe.decide({AVX512: None, AVX2: None, STOCK: None}) == STOCK


def test_a_product_off_by_more_than_float32_rounding_fails_its_check():
    expected = torch.ones(2, 8)
    assert kernel_probe._timed(lambda: expected + 1e-7, expected, 1e-5) is not None
    assert kernel_probe._timed(lambda: expected * 1.001, expected, 1e-5) is None
    assert kernel_probe._timed(lambda: torch.ones(3), expected, 1e-5) is None  # a failing call, not an error


def test_the_reason_gives_every_paths_time():
    result = ProbeResult(AVX512, {AVX512: 0.14, AVX2: 0.233, STOCK: None, OWN_BF16: 0.153})
    assert result.reason == (
        "fastest exact path in the load-time probe, ms per 2-row product: fused AVX-512 0.140, "
        "fused AVX2 0.233, stock float32 wrong, bitsandbytes AVX512-BF16 0.153 (bf16, not exact)"
    )
    assert "cached load-time probe" in ProbeResult(AVX512, {AVX512: 0.14}, cached=True).reason


def test_a_real_probe_times_every_path_on_this_cpu_and_is_cached(tmp_path, cache_dir, monkeypatch):
    nf4_kernel.enable(cache_dir)
    library = nf4_kernel.library_path(cache_dir)
    monkeypatch.setattr(kernel_probe, "REPEATS", 1)
    monkeypatch.setattr(kernel_probe, "CALLS", 1)
    first = kernel_probe.choose(tmp_path, library, 1, avx512=nf4_kernel.runs_avx512(), own_bf16=False)
    assert not first.cached
    assert set(first.times_ms) == {AVX2, STOCK} | ({AVX512} if nf4_kernel.runs_avx512() else set())
    assert all(ms is not None and ms > 0 for ms in first.times_ms.values()), "every path passed its check"
    assert first.choice == kernel_probe.decide(first.times_ms)
    path = kernel_probe.cache_path(tmp_path, library)
    assert json.loads(path.read_text())["choice"] == first.choice
    monkeypatch.setattr(kernel_probe, "probe", lambda *a: pytest.fail("a cached choice is not timed again"))
    again = kernel_probe.choose(tmp_path, library, 1, avx512=True, own_bf16=True)
    assert again.cached and again.choice == first.choice and again.times_ms == first.times_ms


def test_a_damaged_cache_entry_is_probed_again(tmp_path, cache_dir, monkeypatch):
    library = nf4_kernel.library_path(cache_dir)
    path = kernel_probe.cache_path(tmp_path, library)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    monkeypatch.setattr(kernel_probe, "probe", lambda *a: ProbeResult(AVX2, {AVX2: 0.2}))
    assert kernel_probe.choose(tmp_path, library, 1, avx512=False, own_bf16=False).choice == AVX2
    assert json.loads(path.read_text()) == {"choice": AVX2, "times_ms": {AVX2: 0.2}}


def test_the_cache_key_follows_the_cpu(tmp_path, cache_dir, monkeypatch):
    library = nf4_kernel.library_path(cache_dir)
    here = kernel_probe.cache_path(tmp_path, library)
    monkeypatch.setattr(kernel_probe, "cpu_key", lambda: "model name\t: another CPU\nflags\t: avx2 fma")
    assert kernel_probe.cache_path(tmp_path, library) != here


def test_where_the_probe_finds_the_stock_path_fastest_it_runs_and_the_header_says_so(
    tmp_path, cache_dir, monkeypatch
):
    nf4_kernel.enable(cache_dir)
    monkeypatch.setattr(nf4_kernel, "STATE", nf4_kernel.KernelState(registered=True, enabled=True))
    monkeypatch.setenv("LORA_LENS_CPU_KERNEL", "auto")
    monkeypatch.setattr(kernel_probe, "choose", lambda *a, **k: ProbeResult(STOCK, {AVX2: 0.5, STOCK: 0.1}))
    status = nf4_kernel.enable(tmp_path)
    assert not nf4_kernel.STATE.enabled and not nf4_kernel.STATE.takes_over
    assert status.startswith("stock bitsandbytes, float32 (de-quantize, then matmul): fastest exact path")
    assert not nf4_kernel.bitsandbytes_kernel_serves()  # float32 compute: the stock path, not the bf16 kernel
