"""The token lens's scores from the kernel library's loops (csrc/lens_scores.cpp) against the same scores in
float64 from ATen's log_softmax: log-probabilities, top candidates and KL, for vocabularies that are and are not
whole vectors of 8, rows that are views with a stride, ties, and a thread count that does not change a bit."""

import pytest
import torch

from utils.runtime import nf4_kernel, scoring
from utils.runtime.threads import in_own_thread

pytestmark = pytest.mark.skipif(
    not nf4_kernel.cpu_has_avx2_fma(), reason="the kernel library needs AVX2 and FMA"
)


@pytest.fixture
def library(cache_dir):
    assert nf4_kernel.enable(cache_dir) and nf4_kernel.STATE.registered, nf4_kernel.STATE.status


def _rows(vocabulary: int, positions=(7, 7, 5), seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    logits = [torch.randn(t, vocabulary, generator=generator) * 6 for t in positions]
    # a second model's row over the first's positions, close to it, as a fine-tune is to its base
    logits[1] = logits[0] + torch.randn(logits[0].shape, generator=generator) * 0.3
    sequences = [torch.randint(0, vocabulary, (t + 3,), generator=generator).tolist() for t in positions]
    return logits, sequences, [2] * len(positions)


def _reference(logits, sequences, keep, top_k, pairs):
    logprobs = [torch.log_softmax(z.double(), dim=-1) for z in logits]
    targets = [torch.tensor(s[k + 1 :]) for s, k in zip(sequences, keep, strict=True)]
    chosen = [lp.gather(1, t.unsqueeze(1)).squeeze(1) for lp, t in zip(logprobs, targets, strict=True)]
    tops = [lp.topk(top_k, dim=-1) for lp in logprobs]
    kl = {(a, b): (logprobs[a].exp() * (logprobs[a] - logprobs[b])).sum(-1) for a, b in pairs}
    return chosen, tops, kl


@pytest.mark.parametrize("vocabulary", [49152, 1003, 12])
def test_the_loops_give_atens_scores_in_float64_up_to_float32_rounding(library, vocabulary):
    logits, sequences, keep = _rows(vocabulary)
    top_k, pairs = min(5, vocabulary), [(1, 0), (0, 1)]
    assert scoring.fused_scores_serve(logits)
    got = scoring.scores_from_logits(logits, sequences, keep, top_k, pairs)
    chosen, tops, kl = _reference(logits, sequences, keep, top_k, pairs)
    for row, expected, (values, ids) in zip(got.rows, chosen, tops, strict=True):
        assert row.logprobs == pytest.approx(expected.tolist(), abs=2e-5)
        assert [[i for i, _ in position] for position in row.top] == ids.tolist()
        probabilities = [[p for _, p in position] for position in row.top]
        torch.testing.assert_close(torch.tensor(probabilities), values.exp().float(), rtol=1e-5, atol=1e-6)
    for pair in pairs:
        assert got.kl[pair] == pytest.approx(kl[pair].clamp_min(0).tolist(), abs=1e-4, rel=1e-4)
        assert min(got.kl[pair]) > 0


def test_they_agree_with_the_aten_path_and_do_not_depend_on_the_thread_count(library):
    logits, sequences, keep = _rows(4099, positions=(9, 9))
    # rows that are views of a wider tensor, as the kept run's logits are
    wide = torch.randn(2, 9, 4099 + 64)
    wide[:, :, :4099] = torch.stack(logits)
    views = [wide[0, :, :4099], wide[1, :, :4099]]
    assert views[0].stride(0) != 4099 and scoring.fused_scores_serve(views)
    one = in_own_thread(1, lambda: scoring.scores_from_logits(views, sequences, keep, 5, [(1, 0)]))
    two = in_own_thread(2, lambda: scoring.scores_from_logits(logits, sequences, keep, 5, [(1, 0)]))
    assert one == two
    aten = scoring.scores_from_logits(logits, sequences, keep, 5, [(1, 0)], fused=False)
    for fused_row, aten_row in zip(one.rows, aten.rows, strict=True):
        assert fused_row.logprobs == pytest.approx(aten_row.logprobs, abs=2e-5)
        assert [[i for i, _ in p] for p in fused_row.top] == [[i for i, _ in p] for p in aten_row.top]
    assert one.kl[(1, 0)] == pytest.approx(aten.kl[(1, 0)], abs=1e-4, rel=1e-4)


def test_of_equal_logits_the_lower_id_comes_first(library):
    z = torch.zeros(2, 40)
    z[0, [3, 17, 30]] = 2.0
    z[1, 9] = 1.0
    norms, logprobs, top_logprobs, top_ids = torch.ops.lora_lens.row_scores(z, torch.tensor([17, 0]), 4)
    assert top_ids.tolist() == [[3, 17, 30, 0], [9, 0, 1, 2]]
    expected = torch.log_softmax(z.double(), dim=-1)
    torch.testing.assert_close(logprobs, expected[[0, 1], [17, 0]].float())
    torch.testing.assert_close(norms, torch.logsumexp(z, dim=-1))
    torch.testing.assert_close(top_logprobs, expected.gather(1, top_ids).float())


def test_a_row_it_cannot_take_is_refused_with_a_message(library):
    with pytest.raises(RuntimeError, match="kl_rows"):
        torch.ops.lora_lens.kl_rows(torch.zeros(3, 8), torch.zeros(3), torch.zeros(2, 8), torch.zeros(2))
    with pytest.raises(RuntimeError, match="row_scores"):
        torch.ops.lora_lens.row_scores(torch.zeros(3, 8).t(), torch.zeros(8, dtype=torch.long), 2)
