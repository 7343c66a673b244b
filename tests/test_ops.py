"""The kernels against pure-PyTorch oracles: the select
(``unstructured_mask``, ``global_unstructured_masks``) against a stable sort of
(|score| with NaN largest, flat index), ``channel_norms`` against
``torch.linalg.vector_norm`` in float64."""
import math
import random

import pytest
import torch

import fastprune
from fastprune.ops import channel_norms, global_unstructured_masks, unstructured_mask

from conftest import FLOAT_DTYPES, assert_bitwise_equal, select_oracle as oracle, tie_free

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
MASK_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bool, torch.int64, torch.uint8]


# ----------------------------------------------------------------------------
# Expected results
# ----------------------------------------------------------------------------

def expected_stride(scores, mask):
    """The result's strides: the mask's memory format, or the scores' when the
    mask is a stride-0 broadcast of one value."""
    if mask.numel() > 1 and all(s == 0 for s in mask.stride()):
        return torch.empty_like(scores, dtype=mask.dtype).stride()
    return torch.empty_like(mask).stride()


def check(scores, mask, **kw):
    """Runs the op, checks dtype, device, shape, strides and bits against the
    oracle, and that the inputs were not modified and the result is fresh."""
    s0, m0 = scores.clone(), mask.clone()
    out = unstructured_mask(scores, mask, **kw)
    exp = oracle(scores, mask, **kw)
    assert out.dtype == mask.dtype
    assert out.device == mask.device
    assert out.shape == mask.shape
    assert out.stride() == expected_stride(scores, mask)
    assert_bitwise_equal(out.cpu(), exp)
    assert_bitwise_equal(scores, s0)
    assert_bitwise_equal(mask, m0)
    if out.numel():
        assert out.data_ptr() != mask.data_ptr()
    return out


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def smallest_subnormal(dtype):
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps


def special_values(dtype):
    fi = torch.finfo(dtype)
    nan, sub = float("nan"), smallest_subnormal(dtype)
    return [nan, -nan, float("inf"), float("-inf"), 0.0, -0.0, fi.tiny / 4, -fi.tiny / 4,
            fi.smallest_normal, sub, -sub, fi.max, -fi.max, 1.0, -1.0, 1.0]


def make_scores(kind, shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    if kind == "tie_free":
        return tie_free(tuple(shape), dtype, seed)
    if kind == "ties":  # few distinct magnitudes, both signs
        return (torch.randint(-3, 4, (n,), generator=g).to(dtype) * 0.5).reshape(shape)
    if kind == "special":  # NaN, +-inf, +-0, denormals, extremes, mixed with ties
        vals = torch.tensor(special_values(dtype), dtype=dtype)
        pick = torch.randint(0, len(vals), (n,), generator=g)
        base = (torch.randint(-4, 5, (n,), generator=g).to(dtype) * 0.25)
        use = torch.rand(n, generator=g) < 0.6
        return torch.where(use, vals[pick], base).reshape(shape)
    raise ValueError(kind)


def make_mask(shape, dtype, seed=1, other_values=True):
    """0/1 mask, optionally with other values (2, -1, 0.5, 255) mixed in."""
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    m = torch.randint(0, 2, (n,), generator=g)
    if dtype == torch.bool:
        return m.bool().reshape(shape)
    if other_values:
        extras = {torch.uint8: [2, 255], torch.int64: [2, -1, 7]}.get(dtype, [2.0, -1.0, 0.5, -0.0])
        ex = torch.tensor(extras, dtype=torch.float64)[torch.randint(0, len(extras), (n,), generator=g)]
        m = torch.where(torch.rand(n, generator=g) < 0.3, ex, m.to(torch.float64))
    return m.to(dtype).reshape(shape)


AMOUNTS = [dict(count=0), dict(count=5), dict(fraction=0.37), dict(fraction=1.0)]


# ----------------------------------------------------------------------------
# Correctness against the oracle
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("only_ones", [False, True])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("score_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["tie_free", "ties", "special"])
def test_matches_oracle(kind, score_dtype, mask_dtype, only_ones, largest, device):
    scores = make_scores(kind, (7, 9), score_dtype).to(device)
    mask = make_mask((7, 9), mask_dtype).to(device)
    for amount in AMOUNTS:
        check(scores, mask, only_ones=only_ones, largest=largest, **amount)


@pytest.mark.parametrize("only_ones", [False, True])
@pytest.mark.parametrize("largest", [False, True])
def test_k_equals_candidates_prunes_every_candidate(only_ones, largest):
    scores = make_scores("special", (5, 8), torch.float32)
    mask = make_mask((5, 8), torch.float32)
    n = int((mask == 1).sum()) if only_ones else mask.numel()
    out = check(scores, mask, count=n, only_ones=only_ones, largest=largest)
    if only_ones:
        assert not (out == 1).any()
        torch.testing.assert_close(out[mask != 1], mask[mask != 1], rtol=0, atol=0, equal_nan=True)
    else:
        assert (out == 0).all()


@pytest.mark.parametrize("largest", [False, True])
def test_k_zero_is_a_fresh_copy(largest):
    scores = tie_free((4, 6))
    mask = make_mask((4, 6), torch.float32)
    for amount in (dict(count=0), dict(fraction=0.0), dict(fraction=0.01)):
        out = check(scores, mask, largest=largest, **amount)
        assert_bitwise_equal(out, mask)


@pytest.mark.parametrize("only_ones", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool, torch.int64], ids=str)
def test_count_above_candidates_raises(mask_dtype, only_ones):
    scores = tie_free((4, 5))
    mask = make_mask((4, 5), mask_dtype)
    n = int((mask == 1).sum()) if only_ones else mask.numel()
    check(scores, mask, count=n, only_ones=only_ones)
    with pytest.raises(ValueError, match="cannot prune"):
        unstructured_mask(scores, mask, count=n + 1, only_ones=only_ones)


# docs/behaviour.md §Amounts: Python round() on the float64 product (ties to even).
BANKERS = [(0.5, 5, 2), (0.5, 3, 2), (0.5, 1, 0), (0.25, 2, 0), (0.75, 2, 2), (0.45, 10, 4),
           (0.35, 10, 4), (0.15, 10, 2), (0.5, 7, 4), (0.4, 17, 7), (0.5, 2, 1), (0.5, 9, 4), (1.0, 13, 13)]


@pytest.mark.parametrize("fraction,n,k", BANKERS)
@pytest.mark.parametrize("only_ones", [False, True])
def test_fraction_rounds_half_to_even(fraction, n, k, only_ones):
    assert round(fraction * n) == k
    scores = tie_free((n + 3,))
    mask = torch.ones(n + 3)
    if only_ones:  # 3 non-candidates: the fraction counts candidates only
        mask[torch.tensor([0, n // 2 + 1, n + 2])] = 0
        candidates = mask.clone()
    else:
        scores, mask = scores[:n], mask[:n]
        candidates = mask
    out = check(scores, mask, fraction=fraction, only_ones=only_ones)
    assert int((candidates - out).sum()) == k


@pytest.mark.parametrize("fraction", [-0.1, 1.5, float("nan")])
def test_fraction_out_of_range_raises(fraction):
    with pytest.raises(RuntimeError, match="fraction"):
        unstructured_mask(tie_free((4,)), torch.ones(4), fraction=fraction)


def test_argument_errors():
    s, m = tie_free((3, 4)), torch.ones(3, 4)
    with pytest.raises(ValueError, match="exactly one of count and fraction"):
        unstructured_mask(s, m)
    with pytest.raises(ValueError, match="exactly one of count and fraction"):
        unstructured_mask(s, m, count=1, fraction=0.5)
    with pytest.raises(RuntimeError, match="same shape"):
        unstructured_mask(s, torch.ones(4, 3), count=1)
    with pytest.raises(RuntimeError, match="floating point"):
        unstructured_mask(torch.arange(12).reshape(3, 4), m, count=1)


# ----------------------------------------------------------------------------
# Special values and ties
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_nan_ranks_above_inf(dtype):
    nan, inf = float("nan"), float("inf")
    s = torch.tensor([nan, 1.0, -inf, -nan, 0.0, inf, -0.0, 2.0], dtype=dtype)
    m = torch.ones(8, dtype=dtype)
    # smallest first: +-0 (index order), 1, 2, -inf/inf (index order), NaNs last
    out = unstructured_mask(s, m, count=6)
    assert out.tolist() == [1, 0, 0, 1, 0, 0, 0, 0]
    out = unstructured_mask(s, m, count=7)
    assert out.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    # largest first: NaNs (index order), then the infinities
    out = unstructured_mask(s, m, count=3, largest=True)
    assert out.tolist() == [0, 1, 0, 0, 1, 1, 1, 1]
    check(s, m, count=3, largest=True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_negative_zero_ties_positive_zero_and_denormals_are_ordered(dtype):
    fi = torch.finfo(dtype)
    sub = smallest_subnormal(dtype)
    s = torch.tensor([3 * sub, -0.0, sub, 0.0, -2 * sub, fi.tiny, -0.0], dtype=dtype)
    assert s[0] != 0 and s[2] != 0, "denormals must not be flushed for this test"
    m = torch.ones(7, dtype=torch.bool)
    out = unstructured_mask(s, m, count=4)
    # zeros at 1, 3, 6 (index order), then the smallest denormal (index 2)
    assert out.tolist() == [True, False, False, False, True, True, False]
    out = unstructured_mask(s, m, count=2)
    assert out.tolist() == [True, False, True, False, True, True, True]


@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_ties_prune_lower_flat_index_first(dtype, largest):
    s = torch.tensor([[2.0, -1.0, 1.0], [1.0, -2.0, 2.0], [-1.0, 3.0, 2.0]], dtype=dtype)
    m = torch.ones(3, 3)
    out = unstructured_mask(s, m, count=2, largest=largest)
    # smallest: two of the four 1s (flat 1, 2, 3, 6); largest: the 3, then the first of the 2s
    exp = [[0, 1, 1], [1, 1, 1], [1, 0, 1]] if largest else [[1, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert out.tolist() == exp
    # the tie rule follows the logical (row-major) index, not memory order
    out_t = unstructured_mask(s.t().contiguous().t(), m, count=2, largest=largest)
    assert out_t.tolist() == exp


# ----------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------

SHAPE4 = (2, 3, 4, 5)


def layout(kind, t):
    """`t` (4-D) with the same values in another memory layout."""
    if kind == "contiguous":
        return t.contiguous()
    if kind == "transposed":  # dense, permuted strides
        return t.permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "sliced":  # non-dense: every other element of a larger tensor
        big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    raise ValueError(kind)


def layout_mask(kind, dtype):
    if kind == "broadcast_one":
        return torch.ones((), dtype=dtype).expand(SHAPE4)
    if kind == "broadcast_zero":
        return torch.zeros(1, 1, 1, 1, dtype=dtype).expand(SHAPE4)
    if kind == "partial_broadcast":
        return make_mask((1, 3, 1, 5), dtype, other_values=False).expand(SHAPE4)
    return layout(kind, make_mask(SHAPE4, dtype))


SCORE_LAYOUTS = ["contiguous", "transposed", "channels_last", "sliced"]
MASK_LAYOUTS = SCORE_LAYOUTS + ["broadcast_one", "broadcast_zero", "partial_broadcast"]


@pytest.mark.parametrize("only_ones", [False, True])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool], ids=str)
@pytest.mark.parametrize("score_dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("mask_layout", MASK_LAYOUTS)
@pytest.mark.parametrize("score_layout", SCORE_LAYOUTS)
def test_layouts(score_layout, mask_layout, score_dtype, mask_dtype, only_ones):
    scores = layout(score_layout, make_scores("ties", SHAPE4, score_dtype))
    mask = layout_mask(mask_layout, mask_dtype)
    n = int((mask == 1).sum()) if only_ones else mask.numel()
    for amount in (dict(count=0), dict(count=min(n, 17)), dict(fraction=0.5), dict(count=n)):
        check(scores, mask, only_ones=only_ones, **amount)
    if only_ones:
        with pytest.raises(ValueError):
            unstructured_mask(scores, mask, count=n + 1, only_ones=True)


def test_channels_last_mask_gives_channels_last_result():
    scores = tie_free(SHAPE4)
    mask = torch.ones(SHAPE4).contiguous(memory_format=torch.channels_last)
    out = check(scores, mask, fraction=0.5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    out = check(scores, torch.ones(()).expand(SHAPE4), fraction=0.5)
    assert out.is_contiguous()
    out = check(layout("channels_last", scores), torch.ones(()).expand(SHAPE4), fraction=0.5)
    assert out.is_contiguous(memory_format=torch.channels_last)


# ----------------------------------------------------------------------------
# Empty and 0-dim
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)])
@pytest.mark.parametrize("only_ones", [False, True])
def test_empty(shape, only_ones):
    for dtype in (torch.float32, torch.bool):
        mask = torch.ones(shape, dtype=dtype)
        for amount in (dict(count=0), dict(fraction=0.5), dict(fraction=1.0)):
            check(torch.empty(shape), mask, only_ones=only_ones, **amount)


def test_empty_count_above_candidates_raises():
    """There are 0 candidates, so count=1 is above them (the same contract as
    for non-empty inputs)."""
    with pytest.raises(ValueError, match="cannot prune"):
        unstructured_mask(torch.empty(0), torch.ones(0), count=1)


@pytest.mark.parametrize("mask_value", [1.0, 0.0, 2.0])
@pytest.mark.parametrize("only_ones", [False, True])
def test_zero_dim(mask_value, only_ones):
    scores = torch.tensor(-3.0)
    mask = torch.tensor(mask_value)
    n = int(mask_value == 1.0) if only_ones else 1
    for amount in (dict(count=0), dict(fraction=0.5), dict(fraction=1.0), dict(count=n)):
        out = check(scores, mask, only_ones=only_ones, **amount)
        assert out.dim() == 0
    with pytest.raises(ValueError):
        unstructured_mask(scores, mask, count=n + 1, only_ones=only_ones)


# ----------------------------------------------------------------------------
# Sizes that run several threads (> 2^15 elements) and every select path
# ----------------------------------------------------------------------------

def large_case(name):
    g = torch.Generator().manual_seed(7)
    n = 2 ** 17 + 333
    if name == "fp32_tie_free":
        return tie_free((n,), torch.float32, seed=3), torch.ones(n)
    if name == "fp32_one_bucket":  # every |score| in [1, 1 + 2^-7): same first 16-bit digit
        s = 1 + torch.randint(0, 2 ** 12, (n,), generator=g).to(torch.float32) * 2.0 ** -19
        return s * (torch.randint(0, 2, (n,), generator=g) * 2 - 1), torch.ones(n)
    if name == "fp64_one_bucket":
        s = 1 + torch.randint(0, 2 ** 20, (n,), generator=g).to(torch.float64) * 2.0 ** -30
        return s, torch.ones(n, dtype=torch.float64)
    if name == "fp16_ties":
        return torch.randn(n, generator=g).to(torch.float16), torch.ones(n, dtype=torch.float16)
    if name == "bf16_ties":
        return torch.randn(n, generator=g).to(torch.bfloat16), torch.ones(n, dtype=torch.bool)
    if name == "all_equal":
        return torch.full((n,), -1.5), torch.ones(n)
    if name == "half_masked_2d":
        s = torch.randint(-50, 50, (n // 7 * 7,), generator=g).to(torch.float32).reshape(-1, 7)[:, :5]
        m = torch.randint(0, 2, s.shape, generator=g).to(torch.uint8)
        return s, m
    if name == "special_large":
        return make_scores("special", (n,), torch.float32, seed=5), make_mask((n,), torch.float32)
    raise ValueError(name)


LARGE = ["fp32_tie_free", "fp32_one_bucket", "fp64_one_bucket", "fp16_ties", "bf16_ties",
         "all_equal", "half_masked_2d", "special_large"]


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(saved)


@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("case", LARGE)
def test_large_matches_oracle_for_any_thread_count(case, largest, threads):
    scores, mask = large_case(case)
    assert scores.numel() > 2 ** 15
    amounts = [dict(fraction=0.3), dict(count=1), dict(count=12345)]
    for amount in amounts:
        exp = oracle(scores, mask, only_ones=True, largest=largest, **amount)
        for nthreads in (1, 2, 3):
            threads(nthreads)
            out = unstructured_mask(scores, mask, only_ones=True, largest=largest, **amount)
            assert_bitwise_equal(out, exp)


def test_large_all_equal_prunes_first_k():
    n = 2 ** 16 + 5
    out = unstructured_mask(torch.full((n,), 0.25), torch.ones(n, dtype=torch.bool), count=40000)
    assert not out[:40000].any() and out[40000:].all()


# ----------------------------------------------------------------------------
# Registration: opcheck and torch.compile
# ----------------------------------------------------------------------------

def opcheck_samples():
    s4 = tie_free(SHAPE4)
    return {
        "f32_count": (tie_free((5, 6)), torch.ones(5, 6), 7, 0.0, False, False),
        "f16_fraction_only_ones": (tie_free((5, 6), torch.float16), make_mask((5, 6), torch.float16), -1, 0.5, True, False),
        "bf16_bool_largest": (tie_free((30,), torch.bfloat16), make_mask((30,), torch.bool), 4, 0.0, True, True),
        "f64_int64": (tie_free((3, 4), torch.float64), make_mask((3, 4), torch.int64), -1, 0.25, False, False),
        "channels_last": (layout("channels_last", s4), layout("channels_last", torch.ones(SHAPE4)), 10, 0.0, False, False),
        "transposed_uint8": (layout("transposed", s4), layout("transposed", make_mask(SHAPE4, torch.uint8)), 3, 0.0, True, False),
        "broadcast_mask": (layout("channels_last", s4), torch.ones(()).expand(SHAPE4), -1, 0.4, True, False),
        "empty": (torch.empty(0, 3), torch.ones(0, 3), 0, 0.0, False, False),
        "zero_dim": (torch.tensor(2.0), torch.tensor(1.0), 1, 0.0, False, False),
    }


@pytest.mark.parametrize("name", list(opcheck_samples()))
def test_opcheck(name):
    args = opcheck_samples()[name]
    torch.library.opcheck(torch.ops.fastprune.unstructured_mask.default, args)


def test_torch_compile():
    def f(scores, mask):
        new = unstructured_mask(scores, mask, fraction=0.5, only_ones=True)
        return new * scores

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    scores = tie_free((6, 7))
    mask = make_mask((6, 7), torch.float32, other_values=False)
    torch.testing.assert_close(compiled(scores, mask), f(scores, mask), rtol=0, atol=0)
    scores2 = tie_free((6, 7), seed=9)
    torch.testing.assert_close(compiled(scores2, mask), f(scores2, mask), rtol=0, atol=0)


# ----------------------------------------------------------------------------
# global_unstructured_masks: several tensors ranked as one concatenation
# ----------------------------------------------------------------------------

def global_oracle(scores, masks, **kw):
    """The single-tensor oracle on the flattened concatenation, split back."""
    cat_s = torch.cat([s.reshape(-1) for s in scores]) if scores else torch.empty(0)
    mask_dtype = torch.float64 if any(m.dtype != torch.bool for m in masks) else torch.bool
    cat_m = torch.cat([m.reshape(-1).to(mask_dtype) for m in masks]) if masks else torch.empty(0)
    flat = oracle(cat_s, cat_m, **kw)
    outs, start = [], 0
    for m in masks:
        outs.append(flat[start:start + m.numel()].reshape(m.shape).to(m.dtype))
        start += m.numel()
    return outs


def check_global(scores, masks, **kw):
    outs = global_unstructured_masks(scores, masks, **kw)
    exps = global_oracle(scores, masks, **kw)
    assert len(outs) == len(masks)
    for s, m, out, exp in zip(scores, masks, outs, exps):
        assert out.dtype == m.dtype and out.shape == m.shape
        assert out.stride() == expected_stride(s, m)
        assert_bitwise_equal(out, exp)
    return outs


def global_inputs(score_dtype, kind="ties"):
    shapes = [(4, 3, 3, 3), (7,), (5, 6), (), (2, 0)]
    scores = [make_scores(kind, sh, score_dtype, seed=i) for i, sh in enumerate(shapes)]
    scores[0] = layout("channels_last", scores[0])
    scores[2] = scores[2].t().contiguous().t()
    masks = [make_mask(shapes[0], torch.float32, seed=1).contiguous(memory_format=torch.channels_last),
             make_mask(shapes[1], torch.bool, seed=2),
             make_mask((6, 5), torch.int64, seed=3).t(),
             torch.tensor(1, dtype=torch.uint8),
             torch.ones(shapes[4], dtype=torch.float16)]
    return scores, masks


@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("only_ones", [False, True])
@pytest.mark.parametrize("score_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["tie_free", "ties", "special"])
def test_global_matches_oracle(kind, score_dtype, only_ones, largest):
    scores, masks = global_inputs(score_dtype, kind)
    for amount in AMOUNTS:
        check_global(scores, masks, only_ones=only_ones, largest=largest, **amount)
    n = sum(int((m == 1).sum()) if only_ones else m.numel() for m in masks)
    check_global(scores, masks, only_ones=only_ones, largest=largest, count=n)
    with pytest.raises(ValueError, match="cannot prune"):
        global_unstructured_masks(scores, masks, count=n + 1, only_ones=only_ones)


def test_global_ties_earlier_tensor_first():
    scores = [torch.full((2, 2), 0.5), torch.full((3,), -0.5), torch.full((2,), 0.5)]
    masks = [torch.ones(2, 2), torch.ones(3), torch.ones(2)]
    outs = global_unstructured_masks(scores, masks, count=5)
    assert [o.tolist() for o in outs] == [[[0, 0], [0, 0]], [0, 1, 1], [1, 1]]


def test_global_single_tensor_equals_unstructured_mask():
    s, m = make_scores("special", (6, 7), torch.float32), make_mask((6, 7), torch.float32)
    for amount in AMOUNTS:
        (out,) = global_unstructured_masks([s], [m], only_ones=True, **amount)
        assert_bitwise_equal(out, unstructured_mask(s, m, only_ones=True, **amount))


def test_global_empty_and_errors():
    with pytest.raises(ValueError, match="cannot prune"):
        global_unstructured_masks([torch.empty(0)], [torch.ones(0)], count=1)
    with pytest.raises(RuntimeError):
        global_unstructured_masks([tie_free((3,))], [torch.ones(3), torch.ones(3)], count=1)
    with pytest.raises(RuntimeError, match="one dtype"):
        global_unstructured_masks([tie_free((3,)), tie_free((3,), torch.float64)], [torch.ones(3)] * 2, count=1)
    with pytest.raises(RuntimeError, match="same shape"):
        global_unstructured_masks([tie_free((3,))], [torch.ones(4)], count=1)


@pytest.mark.parametrize("largest", [False, True])
def test_global_large_any_thread_count(largest, threads):
    g = torch.Generator().manual_seed(11)
    scores = [torch.randint(-300, 300, (n,), generator=g).to(torch.float32) for n in (40000, 7, 70001)]
    scores[1] = torch.full((7,), 2.0)
    masks = [torch.randint(0, 2, (n,), generator=g).to(dt) for n, dt in
             ((40000, torch.float32), (7, torch.bool), (70001, torch.uint8))]
    for amount in (dict(fraction=0.4), dict(count=33333)):
        exps = global_oracle(scores, masks, only_ones=True, largest=largest, **amount)
        for nthreads in (1, 2, 3):
            threads(nthreads)
            outs = global_unstructured_masks(scores, masks, only_ones=True, largest=largest, **amount)
            for out, exp in zip(outs, exps):
                assert_bitwise_equal(out, exp)


def test_global_opcheck():
    scores, masks = global_inputs(torch.float32)
    for args in ((scores, masks, -1, 0.5, True, False), (scores[:3], masks[:3], 9, 0.0, False, True)):
        torch.library.opcheck(torch.ops.fastprune.global_unstructured_masks.default, args)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", LARGE)
def test_cpu_equals_cuda(case):
    scores, mask = large_case(case)
    for largest in (False, True):
        cpu = unstructured_mask(scores, mask, fraction=0.3, only_ones=True, largest=largest)
        gpu = unstructured_mask(scores.cuda(), mask.cuda(), fraction=0.3, only_ones=True, largest=largest)
        assert_bitwise_equal(gpu.cpu(), cpu)


# ----------------------------------------------------------------------------
# channel_norms
# ----------------------------------------------------------------------------

NORM_PS = [1, 2, math.inf, -math.inf, 0, 3, 0.5, -1.5]


def norm_layouts(t):
    """`t` as contiguous, channels_last, a permuted view and a strided slice
    (the logical tensor is the same in every case but the slice)."""
    yield "contiguous", t
    yield "channels_last", t.contiguous(memory_format=torch.channels_last)
    yield "permuted", t.permute(2, 0, 3, 1).contiguous().permute(1, 3, 0, 2)
    yield "sliced", t[:, :, ::2]


@pytest.mark.parametrize("p", NORM_PS, ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_channel_norms_match_vector_norm(dtype, p):
    base = tie_free((5, 6, 4, 3), dtype, seed=11)
    base[1, 2] = 0  # zeros matter for p = 0 and negative p
    # Sums are float64; a general power of a non-float64 entry is taken in float.
    rtol = 1e-12 if dtype == torch.float64 or p in (0, 1, 2, math.inf, -math.inf) else 1e-6
    for layout, t in norm_layouts(base):
        for dim in range(-4, 4):
            reduced = [d for d in range(4) if d != dim % 4]
            expected = torch.linalg.vector_norm(t.to(torch.float64), ord=p, dim=reduced)
            got = channel_norms(t, dim, p)
            assert got.dtype == torch.float64 and got.shape == (t.shape[dim],), layout
            torch.testing.assert_close(got, expected, rtol=rtol, atol=0, msg=f"{layout} dim {dim}")


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_channel_norms_large_any_thread_count(threads):
    t = torch.randn(300, 257, 7, generator=torch.Generator().manual_seed(3))
    saved = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        for dim in range(3):
            for p in (2, math.inf, 0):
                reduced = [d for d in range(3) if d != dim]
                expected = torch.linalg.vector_norm(t.double(), ord=p, dim=reduced)
                torch.testing.assert_close(channel_norms(t, dim, p), expected, rtol=1e-12, atol=0)
    finally:
        torch.set_num_threads(saved)


def test_channel_norms_nan_and_inf():
    t = torch.ones(3, 4)
    t[0, 1] = float("nan")
    t[1, 2] = float("inf")
    for p in (1, 2, math.inf, -math.inf, 3):
        expected = torch.linalg.vector_norm(t.double(), ord=p, dim=[1])
        torch.testing.assert_close(channel_norms(t, 0, p), expected, equal_nan=True, rtol=0, atol=0)
    assert channel_norms(t, 0, 0).tolist() == [4.0, 4.0, 4.0]  # NaN counts as a non-zero


def test_channel_norms_errors():
    with pytest.raises(RuntimeError, match="floating point"):
        channel_norms(torch.ones(3, 4, dtype=torch.int64), 0, 2)
    with pytest.raises(RuntimeError, match="at least one dimension"):
        channel_norms(torch.tensor(1.0), 0, 2)
    with pytest.raises(IndexError):
        channel_norms(torch.ones(3, 4), 2, 2)


def test_channel_norms_opcheck():
    t = tie_free((4, 5, 3), torch.float32, seed=2)
    for args in ((t, 1, 2.0), (t.half().transpose(0, 2), -1, math.inf), (torch.empty(0, 3), 1, 1.0)):
        torch.library.opcheck(torch.ops.fastprune.channel_norms.default, args)


# ----------------------------------------------------------------------------
# cached_empty_like and the CPU block cache
# ----------------------------------------------------------------------------

@pytest.fixture
def small_blocks():
    """The block cache serving outputs from 1 MiB (restored after the test)."""
    old = fastprune.set_cache_limit(min_bytes=1 << 20)
    yield 1 << 20
    fastprune.set_cache_limit(old["limit_bytes"], min_bytes=old["min_bytes"])


def served():
    info = fastprune.cache_info()
    return info["hits"] + info["misses"]


LAYOUTS = {
    "contiguous": lambda: torch.ones(512, 1024),
    "channels_last": lambda: torch.ones(16, 64, 32, 16).to(memory_format=torch.channels_last),
    "transposed": lambda: torch.ones(1024, 512).t(),
    "not_dense": lambda: torch.ones(1024, 1024)[:, ::2],
    "empty": lambda: torch.ones(0, 1 << 20),
    "double": lambda: torch.ones(512, 512, dtype=torch.float64),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_cached_empty_like_has_empty_likes_layout(layout, small_blocks):
    t = LAYOUTS[layout]().requires_grad_(layout != "empty")
    before = served()
    out = fastprune.ops.cached_empty_like(t)
    ref = torch.empty_like(t)
    assert (out.shape, out.stride(), out.dtype, out.device) == (ref.shape, ref.stride(), ref.dtype, ref.device)
    assert not out.requires_grad
    assert served() == before + (t.numel() * t.element_size() >= small_blocks)
    out.fill_(3)  # the whole storage is writable
    assert bool((out == 3).all())


def test_a_freed_block_is_reused_and_a_live_one_never_shared(small_blocks):
    like = torch.ones(1 << 19)  # 2 MiB
    a = fastprune.ops.cached_empty_like(like).fill_(1)
    b = fastprune.ops.cached_empty_like(like).fill_(2)
    assert a.data_ptr() != b.data_ptr()
    ptr = a.data_ptr()
    del a
    hits = fastprune.cache_info()["hits"]
    c = fastprune.ops.cached_empty_like(like)
    assert fastprune.cache_info()["hits"] == hits + 1 and c.data_ptr() == ptr
    c.fill_(5)
    assert bool((b == 2).all())


def test_cache_limit_evicts_and_zero_turns_it_off(small_blocks):
    like = torch.ones(1 << 19)  # 2 MiB
    fastprune.empty_cache()
    old = fastprune.set_cache_limit(3 << 20)
    try:
        blocks = [fastprune.ops.cached_empty_like(like) for _ in range(3)]
        del blocks
        assert fastprune.cache_info()["cached_bytes"] == 2 << 20  # the oldest went
        assert fastprune.empty_cache() == 2 << 20
        assert fastprune.cache_info()["cached_bytes"] == 0
        fastprune.set_cache_limit(0)
        before = served()
        x = fastprune.ops.cached_empty_like(like)
        del x
        assert served() == before and fastprune.cache_info()["cached_bytes"] == 0
    finally:
        fastprune.set_cache_limit(old["limit_bytes"])


def test_kernel_outputs_come_from_the_cache(small_blocks):
    scores = tie_free((1 << 19,), torch.float32, seed=5)
    first = unstructured_mask(scores, torch.ones(1 << 19), count=1000)
    ptr = first.data_ptr()
    expected = first.clone()
    del first
    again = unstructured_mask(scores, torch.ones(1 << 19), count=1000)
    assert again.data_ptr() == ptr
    assert_bitwise_equal(again, expected)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_set_cache_limit_rejects_bad_values(bad):
    before = fastprune.cache_info()
    with pytest.raises(ValueError, match="non-negative int"):
        fastprune.set_cache_limit(bad)
    with pytest.raises(ValueError, match="non-negative int"):
        fastprune.set_cache_limit(min_bytes=bad)
    assert fastprune.cache_info()["limit_bytes"] == before["limit_bytes"]


def test_cached_empty_like_opcheck(small_blocks):
    for t in (torch.ones(5), torch.ones(1 << 20)[1:], torch.empty(0), torch.ones(3, 1 << 19).t()):
        # (the values are uninitialized, so only the schema and the fake kernel)
        torch.library.opcheck(torch.ops.fastprune.cached_empty_like.default, (t,),
                              test_utils=("test_schema", "test_faketensor"))


# ----------------------------------------------------------------------------
# radix_step: the descent's arithmetic for the cross-rank select
# ----------------------------------------------------------------------------

def reference_step(hist, digit, prefix, rank, dtype):
    """radix_step by cumsum and searchsorted (how _crossrank stepped before)."""
    bits = torch.finfo(dtype).bits
    cum = hist.cumsum(0)
    b = int(torch.searchsorted(cum, torch.tensor(rank)))
    top = bits - 11 * digit  # the digits above `digit` are the prefix's
    shift = max(0, bits - 11 * (digit + 1))
    key = (prefix >> top << top if digit else 0) | (b << shift)
    return key, rank - int(cum[b] - hist[b]), int(hist[b]), digit + 1 == fastprune.ops.pass_digits(dtype)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_radix_step_matches_a_cumsum_search(dtype):
    g, rng = torch.Generator().manual_seed(11), random.Random(11)
    bits = torch.finfo(dtype).bits
    for digit in range(fastprune.ops.pass_digits(dtype)):
        for sparse in (False, True):
            hist = torch.randint(0, 5, (2048,), generator=g, dtype=torch.int64)
            if sparse:
                hist *= torch.rand(2048, generator=g) < 0.01
            hist[-1] += 1  # the last bin, and at least one key
            if digit == 0:
                hist[1024:] = 0  # keys clear the sign bit: the first digit is below 1024
                hist[1023] += 1
            total = int(hist.sum())
            prefix = rng.randrange(2 ** (bits - 1))  # keys clear the sign bit
            for rank in {1, 2, total // 3 + 1, total // 2, total - 1, total} & set(range(1, total + 1)):
                got = fastprune.ops.radix_step(hist, digit, prefix, rank, dtype)
                assert tuple(got) == reference_step(hist, digit, prefix, rank, dtype), (digit, rank)
                assert 1 <= got.rank <= got.count


def test_radix_step_descent_equals_the_one_call_select():
    from fastprune.ops import masks_at_threshold, radix_histogram, radix_step
    scores = [tie_free((300,), torch.float32, seed=3), torch.randn(500).round()]  # many ties
    masks = [torch.ones(300), make_mask((500,), torch.float32)]
    n = int(sum((m == 1).sum() for m in masks))
    for k in (1, n // 2, n):
        step, d = radix_step(radix_histogram(scores, masks, 0, 0, only_ones=True), 0, 0, k, torch.float32), 0
        while not step.last:
            d += 1
            hist = radix_histogram(scores, masks, d, step.prefix, only_ones=True)
            step = radix_step(hist, d, step.prefix, step.rank, torch.float32)
        got = masks_at_threshold(scores, masks, step.prefix, take=step.rank, only_ones=True)
        want = global_unstructured_masks(scores, masks, count=k, only_ones=True)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), k


def test_radix_step_rejects_bad_arguments():
    hist = torch.zeros(2048, dtype=torch.int64)
    hist[3] = 5
    step = torch.ops.fastprune.radix_step
    for rank in (0, 6, -1):
        with pytest.raises(RuntimeError, match="rank must lie in"):
            step(hist, 0, 0, rank, torch.float32)
    with pytest.raises(RuntimeError, match="digit must lie in"):
        step(hist, 3, 0, 1, torch.float32)  # float32 keys have 3 digits
    with pytest.raises(RuntimeError, match="key must lie in"):
        step(hist, 1, 2 ** 16, 1, torch.float16)
    with pytest.raises(RuntimeError, match="2048 int64 counts"):
        step(hist[:100], 0, 0, 1, torch.float32)
    with pytest.raises(RuntimeError, match="2048 int64 counts"):
        step(hist.to(torch.int32), 0, 0, 1, torch.float32)
    with pytest.raises(RuntimeError, match="non-negative"):
        step(torch.cat([hist[:-1], torch.tensor([-1])]), 0, 0, 1, torch.float32)
    hist[1024] = 1  # the sign bit: no key lies there
    with pytest.raises(RuntimeError, match="no key"):
        step(hist, 0, 0, 6, torch.float16)
    with pytest.raises(NotImplementedError, match="radix_step"):
        step(hist, 0, 0, 1, torch.int32)


def test_radix_step_opcheck_and_no_tracing():
    hist = torch.zeros(2048, dtype=torch.int64)
    hist[7], hist[900] = 4, 2
    for args in [(hist, 0, 0, 5, torch.float32), (hist, 5, 12345, 6, torch.float64), (hist, 1, 1 << 12, 1, torch.bfloat16)]:
        # (its result is data-dependent: no fake kernel, so nothing to trace)
        torch.library.opcheck(torch.ops.fastprune.radix_step.default, args,
                              test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
    with FakeTensorMode(), pytest.raises(DataDependentOutputException):
        torch.ops.fastprune.radix_step(torch.zeros(2048, dtype=torch.int64), 0, 0, 1, torch.float32)
