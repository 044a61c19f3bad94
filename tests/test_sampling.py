"""Counter-based sampling (DESIGN.md §10): HF's warpers' results, uniform draws that depend on (seed,
token index) only, and samples that follow the warped distribution."""

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from drex_hf.generation.sampling import Temperature, TopK, TopP, host_uniform, pick_tokens, sample_rows, uniforms


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
@pytest.mark.parametrize("top_k", [1, 3, 50])
def test_the_warpers_give_hfs_results(top_k, top_p):
    gen = torch.Generator().manual_seed(top_k)
    scores = torch.randn(6, 99, generator=gen) * 3
    scores[2, :10] = scores[2, 0]  # ties at the top-k boundary
    scores[3] = 0.0  # a flat row
    hf = TopPLogitsWarper(top_p)(None, TopKLogitsWarper(top_k)(None, TemperatureLogitsWarper(0.7)(None, scores)))
    ours = TopP(top_p)(TopK(top_k)(Temperature(0.7)(scores)))
    assert torch.equal(ours, hf)


def test_uniforms_depend_on_seed_and_counter_only_and_are_uniform():
    seeds = torch.tensor([0, 1, -5, 2**62 + 7, 123456789] * 2000)
    counters = torch.arange(seeds.numel()) // 5
    u = uniforms(seeds, counters)
    assert u.dtype == torch.float64 and float(u.min()) >= 0.0 and float(u.max()) < 1.0
    # the same (seed, counter) anywhere in any batch gives the same draw, on the host too
    assert float(uniforms(seeds[7:8], counters[7:8])) == float(u[7]) == host_uniform(int(seeds[7]), int(counters[7]))
    assert host_uniform(2**64 - 5, 3) == host_uniform(-5, 3)  # seeds are taken modulo 2**64
    # 10 000 draws in 20 bins: chi-square with 19 degrees of freedom stays far below 60 (p < 1e-5)
    counts = torch.bincount((u * 20).long(), minlength=20).double()
    chi2 = float(((counts - 500) ** 2 / 500).sum())
    assert chi2 < 60, chi2
    # neighbouring counters and seeds are not correlated
    pairs = u.view(-1, 5)
    corr = torch.corrcoef(torch.stack([pairs[:-1, 0], pairs[1:, 0], pairs[:-1, 1]]))
    assert corr[0, 1].abs() < 0.05 and corr[0, 2].abs() < 0.05


def test_samples_follow_the_distribution_and_never_draw_an_excluded_token():
    probs = torch.tensor([0.5, 0.0, 0.3, 0.15, 0.05])
    scores = probs.log().expand(20000, 5).contiguous()  # -inf for the excluded token
    tokens = sample_rows(scores, torch.arange(20000), torch.zeros(20000, dtype=torch.long))
    counts = torch.bincount(tokens, minlength=5).double() / 20000
    assert counts[1] == 0
    assert torch.allclose(counts, probs.double(), atol=0.015), counts


def test_a_rows_token_is_the_same_alone_and_in_any_batch():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 99, generator=gen)
    seeds, counters = torch.arange(100, 108), torch.arange(8) * 3
    warpers = [Temperature(2.0), TopK(20), TopP(0.9)]
    batch = pick_tokens(logits, True, warpers, seeds, counters)
    for i in range(8):
        alone = pick_tokens(logits[i : i + 1], True, warpers, seeds[i : i + 1], counters[i : i + 1])
        assert int(alone[0]) == int(batch[i])
    assert torch.equal(pick_tokens(logits, False, []), logits.argmax(-1))
    assert len(set(batch.tolist())) > 2  # really sampled, not one token everywhere


def test_host_draws_many_at_once_equal_one_at_a_time():
    from drex_hf.generation.sampling import host_uniforms

    seeds, counters = [0, 7, -3, 2**63 + 5, 12345678901234], [1, 2, 3, 4, 2**31 + 9]
    assert host_uniforms(seeds, counters).tolist() == [host_uniform(s, c) for s, c in zip(seeds, counters)]
