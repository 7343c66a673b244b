"""The separable passes (radix_histogram, count_at_key, masks_at_threshold)
against a sort-based oracle written here, and chained into a full select that
must equal global_unstructured_masks bit for bit."""
import pytest
import torch

import fastprune  # noqa: F401
from fastprune import ops

from conftest import FLOAT_DTYPES

_INT = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
        torch.float64: torch.int64}
_INF = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80, torch.float32: 0x7F800000,
        torch.float64: 0x7FF0000000000000}


def oracle_keys(s, largest=False):
    """The select's keys of ``s`` (flat, int64, as Python ints would be)."""
    bits = torch.finfo(s.dtype).bits
    raw = s.detach().contiguous().view(_INT[s.dtype]).to(torch.int64).reshape(-1)
    absmask = (1 << (bits - 1)) - 1
    raw = raw & absmask
    raw = torch.where(raw > _INF[s.dtype], torch.full_like(raw, _INF[s.dtype] + 1), raw)
    return absmask - raw if largest else raw


def oracle_masks(scores, masks, key, skip, take, only_ones, largest):
    out, tie_no = [], 0
    for s, m in zip(scores, masks):
        k = oracle_keys(s, largest)
        cand = (m.reshape(-1) == 1) if only_ones else torch.ones_like(k, dtype=torch.bool)
        tie = cand & (k == key)
        number = torch.cumsum(tie.to(torch.int64), 0) - 1 + tie_no
        tie_no += int(tie.sum())
        cut = (cand & (k < key)) | (tie & (number >= skip) & (number < skip + take))
        out.append(torch.where(cut.view(m.shape), torch.zeros_like(m), m))
    return out


def sample(dtype, seed, sizes=(37, 0, 1000, 513), ties=True):
    g = torch.Generator().manual_seed(seed)
    scores = []
    for n in sizes:
        x = torch.randn(n, generator=g, dtype=torch.float64)
        if ties:  # a few values repeat, zeros of both signs, NaN and inf
            x = torch.where(torch.rand(n, generator=g, dtype=torch.float64) < 0.3, x.round(), x)
            if n > 10:
                x[3], x[5], x[7] = float("nan"), float("inf"), -0.0
        scores.append(x.to(dtype))
    masks = [(torch.rand(n, generator=g) < 0.8).to(torch.float32) for n in sizes]
    return scores, masks


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("largest", [False, True])
def test_histograms_count_the_digits_of_candidates_under_a_prefix(dtype, largest):
    scores, masks = sample(dtype, 1)
    keys = torch.cat([oracle_keys(s, largest) for s in scores])
    cand = torch.cat(masks) == 1
    bits = torch.finfo(dtype).bits
    for d in range(ops.pass_digits(dtype)):
        shift = max(0, bits - 11 * (d + 1))
        width = bits - 11 * d - shift
        prefix = int(keys[cand][len(keys[cand]) // 2])  # one real key's leading digits
        top = bits - 11 * d
        same = (keys >> top) == (prefix >> top) if d else torch.ones_like(cand)
        want = torch.bincount(((keys >> shift) & ((1 << width) - 1))[cand & same], minlength=2048)
        got = ops.radix_histogram(scores, masks, d, prefix, only_ones=True, largest=largest)
        assert got.dtype == torch.int64 and got.shape == (2048,)
        assert torch.equal(got, want), d


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_count_at_key_counts_per_tensor(dtype):
    scores, masks = sample(dtype, 2)
    key = int(oracle_keys(torch.tensor([1.0], dtype=dtype))[0])
    want = [int(((oracle_keys(s) == key) & (m.reshape(-1) == 1)).sum()) for s, m in zip(scores, masks)]
    assert ops.count_at_key(scores, masks, key, only_ones=True).tolist() == want
    assert want[2] > 1  # the sample has ties to count


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("only_ones", [False, True])
@pytest.mark.parametrize("largest", [False, True])
def test_masks_at_threshold_prune_below_and_a_window_of_ties(dtype, only_ones, largest):
    scores, masks = sample(dtype, 3)
    key = int(oracle_keys(torch.tensor([1.0], dtype=dtype), largest)[0])
    ties = int(ops.count_at_key(scores, masks, key, only_ones=only_ones, largest=largest).sum())
    for skip, take in [(0, 0), (0, ties), (0, 2 ** 63 - 1), (1, 3), (ties - 2, 5), (ties, 4), (3, 0)]:
        got = ops.masks_at_threshold(scores, masks, key, skip=skip, take=take, only_ones=only_ones,
                                     largest=largest)
        want = oracle_masks(scores, masks, key, skip, take, only_ones, largest)
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and torch.equal(g, w), (skip, take)


def test_masks_at_threshold_splits_ties_across_threads_exactly():
    # Large enough for several chunks per tensor: the window must not depend on them.
    x = torch.zeros(300_000)
    x[::7] = 1.0
    key = int(oracle_keys(torch.tensor([0.0]))[0])
    ones = torch.ones(()).expand(x.shape)
    for skip, take in [(1000, 150_000), (0, 1), (200_000, 57_142)]:
        got = ops.masks_at_threshold([x, x], [ones, ones], key, skip=skip, take=take)
        want = oracle_masks([x, x], [ones.contiguous(), ones.contiguous()], key, skip, take, False, False)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


def chained_select(scores, masks, k, only_ones, largest):
    """A full select from the passes, as fastprune.distributed chains them."""
    dtype = scores[0].dtype
    bits = torch.finfo(dtype).bits
    prefix, rank = 0, k
    for d in range(ops.pass_digits(dtype)):
        hist = ops.radix_histogram(scores, masks, d, prefix, only_ones=only_ones, largest=largest)
        cum = hist.cumsum(0)
        b = int(torch.searchsorted(cum, rank))
        rank -= int(cum[b] - hist[b])
        prefix |= b << max(0, bits - 11 * (d + 1))
    return ops.masks_at_threshold(scores, masks, prefix, take=rank, only_ones=only_ones, largest=largest)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("largest", [False, True])
def test_chained_passes_equal_the_one_call_select(dtype, largest):
    scores, masks = sample(dtype, 4)
    n = int(sum((m == 1).sum() for m in masks))
    for k in [1, n // 3, n // 2, n - 1, n]:
        want = ops.global_unstructured_masks(scores, masks, count=k, only_ones=True, largest=largest)
        got = chained_select(scores, masks, k, True, largest)
        assert all(torch.equal(g, w) for g, w in zip(got, want)), k


def test_keys_travel_as_non_negative_ints_and_bad_arguments_fail():
    x = torch.randn(10, dtype=torch.float64)
    m = torch.ones(10)
    top = ops.radix_histogram([x], [m], 0, 2 ** 63 - 1)  # the largest key is fine
    assert int(top.sum()) == 10
    with pytest.raises(RuntimeError, match="key must lie in"):
        ops.count_at_key([x.float()], [m], 2 ** 40)
    with pytest.raises(RuntimeError, match="key must lie in"):
        ops.count_at_key([x], [m], -1)
    with pytest.raises(RuntimeError, match="digit must lie in"):
        ops.radix_histogram([x.half()], [m], 2, 0)
    with pytest.raises(RuntimeError, match="skip and take must be non-negative"):
        ops.masks_at_threshold([x], [m], 0, skip=-1)
    with pytest.raises(RuntimeError, match="one dtype"):
        ops.radix_histogram([x, x.float()], [m, m], 0, 0)


@pytest.mark.parametrize("op", ["radix_histogram", "count_at_key", "masks_at_threshold"])
def test_opcheck(op):
    scores, masks = sample(torch.float32, 5, sizes=(12, 0, 30))
    args = {
        "radix_histogram": (scores, masks, 1, 0x3F800000, True, False),
        "count_at_key": (scores, masks, 0x3F800000, False, True),
        "masks_at_threshold": (scores, masks, 0x3F800000, 1, 2, True, False),
    }[op]
    torch.library.opcheck(getattr(torch.ops.fastprune, op).default, args)
