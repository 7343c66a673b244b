"""Selections spanning more than 2**31 elements (64-bit positions and counts).

float16 scores and bool masks keep this to about 7 GB; marked slow.
"""
import pytest
import torch

import fastprune.ops as ops

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
