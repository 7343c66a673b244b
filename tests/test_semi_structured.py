"""N:M semi-structured and per-channel exact-k pruning (L1SemiStructured,
ChannelwiseL1Unstructured, and their op fastprune.ops.segmented_mask).

Every mask is compared bit for bit with `segment_oracle`, a plain sort-based
implementation: each segment (a group of m entries along the dim, or a whole
slice) is ordered by a stable sort of its live entries by magnitude (NaN
last, lower index first among equals), and its first k are pruned.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as REF

import fastprune.prune as FAST
from fastprune.ops import segmented_mask

from conftest import FLOAT_DTYPES, assert_bitwise_equal, assert_same_snapshot, select_oracle, snapshot, tie_free



# ----------------------------------------------------------------------------
# Oracle
# ----------------------------------------------------------------------------

def _rows(t, dim, group):
    """`t` as a 2-D copy, one segment per row, in row-major order inside each."""
    if group == 0:
        return t.movedim(dim, 0).reshape(t.shape[dim], -1).clone()
    return t.movedim(dim, -1).reshape(-1, group).clone()


def _unrows(rows, like, dim, group):
    if group == 0:
        return rows.reshape(like.movedim(dim, 0).shape).movedim(0, dim)
    return rows.reshape(like.movedim(dim, -1).shape).movedim(-1, dim)


def segment_oracle(scores, mask, dim, group=0, count=None, fraction=None, keep=False):
    """What segmented_mask must return, by stable sorts of every segment."""
    s = _rows(scores.detach().cpu().to(torch.float64), dim, group)
    m = _rows(mask.detach().cpu(), dim, group)
    nan = torch.isnan(s)
    mag = torch.where(nan, torch.zeros_like(s), s.abs())
    live = m == 1
    order = torch.sort(mag, dim=1, stable=True).indices
    for late in (nan, ~live):  # NaN after every number, dead entries after every live one
        order = order.gather(1, torch.sort(late.gather(1, order).to(torch.uint8), dim=1, stable=True).indices)
    nlive = live.sum(1)
    if keep:
        k = (nlive - count).clamp(min=0)
    elif count is not None:
        k = torch.full_like(nlive, count)
    else:
        k = torch.tensor([round(fraction * int(n)) for n in nlive], dtype=nlive.dtype)
    if bool((k > nlive).any()):
        raise ValueError("cannot prune more than the live entries")
    pruned_sorted = torch.arange(s.shape[1]) < k[:, None]
    pruned = torch.zeros_like(live).scatter_(1, order, pruned_sorted)
    out = m.masked_fill(pruned, 0)
    return _unrows(out, mask, dim, group)


def nm_oracle(scores, mask, n, m, dim=-1):
    return segment_oracle(scores, mask, dim, m, count=n, keep=True)


def channel_oracle(scores, mask, amount, dim=0):
    if isinstance(amount, int):
        return segment_oracle(scores, mask, dim, 0, count=amount)
    return segment_oracle(scores, mask, dim, 0, fraction=amount)


# ----------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------

def make_values(kind, shape, dtype, seed=0):
    """tie_free: distinct magnitudes; ties: values from a tiny set (heavy ties,
    +-0 included); special: ties plus NaN and +-inf."""
    if kind == "tie_free":
        return tie_free(shape, dtype, seed)
    g = torch.Generator().manual_seed(seed)
    n = torch.Size(shape).numel()
    if kind == "ties":
        pool = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, 0.5])
    else:
        pool = torch.tensor([0.0, 1.0, -1.0, float("nan"), float("inf"), -float("inf"), 3.0])
    return pool[torch.randint(0, len(pool), (n,), generator=g)].reshape(shape).to(dtype)


def make_live(shape, dtype, seed=1, dead=0.3):
    """A 0/1 mask with about `dead` of its entries 0."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) >= dead).to(dtype)


def laid_out(t, layout):
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "transposed":
        dims = list(reversed(range(t.dim())))
        return t.permute(dims).contiguous().permute(dims)
    if layout == "sliced":  # not dense
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    raise ValueError(layout)


# ----------------------------------------------------------------------------
# The op against the oracle
# ----------------------------------------------------------------------------

OP_CASES = [  # shape, dim, group, amount
    ((6, 16), -1, 4, dict(count=2, keep=True)),
    ((6, 16), -1, 4, dict(count=1, keep=True)),
    ((6, 16), -1, 4, dict(count=0, keep=True)),
    ((5, 24), 1, 8, dict(count=3, keep=True)),
    ((12, 5), 0, 4, dict(count=2, keep=True)),
    ((3, 8, 2, 2), 1, 4, dict(count=2, keep=True)),
    ((4, 6, 40), 2, 20, dict(count=7, keep=True)),
    ((4, 66), 1, 33, dict(count=10, keep=True)),
    ((7, 9), 0, 0, dict(fraction=0.5)),
    ((7, 9), 1, 0, dict(fraction=0.37)),
    ((9, 50), 0, 0, dict(fraction=0.5)),
    ((3, 130), 0, 0, dict(fraction=0.61)),
    ((3, 130), 0, 0, dict(count=17)),
    ((4, 3, 5, 5), 0, 0, dict(fraction=0.3)),
    ((4, 3, 5, 5), 2, 0, dict(fraction=1.0)),
    ((64, 3), 1, 0, dict(fraction=0.5)),
]


def _call(scores, mask, dim, group, amount):
    return segmented_mask(scores, mask, dim=dim, group=group, **amount)


def _expected(scores, mask, dim, group, amount):
    amount = dict(amount)
    return segment_oracle(scores, mask, dim, group, **amount)


OP_GRID = [pytest.param(case, kind, dtype, id=f"{case}-{kind}-{str(dtype)[6:]}")
           for case in range(len(OP_CASES)) for kind in ("tie_free", "ties", "special") for dtype in FLOAT_DTYPES]


@pytest.mark.parametrize("case,kind,dtype", OP_GRID)
def test_op_matches_oracle(case, kind, dtype):
    shape, dim, group, amount = OP_CASES[case]
    scores = make_values(kind, shape, dtype, seed=case)
    for mask in (torch.ones(shape, dtype=dtype), make_live(shape, dtype, seed=case),
                 torch.ones((), dtype=dtype).expand(shape)):
        out = _call(scores, mask, dim, group, amount)
        assert_bitwise_equal(out, _expected(scores, mask, dim, group, amount).to(out.dtype))
        assert out.data_ptr() != mask.data_ptr()


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.uint8, torch.int64, torch.float16, torch.float64], ids=str)
def test_op_mask_dtypes_keep_other_values(mask_dtype):
    """Entries that are not 1 are not live and keep their value (2, -1, ...)."""
    shape = (8, 32)
    scores = make_values("ties", shape, torch.float32)
    mask = make_live(shape, mask_dtype)
    if mask_dtype != torch.bool:
        mask[0, :5] = torch.tensor([2, 3, 2, 7, 0], dtype=mask_dtype)
    for dim, group, amount in ((-1, 4, dict(count=2, keep=True)), (0, 0, dict(fraction=0.5))):
        out = _call(scores, mask, dim, group, amount)
        assert out.dtype == mask_dtype
        assert torch.equal(out, _expected(scores, mask, dim, group, amount))


@pytest.mark.parametrize("layout", ["channels_last", "transposed", "sliced"])
@pytest.mark.parametrize("dim,group,amount", [(1, 4, dict(count=2, keep=True)), (-1, 2, dict(count=1, keep=True)),
                                              (0, 0, dict(fraction=0.5)), (1, 0, dict(count=3))])
def test_op_layouts(layout, dim, group, amount):
    shape = (4, 8, 3, 6)
    scores = make_values("ties", shape, torch.float32, seed=3)
    mask = make_live(shape, torch.float32, seed=4)
    expected = _expected(scores, mask, dim, group, amount)
    for s, m in ((laid_out(scores, layout), mask), (scores, laid_out(mask, layout)),
                 (laid_out(scores, layout), laid_out(mask, layout))):
        out = _call(s, m, dim, group, amount)
        assert torch.equal(out, expected)
        assert out.stride() == torch.empty_like(m).stride()


def test_op_long_rows_and_many_segments():
    """Rows long enough for the histogram path, with the threshold bin
    crowded by ties, and many groups per parallel chunk."""
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(33, 5000, generator=g)
    scores[::3] = scores[::3].round()  # heavy ties in every third row
    mask = make_live(scores.shape, torch.float32)
    for amount in (dict(fraction=0.5), dict(count=1000), dict(fraction=1.0), dict(count=0)):
        assert torch.equal(_call(scores, mask, 0, 0, amount), _expected(scores, mask, 0, 0, amount))
    big = torch.randn(300, 4096, generator=g).to(torch.bfloat16)
    assert torch.equal(_call(big, torch.ones_like(big), -1, 4, dict(count=2, keep=True)),
                       nm_oracle(big, torch.ones_like(big), 2, 4))


def test_op_empty_and_errors():
    out = segmented_mask(torch.empty(0, 8), torch.empty(0, 8), dim=-1, group=4, count=2, keep=True)
    assert out.shape == (0, 8)
    out = segmented_mask(torch.empty(3, 0), torch.empty(3, 0), dim=0, count=0)
    assert out.shape == (3, 0)
    s, m = tie_free((4, 6)), torch.ones(4, 6)
    with pytest.raises(ValueError, match=r"size of dim 1 \(6\) must be a multiple of the group size 4"):
        segmented_mask(s, m, dim=1, group=4, count=2, keep=True)
    with pytest.raises(ValueError, match="cannot prune 7 entries of segment 0, which has 6 live"):
        segmented_mask(s, m, dim=0, count=7)
    m[2, :3] = 0
    with pytest.raises(ValueError, match="cannot prune 4 entries of segment 2, which has 3 live"):
        segmented_mask(s, m, dim=0, count=4)
    with pytest.raises(IndexError):
        segmented_mask(s, m, dim=2, count=1)
    with pytest.raises(IndexError, match="at least one dimension"):
        segmented_mask(torch.tensor(1.0), torch.tensor(1.0), dim=0, count=0)
    with pytest.raises(ValueError, match="fraction"):
        segmented_mask(s, m, dim=0, fraction=1.5)
    with pytest.raises(RuntimeError, match="same shape"):
        segmented_mask(s, torch.ones(6, 4), dim=0, count=1)


def opcheck_samples():
    s = tie_free((4, 8))
    return {
        "nm": (s, torch.ones(4, 8), -1, 4, 2, 0.0, True),
        "nm_bool_dim0": (s, make_live((4, 8), torch.bool), 0, 2, 1, 0.0, True),
        "nm_broadcast": (s, torch.ones(()).expand(4, 8), 1, 8, 3, 0.0, True),
        "channel_fraction": (s.to(torch.bfloat16), make_live((4, 8), torch.bfloat16), 0, 0, -1, 0.5, False),
        "channel_count_cl": (tie_free((2, 3, 4, 4)).contiguous(memory_format=torch.channels_last),
                             torch.ones(2, 3, 4, 4).contiguous(memory_format=torch.channels_last), 0, 0, 5, 0.0, False),
    }


@pytest.mark.parametrize("name", list(opcheck_samples()))
def test_opcheck(name):
    torch.library.opcheck(torch.ops.fastprune.segmented_mask.default, opcheck_samples()[name])


def test_compiles():
    f = torch.compile(lambda s, m: segmented_mask(s, m, dim=-1, group=4, count=2, keep=True), fullgraph=True)
    s = tie_free((8, 16))
    assert torch.equal(f(s, torch.ones(8, 16)), nm_oracle(s, torch.ones(8, 16), 2, 4))


# ----------------------------------------------------------------------------
# The prune API
# ----------------------------------------------------------------------------

def linear(shape=(8, 16), dtype=torch.float32, kind="tie_free", seed=0):
    m = nn.Linear(shape[1], shape[0]).to(dtype)
    with torch.no_grad():
        m.weight.copy_(make_values(kind, shape, dtype, seed))
    return m


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["tie_free", "ties"])
def test_l1_semi_structured_first_prune(kind, dtype):
    m = linear((8, 32), dtype, kind)
    w = m.weight.detach().clone()
    hook = FAST.l1_semi_structured(m, "weight") and m._forward_pre_hooks
    mask = m.weight_mask
    assert mask.dtype == dtype and mask.shape == w.shape
    assert torch.equal(mask, nm_oracle(w, torch.ones_like(w), 2, 4).to(dtype))
    assert ((mask.view(-1, 4) != 0).sum(1) == 2).all()
    assert_bitwise_equal(m.weight, (mask * w))
    assert isinstance(next(iter(hook.values())), FAST.L1SemiStructured)
    assert m.weight_orig is not None and "weight" not in m._parameters
    FAST.remove(m, "weight")
    assert torch.equal(m.weight, mask * w)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["tie_free", "ties", "special"])
@pytest.mark.parametrize("amount", [0.5, 0.3, 3, 0.0, 1.0])
def test_channelwise_first_prune(amount, kind, dtype):
    m = linear((6, 20), dtype, kind)
    w = m.weight.detach().clone()
    FAST.channelwise_l1_unstructured(m, "weight", amount=amount)
    assert torch.equal(m.weight_mask, channel_oracle(w, torch.ones_like(w), amount).to(dtype))
    k = amount if isinstance(amount, int) else round(amount * 20)
    assert ((m.weight_mask == 0).sum(1) == k).all()


@pytest.mark.parametrize("dim", [0, 1, -1, 2])
def test_channelwise_dims_on_conv(dim):
    conv = nn.Conv2d(4, 6, 3)
    with torch.no_grad():
        conv.weight.copy_(make_values("ties", conv.weight.shape, torch.float32))
    w = conv.weight.detach().clone()
    FAST.channelwise_l1_unstructured(conv, "weight", amount=0.4, dim=dim)
    assert torch.equal(conv.weight_mask, channel_oracle(w, torch.ones_like(w), 0.4, dim))


def test_importance_scores_are_ranked_not_the_weight():
    m = linear((4, 16))
    scores = tie_free((4, 16), seed=9)
    FAST.l1_semi_structured(m, "weight", importance_scores=scores)
    assert torch.equal(m.weight_mask, nm_oracle(scores, torch.ones(4, 16), 2, 4))
    m2 = linear((4, 16))
    FAST.channelwise_l1_unstructured(m2, "weight", amount=0.5, importance_scores=scores)
    assert torch.equal(m2.weight_mask, channel_oracle(scores, torch.ones(4, 16), 0.5))


@pytest.mark.parametrize("layout", ["channels_last", "transposed"])
def test_layouts_through_the_api(layout):
    conv = nn.Conv2d(8, 4, 2)
    with torch.no_grad():
        conv.weight.copy_(make_values("ties", conv.weight.shape, torch.float32))
    conv.weight = nn.Parameter(laid_out(conv.weight.detach(), layout))
    w = conv.weight.detach().clone()
    FAST.l1_semi_structured(conv, "weight", n=1, m=4, dim=1)
    assert conv.weight_mask.stride() == torch.ones_like(w).stride()
    expected = nm_oracle(w, torch.ones_like(w), 1, 4, dim=1)
    assert torch.equal(conv.weight_mask, expected)
    FAST.channelwise_l1_unstructured(conv, "weight", amount=0.5, dim=0)
    assert conv.weight_mask.stride() == torch.ones_like(w).stride()
    assert torch.equal(conv.weight_mask, channel_oracle(w, expected, 0.5, 0))


def test_iterative_channelwise_counts_live_entries_per_slice():
    m = linear((5, 40), kind="ties")
    w = m.weight.detach().clone()
    FAST.channelwise_l1_unstructured(m, "weight", amount=0.5)
    first = m.weight_mask.clone()
    FAST.channelwise_l1_unstructured(m, "weight", amount=0.5)
    assert torch.equal(m.weight_mask, channel_oracle(w, first, 0.5))
    assert ((m.weight_mask != 0).sum(1) == 10).all()
    assert isinstance(m._forward_pre_hooks[next(iter(m._forward_pre_hooks))], FAST.PruningContainer)
    FAST.channelwise_l1_unstructured(m, "weight", amount=10)  # every live entry of every row
    assert (m.weight_mask == 0).all()


COMPOSITIONS = {
    "l1_then_channelwise": [("l1_unstructured", dict(amount=0.3)), ("channelwise_l1_unstructured", dict(amount=0.5))],
    "channelwise_then_l1": [("channelwise_l1_unstructured", dict(amount=0.25)), ("l1_unstructured", dict(amount=0.4))],
    "l1_then_nm": [("l1_unstructured", dict(amount=0.6)), ("l1_semi_structured", dict())],
    "nm_then_l1": [("l1_semi_structured", dict()), ("l1_unstructured", dict(amount=0.5))],
    "nm_then_ln": [("l1_semi_structured", dict(n=1, m=2)), ("ln_structured", dict(amount=2, n=2, dim=0))],
    "ln_then_nm": [("ln_structured", dict(amount=2, n=1, dim=0)), ("l1_semi_structured", dict())],
    "custom_then_nm": [("custom_from_mask", "mask"), ("l1_semi_structured", dict(n=1, m=4))],
    "nm_then_custom": [("l1_semi_structured", dict()), ("custom_from_mask", "mask")],
    "random_then_channelwise": [("random_unstructured", dict(amount=0.3)),
                                ("channelwise_l1_unstructured", dict(amount=1, dim=1))],
    "nm_then_channelwise_then_nm": [("l1_semi_structured", dict(n=3, m=4)),
                                    ("channelwise_l1_unstructured", dict(amount=0.5)),
                                    ("l1_semi_structured", dict(n=1, m=2))],
    "identity_then_nm": [("identity", dict()), ("l1_semi_structured", dict())],
}


def _expected_step(name, kwargs, w, old):
    """The mask after one more prune of weight `w` whose mask is `old`."""
    if name == "l1_semi_structured":
        return nm_oracle(w, old, kwargs.get("n", 2), kwargs.get("m", 4))
    if name == "channelwise_l1_unstructured":
        return channel_oracle(w, old, kwargs["amount"], kwargs.get("dim", 0))
    if name == "l1_unstructured":
        return select_oracle(w, old, fraction=kwargs["amount"], only_ones=True)
    return None  # the reference's own methods: compared with the reference below


@pytest.mark.parametrize("name", list(COMPOSITIONS))
def test_composition_with_other_methods(name):
    """Each step prunes only what earlier ones left: checked against the
    oracle on the previous mask, and the reference methods' steps against
    torch.nn.utils.prune applied to the same previous state."""
    m = linear((8, 16), kind="tie_free", seed=5)
    w = m.weight.detach().clone()
    custom = make_live((8, 16), torch.float32, seed=7)
    old = torch.ones_like(w)
    for step, kwargs in COMPOSITIONS[name]:
        if kwargs == "mask":
            kwargs = dict(mask=custom)
        ref_twin = None
        if _expected_step(step, kwargs, w, old) is None and step != "random_unstructured":
            ref_twin = linear((8, 16), kind="tie_free", seed=5)
            REF.custom_from_mask(ref_twin, "weight", old)
            getattr(REF, step)(ref_twin, "weight", **kwargs)
        getattr(FAST, step)(m, "weight", **kwargs)
        new = m.weight_mask
        expected = _expected_step(step, kwargs, w, old)
        if expected is not None:
            assert torch.equal(new, expected), step
        elif ref_twin is not None:
            assert torch.equal(new, ref_twin.weight_mask), step
        assert bool(((new != 0) <= (old != 0)).all()), f"{step} revived an entry"
        old = new.clone()
    hooks = FAST.pruning_hooks(m) if hasattr(FAST, "pruning_hooks") else list(m._forward_pre_hooks.values())
    assert len(hooks) == 1
    assert torch.equal(m(torch.ones(1, 16)), torch.ones(1, 16) @ (old * w).T + m.bias)


def test_explicit_container_members():
    m = linear((4, 16))
    w = m.weight.detach().clone()
    members = [FAST.L1Unstructured(0.25), FAST.L1SemiStructured(1, 4)]
    for member in members:
        member._tensor_name = "weight"
    c = FAST.PruningContainer(*members)
    after_l1 = select_oracle(w, torch.ones_like(w), fraction=0.25)
    assert torch.equal(c.compute_mask(w, after_l1), nm_oracle(w, after_l1, 1, 4))


def test_2_4_pattern_for_to_sparse_semi_structured_on_cpu():
    """What torch.sparse.to_sparse_semi_structured reads: at most 2 nonzeros in
    every aligned group of 4 of a row, and every kept value unchanged."""
    for dtype in (torch.float16, torch.bfloat16):
        m = linear((64, 128), dtype, kind="ties")
        w = m.weight.detach().clone()
        FAST.l1_semi_structured(m, "weight")
        pruned = m.weight.detach()
        assert int((pruned.view(64, -1, 4) != 0).sum(-1).max()) <= 2
        kept = m.weight_mask != 0
        assert torch.equal(pruned[kept], w[kept])
        assert ((m.weight_mask.view(64, -1, 4) != 0).sum(-1) == 2).all()


def test_meta_parameters():
    m = nn.Linear(16, 8, device="meta")
    FAST.l1_semi_structured(m, "weight")
    FAST.channelwise_l1_unstructured(m, "weight", amount=0.5)
    assert m.weight_mask.device.type == "meta" and m.weight_mask.shape == (8, 16)


def test_complex_parameter():
    m = nn.Linear(8, 2).to(torch.complex64)
    with torch.no_grad():
        m.weight.copy_(tie_free((2, 8)) + 1j * tie_free((2, 8), seed=3))
    w = m.weight.detach().clone()
    FAST.l1_semi_structured(m, "weight")
    FAST.channelwise_l1_unstructured(m, "weight", amount=1)
    step1 = nm_oracle(w.abs(), torch.ones(2, 8), 2, 4)
    assert torch.equal(m.weight_mask.real, channel_oracle(w.abs(), step1, 1))


# ----------------------------------------------------------------------------
# Errors: clear, and the module untouched
# ----------------------------------------------------------------------------

def _pruned_once():
    m = linear((4, 16))
    FAST.l1_unstructured(m, "weight", amount=0.25)
    return m


ERRORS = [
    ("n_equals_m", lambda m: FAST.l1_semi_structured(m, "weight", n=4, m=4), ValueError, "0 <= n < m"),
    ("n_negative", lambda m: FAST.l1_semi_structured(m, "weight", n=-1), ValueError, "0 <= n < m"),
    ("n_float", lambda m: FAST.l1_semi_structured(m, "weight", n=2.0), TypeError, "Invalid type for n"),
    ("n_bool", lambda m: FAST.l1_semi_structured(m, "weight", n=True), TypeError, "Invalid type for n"),
    ("m_str", lambda m: FAST.l1_semi_structured(m, "weight", m="4"), TypeError, "Invalid type for m"),
    ("m_zero", lambda m: FAST.l1_semi_structured(m, "weight", n=0, m=0), ValueError, "0 <= n < m"),
    ("dim_float", lambda m: FAST.l1_semi_structured(m, "weight", dim=1.0), TypeError, "Invalid type for dim"),
    ("not_multiple", lambda m: FAST.l1_semi_structured(m, "weight", m=3), ValueError,
     r"size of dim -1 \(16\) must be a multiple of m=3"),
    ("not_multiple_dim0", lambda m: FAST.l1_semi_structured(m, "weight", dim=0, m=8), ValueError, "multiple of m=8"),
    ("nm_dim_out_of_range", lambda m: FAST.l1_semi_structured(m, "weight", dim=2), IndexError, "Invalid index 2"),
    ("channel_amount_negative", lambda m: FAST.channelwise_l1_unstructured(m, "weight", amount=-1),
     ValueError, "amount=-1"),
    ("channel_amount_above_one", lambda m: FAST.channelwise_l1_unstructured(m, "weight", amount=1.5),
     ValueError, "amount=1.5"),
    ("channel_amount_str", lambda m: FAST.channelwise_l1_unstructured(m, "weight", amount="0.5"),
     TypeError, "Invalid type for amount"),
    ("channel_amount_too_large", lambda m: FAST.channelwise_l1_unstructured(m, "weight", amount=17),
     ValueError, "amount=17 should be smaller than the number of parameters to prune=16"),
    ("channel_amount_above_live", lambda m: FAST.channelwise_l1_unstructured(m, "weight", amount=16),
     ValueError, "which has .* live entries"),
    ("channel_dim_out_of_range", lambda m: FAST.channelwise_l1_unstructured(m, "weight", amount=0.5, dim=3),
     IndexError, "Invalid index 3"),
    ("global", lambda m: FAST.global_unstructured([(m, "weight")], FAST.L1SemiStructured, n=2, m=4),
     TypeError, "cannot rank several tensors"),
    ("global_channelwise", lambda m: FAST.global_unstructured([(m, "weight")], FAST.ChannelwiseL1Unstructured,
                                                              amount=0.5), TypeError, "cannot rank several"),
]


@pytest.mark.parametrize("name", [e[0] for e in ERRORS])
def test_errors_leave_the_module_untouched(name):
    _, call, exc, match = next(e for e in ERRORS if e[0] == name)
    fresh = [] if name == "channel_amount_above_live" else [linear((4, 16))]  # 16 of 16 is fine there
    for m in fresh + [_pruned_once()]:
        before = snapshot(m)
        with pytest.raises(exc, match=match):
            call(m)
        assert_same_snapshot(before, snapshot(m))


def test_inside_a_reference_container_is_refused():
    m = linear((4, 16))
    REF.l1_unstructured(m, "weight", amount=0.25)
    REF.l1_unstructured(m, "weight", amount=0.25)  # a torch PruningContainer now
    before = snapshot(m)
    with pytest.raises(TypeError, match="torch.nn.utils.prune.PruningContainer"):
        FAST.l1_semi_structured(m, "weight")
    assert_same_snapshot(before, snapshot(m))


def test_after_a_reference_method_composes():
    m = linear((4, 16))
    REF.l1_unstructured(m, "weight", amount=0.25)
    old = m.weight_mask.clone()
    FAST.l1_semi_structured(m, "weight")
    assert torch.equal(m.weight_mask, nm_oracle(m.weight_orig.detach(), old, 2, 4))
    assert isinstance(list(m._forward_pre_hooks.values())[0], FAST.PruningContainer)


def test_replaced_compute_mask_is_called():
    """A compute_mask replaced on the class runs instead of the kernel."""
    m = linear((4, 16))
    calls = []

    def mine(self, t, default_mask):
        calls.append(t.shape)
        return default_mask.clone()

    orig = FAST.L1SemiStructured.compute_mask
    FAST.L1SemiStructured.compute_mask = mine
    try:
        FAST.l1_semi_structured(m, "weight")
    finally:
        FAST.L1SemiStructured.compute_mask = orig
    assert calls == [(4, 16)] and (m.weight_mask == 1).all()


# ----------------------------------------------------------------------------
# CUDA (skipped without a GPU): CPU == CUDA bit for bit
# ----------------------------------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@cuda
@pytest.mark.parametrize("case,kind,dtype", OP_GRID)
def test_cuda_matches_cpu(case, kind, dtype):
    shape, dim, group, amount = OP_CASES[case]
    scores = make_values(kind, shape, dtype, seed=case)
    for mask in (make_live(shape, dtype, seed=case), torch.ones((), dtype=dtype).expand(shape),
                 make_live(shape, torch.bool, seed=case)):
        cpu = _call(scores, mask, dim, group, amount)
        gpu = _call(scores.cuda(), mask.cuda(), dim, group, amount)
        assert gpu.device.type == "cuda" and gpu.stride() == cpu.stride()
        assert_bitwise_equal(gpu.cpu(), cpu)


@cuda
def test_cuda_long_rows_and_errors():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(40, 5000, generator=g)
    scores[::3] = scores[::3].round()
    mask = make_live(scores.shape, torch.float32)
    for amount in (dict(fraction=0.5), dict(count=1000), dict(fraction=1.0)):
        assert_bitwise_equal(_call(scores.cuda(), mask.cuda(), 0, 0, amount).cpu(), _call(scores, mask, 0, 0, amount))
    with pytest.raises(ValueError, match="cannot prune 4000 entries of segment 0"):
        _call(scores.cuda(), mask.cuda(), 0, 0, dict(count=4000))


@cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_to_sparse_semi_structured_keeps_every_value(dtype):
    from torch.sparse import to_sparse_semi_structured
    m = linear((128, 256), dtype, kind="tie_free").cuda()
    FAST.l1_semi_structured(m, "weight")
    dense = m.weight.detach().contiguous()
    sparse = to_sparse_semi_structured(dense)
    assert torch.equal(sparse.to_dense(), dense)
