"""Selections spanning more than 2**31 elements (64-bit positions and counts).

float16 scores and bool masks keep the tests to about 7 and 10 GB; marked slow.
"""
import pytest
import torch

import fastprune.ops as ops
import fastprune.prune as prune

BIG = 2**31 + 2**20  # total entries, above INT32_MAX


@pytest.mark.slow
def test_global_select_above_2_31_elements_prunes_exactly_k():
    period = 1000  # |score| = position % period, each value repeated ~2.1M times
    pattern = torch.arange(period, dtype=torch.float16)
    sizes = [2**30, BIG - 2**30]
    scores = [pattern.repeat(n // period + 1)[:n] for n in sizes]
    masks = [torch.ones((), dtype=torch.bool).expand(n) for n in sizes]
    # All entries below 500 go, then the first `extra` entries equal to 500 in
    # concatenation order (the tie rule), which all lie in the first tensor.
    below = sum(int((s < 500).sum()) for s in scores)
    extra = 12345
    k = below + extra
    out = ops.global_unstructured_masks(scores, masks, count=k)
    assert [o.dtype for o in out] == [torch.bool, torch.bool]
    assert sum(int((~o).sum()) for o in out) == k
    first, second = out
    assert not bool(first[scores[0] < 500].any()) and not bool(second[scores[1] < 500].any())
    assert bool(first[scores[0] > 500].all()) and bool(second[scores[1] > 500].all())
    ties = (scores[0] == 500).nonzero().view(-1)
    assert not bool(first[ties[:extra]].any()) and bool(first[ties[extra:]].all())
    assert bool(second[scores[1] == 500].all())




@pytest.mark.slow
def test_one_tensor_above_2_31_elements_prunes_exactly_k():
    """L1Unstructured.compute_mask on a single fp16 tensor of more than
    2**31 entries (the whole Python path, with a broadcast bool default mask):
    exactly k pruned, all below the threshold value, ties to the lowest flat
    indices, the last entries (beyond 2**31) ranked too. Checked chunk by
    chunk to keep temporaries small (about 7 GB in all)."""
    period, extra = 999, 777  # |score| 10 is the cut; its first 777 entries go too
    scores = torch.arange(period, dtype=torch.float16).repeat(BIG // period + 1)[:BIG]
    scores[-5:] = -0.25  # among the smallest magnitudes, at the very end
    chunks = [(a, min(a + 2**28, BIG)) for a in range(0, BIG, 2**28)]
    k = sum(int((scores[a:b].abs() < 10).sum()) for a, b in chunks) + extra
    default = torch.ones((), dtype=torch.bool).expand(BIG)
    mask = prune.L1Unstructured(amount=k).compute_mask(scores, default_mask=default)
    assert mask.dtype == torch.bool and mask.shape == (BIG,) and mask.is_contiguous()
    assert sum(int((~mask[a:b]).sum()) for a, b in chunks) == k
    for i, (a, b) in enumerate(chunks):
        s, m = scores[a:b].abs(), mask[a:b]
        assert not bool(m[s < 10].any()) and bool(m[s > 10].all())
        ties = m[s == 10]
        if i == 0:  # the first `extra` ties in flat order, all in the first chunk
            assert not bool(ties[:extra].any()) and bool(ties[extra:].all())
        else:
            assert bool(ties.all())
    assert not bool(mask[-5:].any())
