"""The CUDA kernels against the CPU kernels: bit for bit for both select ops,
to float64 rounding for channel_norms (the additions go in another order).

Every case is a builder ``make(device)`` returning the op's tensor arguments on
``device``: values are drawn once on the CPU (seeded generators), moved to the
device, and only then given their layout (permuted, sliced, broadcast), so the
two runs see the same values in the same layouts. The CPU kernel is checked
against a pure-PyTorch oracle in test_ops.py; here the CUDA result must equal
it in device, dtype, shape, strides and bits.
"""
import math

import pytest
import torch

import fastprune
from fastprune.ops import channel_norms, global_unstructured_masks, unstructured_mask

from conftest import FLOAT_DTYPES, assert_bitwise_equal
from test_ops import AMOUNTS, MASK_DTYPES, make_mask, make_scores

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TILE = 4096  # elements per tile (and block) of the CUDA kernels: kTile in passes_cuda.cu


# ----------------------------------------------------------------------------
# Runner
# ----------------------------------------------------------------------------

def flat_tensors(args):
    """The tensors among `args`, lists flattened."""
    out = []
    for a in args:
        out += a if isinstance(a, (list, tuple)) else [a]
    return out


def compare(make, op=unstructured_mask, **kw):
    """Runs ``op(*make(device), **kw)`` on the CPU and on the GPU; the results
    (one tensor, or a list) must agree in dtype, shape, strides and bits, the
    GPU ones must be fresh CUDA tensors, and the GPU inputs unchanged. Returns
    the CPU result."""
    cpu = op(*make("cpu"), **kw)
    args = make("cuda")
    before = [t.clone() for t in flat_tensors(args)]
    gpu = op(*args, **kw)
    for t, t0 in zip(flat_tensors(args), before):
        assert_bitwise_equal(t, t0)
    cpus, gpus = ([cpu], [gpu]) if isinstance(cpu, torch.Tensor) else (cpu, gpu)
    assert len(gpus) == len(cpus)
    for c, g in zip(cpus, gpus):
        assert g.device.type == "cuda"
        assert g.stride() == c.stride(), (g.stride(), c.stride())
        assert_bitwise_equal(g.cpu(), c)
        if g.numel():
            assert all(g.data_ptr() != t.data_ptr() for t in flat_tensors(args))
    return cpu


def compare_error(make, op=unstructured_mask, **kw):
    """Both devices raise the same exception type with the same message."""
    with pytest.raises(Exception) as cpu:
        op(*make("cpu"), **kw)
    with pytest.raises(cpu.type) as gpu:
        op(*make("cuda"), **kw)
    assert str(gpu.value) == str(cpu.value)


def laid_out(t, device, layout="contiguous"):
    """CPU tensor `t` moved to `device`, then given `layout`."""
    t = t.to(device)
    if layout == "contiguous":
        return t
    if layout == "transposed":  # dense, reversed strides
        dims = list(reversed(range(t.dim())))
        return t.permute(dims).contiguous().permute(dims)
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":  # not dense: every other element of a larger tensor
        big = t.new_zeros(t.shape[:-1] + (2 * t.shape[-1],))
        big[..., ::2] = t
        return big[..., ::2]
    raise ValueError(layout)


def broadcast(value, dtype, shape, device):
    """One value expanded to `shape` (all strides 0)."""
    return torch.full((), value, dtype=dtype, device=device).expand(shape)


def test_cuda_kernels_are_registered():
    assert fastprune.build_info()["cuda_kernels"], (
        f"fastprune was built without CUDA kernels ({fastprune.build_info()}); "
        "rebuild with `pip install --no-build-isolation -e .` where nvcc is found")


# ----------------------------------------------------------------------------
# unstructured_mask
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(7, 9), (3, 4099)], ids=["one_tile", "four_tiles"])
@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("only_ones", [False, True])
@pytest.mark.parametrize("mask_dtype", MASK_DTYPES, ids=str)
@pytest.mark.parametrize("score_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["tie_free", "ties", "special"])
def test_matches_cpu(kind, score_dtype, mask_dtype, only_ones, largest, shape):
    scores, mask = make_scores(kind, shape, score_dtype), make_mask(shape, mask_dtype)
    for amount in AMOUNTS:
        compare(lambda d: (scores.to(d), mask.to(d)), only_ones=only_ones, largest=largest, **amount)


@pytest.mark.parametrize("n", [1, 255, 257, TILE - 1, TILE, TILE + 1, 3 * TILE + 1, 5 * TILE + 123])
def test_equal_scores_prune_the_first_k(n):
    """All scores tie, so the tie rule alone decides: exactly the first k go,
    with k on and around tile boundaries."""
    for k in sorted({1, n // 2, n - 1, n, min(n, TILE - 1), min(n, TILE), min(n, TILE + 1)}):
        out = compare(lambda d: (torch.full((n,), -0.5, device=d), torch.ones(n, device=d)), count=k)
        assert not out[:k].any() and out[k:].all()


@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("score_dtype", FLOAT_DTYPES, ids=str)
def test_ties_with_only_ones_across_tiles(score_dtype, largest):
    """Few distinct values over many tiles, half the entries not candidates."""
    n = 7 * TILE + 1000
    g = torch.Generator().manual_seed(3)
    scores = (torch.randint(-3, 4, (n,), generator=g) * 0.25).to(score_dtype)
    mask = torch.randint(0, 2, (n,), generator=g).to(torch.uint8)
    for amount in (dict(count=1), dict(count=TILE + 5), dict(fraction=0.3), dict(fraction=0.77)):
        compare(lambda d: (scores.to(d), mask.to(d)), only_ones=True, largest=largest, **amount)


@pytest.mark.parametrize("largest", [False, True])
def test_nan_payloads_infinities_zeros_denormals(largest):
    """Keys come from the raw bits: NaN payloads and signs order the NaNs, -0
    ties +0, denormals are not flushed."""
    bits = [0x7FC00000, 0xFFC00000, 0x7FC00001, 0x7F800001, 0xFF800000, 0x7F800000, 0x00000000,
            0x80000000, 0x00000001, 0x80000001, 0x007FFFFF, 0x3F800000, 0xBF800000, 0x7F7FFFFF]
    values = torch.tensor([b - 2 ** 32 if b >= 2 ** 31 else b for b in bits], dtype=torch.int32).view(torch.float32)
    scores = values.repeat(700)[torch.randperm(9800, generator=torch.Generator().manual_seed(0))]
    mask = torch.ones(scores.shape, dtype=torch.bool)
    for k in (1, 700, 4000, 9100, 9799, 9800):
        compare(lambda d: (scores.to(d), mask.to(d)), count=k, largest=largest)
        for dtype in (torch.float64, torch.float16, torch.bfloat16):
            compare(lambda d: (scores.to(dtype).to(d), mask.to(d)), count=k, largest=largest)


SCORE_LAYOUTS = ["contiguous", "transposed", "channels_last", "sliced"]
MASK_LAYOUTS = SCORE_LAYOUTS + ["broadcast_one", "broadcast_zero", "partial_broadcast"]


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (4, 8, 33, 40)], ids=["small", "multi_tile"])
@pytest.mark.parametrize("only_ones", [False, True])
@pytest.mark.parametrize("mask_layout", MASK_LAYOUTS)
@pytest.mark.parametrize("score_layout", SCORE_LAYOUTS)
def test_layouts(score_layout, mask_layout, only_ones, shape):
    scores = make_scores("ties", shape, torch.float32)
    base_mask = make_mask(shape, torch.float32)
    partial = make_mask((1, shape[1], 1, shape[3]), torch.float32, other_values=False)

    def make(d):
        if mask_layout == "broadcast_one":
            mask = broadcast(1.0, torch.float32, shape, d)
        elif mask_layout == "broadcast_zero":
            mask = broadcast(0.0, torch.float32, shape, d)
        elif mask_layout == "partial_broadcast":
            mask = partial.to(d).expand(shape)
        else:
            mask = laid_out(base_mask, d, mask_layout)
        return laid_out(scores, d, score_layout), mask

    n = int((make("cpu")[1] == 1).sum()) if only_ones else scores.numel()
    for amount in (dict(count=0), dict(count=min(n, 17)), dict(fraction=0.5), dict(count=n)):
        compare(make, only_ones=only_ones, **amount)
    compare_error(make, only_ones=only_ones, count=n + 1)


@pytest.mark.parametrize("only_ones", [False, True])
def test_empty_and_zero_dim(only_ones):
    for shape in [(0,), (2, 0, 3)]:
        for amount in (dict(count=0), dict(fraction=0.5), dict(fraction=1.0)):
            compare(lambda d: (torch.empty(shape, device=d), torch.ones(shape, device=d)),
                    only_ones=only_ones, **amount)
    for mask_value in (1.0, 0.0, 2.0):
        for amount in (dict(count=0), dict(fraction=0.5), dict(fraction=1.0)):
            compare(lambda d: (torch.tensor(-3.0, device=d), torch.tensor(mask_value, device=d)),
                    only_ones=only_ones, **amount)


def test_errors_match_cpu():
    s, m = make_scores("ties", (4, 5), torch.float32), make_mask((4, 5), torch.float32)
    n_ones = int((m == 1).sum())
    compare_error(lambda d: (s.to(d), m.to(d)), count=21)
    compare_error(lambda d: (s.to(d), m.to(d)), count=n_ones + 1, only_ones=True)
    compare_error(lambda d: (torch.empty(0, device=d), torch.ones(0, device=d)), count=1)
    compare_error(lambda d: (s.to(d), m.to(d)), fraction=1.5)
    compare_error(lambda d: (s.to(d), m.to(d)), fraction=float("nan"))
    compare_error(lambda d: (s.to(d), torch.ones(5, 4, device=d)), count=1)
    compare_error(lambda d: (torch.arange(20, device=d).reshape(4, 5), m.to(d)), count=1)
    compare_error(lambda d: (s.to(d), m.to(torch.complex64).to(d)), count=1)


def test_scores_and_mask_on_different_devices_raise():
    s, m = make_scores("ties", (4, 5), torch.float32), make_mask((4, 5), torch.float32)
    with pytest.raises(RuntimeError, match="same device"):
        unstructured_mask(s.cuda(), m, count=1)
    with pytest.raises(RuntimeError, match="same device"):
        unstructured_mask(s, m.cuda(), count=1)


def test_runs_on_the_current_stream():
    scores, mask = make_scores("ties", (5, 3000), torch.float16), make_mask((5, 3000), torch.bool)
    expected = unstructured_mask(scores, mask, fraction=0.4, only_ones=True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        s, m = scores.cuda(), mask.cuda()
        out = unstructured_mask(s, m, fraction=0.4, only_ones=True)
    side.synchronize()
    assert_bitwise_equal(out.cpu(), expected)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_tensors_on_another_gpu():
    scores, mask = make_scores("ties", (5, 3000), torch.float32), make_mask((5, 3000), torch.float32)
    with torch.cuda.device(0):
        out = unstructured_mask(scores.to("cuda:1"), mask.to("cuda:1"), fraction=0.4, only_ones=True)
    assert out.device == torch.device("cuda:1")
    assert_bitwise_equal(out.cpu(), unstructured_mask(scores, mask, fraction=0.4, only_ones=True))


def test_opcheck():
    shape = (2, 3, 4, 5)
    s = make_scores("ties", shape, torch.float32).cuda()
    samples = [
        (s, make_mask(shape, torch.float32).cuda(), 7, 0.0, False, False),
        (s.half(), make_mask(shape, torch.bool).cuda(), -1, 0.5, True, True),
        (laid_out(s.cpu(), "cuda", "channels_last"), broadcast(1, torch.uint8, shape, "cuda"), -1, 0.4, True, False),
        (torch.empty(0, 3, device="cuda"), torch.ones(0, 3, device="cuda"), 0, 0.0, False, False),
    ]
    for args in samples:
        torch.library.opcheck(torch.ops.fastprune.unstructured_mask.default, args)
    torch.library.opcheck(
        torch.ops.fastprune.global_unstructured_masks.default,
        ([s, s[0]], [samples[0][1], broadcast(1.0, torch.float64, s[0].shape, "cuda")], 11, 0.0, False, False))


# ----------------------------------------------------------------------------
# global_unstructured_masks
# ----------------------------------------------------------------------------

GLOBAL_SHAPES = [(64, 65), (0,), (), (TILE - 1,), (3, 4099), (1,), (TILE + 1,), (9, 0)]
GLOBAL_MASK_DTYPES = [torch.float32, torch.bool, torch.float16, torch.uint8, torch.float64, torch.int64,
                      torch.float32, torch.bool]


@pytest.mark.parametrize("largest", [False, True])
@pytest.mark.parametrize("only_ones", [False, True])
@pytest.mark.parametrize("score_dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("kind", ["ties", "special"])
def test_global_matches_cpu(kind, score_dtype, only_ones, largest):
    """Mixed shapes (tile boundaries, empty, 0-dim), mixed mask dtypes, a
    non-contiguous score and a broadcast mask; ties across tensors."""
    scores = [make_scores(kind, sh, score_dtype, seed=i) for i, sh in enumerate(GLOBAL_SHAPES)]
    masks = [make_mask(sh, dt, seed=i) for i, (sh, dt) in enumerate(zip(GLOBAL_SHAPES, GLOBAL_MASK_DTYPES))]

    def make(d):
        s = [t.to(d) for t in scores]
        m = [t.to(d) for t in masks]
        s[0] = laid_out(scores[0], d, "transposed")
        m[4] = broadcast(1.0, torch.float32, GLOBAL_SHAPES[4], d)
        return s, m

    for amount in AMOUNTS + [dict(count=TILE + 3)]:
        compare(make, global_unstructured_masks, only_ones=only_ones, largest=largest, **amount)


def test_global_ties_follow_list_order():
    """Equal scores in three tensors: ties go in list order, then flat order."""
    sizes = [5000, 3, 9000]

    def make(d):
        return [torch.full((n,), 2.0, device=d) for n in sizes], [torch.ones(n, dtype=torch.bool, device=d) for n in sizes]

    outs = compare(make, global_unstructured_masks, count=5002)
    assert not outs[0].any() and outs[1].tolist() == [False, False, True] and outs[2].all()
    outs = compare(make, global_unstructured_masks, count=5103)
    assert not outs[0].any() and not outs[1].any()
    assert not outs[2][:100].any() and outs[2][100:].all()


def test_global_many_small_tensors():
    g = torch.Generator().manual_seed(11)
    sizes = torch.randint(0, 300, (500,), generator=g).tolist()
    scores = [make_scores("ties", (n,), torch.float32, seed=i) for i, n in enumerate(sizes)]
    masks = [make_mask((n,), torch.bool, seed=i) for i, n in enumerate(sizes)]
    for amount in (dict(count=1), dict(fraction=0.5), dict(fraction=1.0)):
        for only_ones in (False, True):
            compare(lambda d: ([t.to(d) for t in scores], [t.to(d) for t in masks]),
                    global_unstructured_masks, only_ones=only_ones, **amount)


def test_global_errors():
    s = [make_scores("ties", (4, 5), torch.float32), make_scores("ties", (3,), torch.float32)]
    m = [make_mask((4, 5), torch.float32), make_mask((3,), torch.bool)]
    compare_error(lambda d: ([t.to(d) for t in s], [t.to(d) for t in m]), global_unstructured_masks, count=24)
    compare_error(lambda d: ([s[0].to(d), s[1].double().to(d)], [t.to(d) for t in m]),
                  global_unstructured_masks, count=1)
    compare_error(lambda d: ([t.to(d) for t in s], [m[0].to(d)]), global_unstructured_masks, count=1)
    with pytest.raises(RuntimeError, match="device"):
        global_unstructured_masks([s[0].cuda(), s[1]], [m[0].cuda(), m[1]], count=1)


# ----------------------------------------------------------------------------
# Beyond 32-bit indices
# ----------------------------------------------------------------------------

def need_gpu_memory(nbytes):
    free, _ = torch.cuda.mem_get_info()
    if free < nbytes * 1.2:
        pytest.skip(f"needs {nbytes / 2**30:.1f} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


@pytest.mark.slow
@pytest.mark.parametrize("n", [2 ** 31 + 3 * TILE + 5, 2 ** 32 + 2 * TILE + 3], ids=["2^31", "2^32"])
def test_huge_equal_scores_prune_the_first_k(n):
    """k lands mid-tile past 2^31 (2^32): 64-bit indices and histogram counts,
    tie quotas beyond 32 bits. The mask is a broadcast, so it costs nothing."""
    need_gpu_memory(3 * n)  # float16 scores + bool result
    scores = torch.full((n,), -0.75, dtype=torch.float16, device="cuda")
    mask = broadcast(True, torch.bool, (n,), "cuda")
    k = n - TILE - 77
    out = unstructured_mask(scores, mask, count=k)
    assert out.shape == (n,) and out.dtype == torch.bool
    assert not out[:k].any()
    assert out[k:].all()


@pytest.mark.slow
def test_huge_random_matches_cpu():
    n = 2 ** 31 + 12345
    need_gpu_memory(6 * n)  # float16 scores, bool mask, bool result, temporaries
    g = torch.Generator(device="cuda").manual_seed(0)
    scores = torch.randn(n, dtype=torch.float16, device="cuda", generator=g)
    mask = torch.randint(0, 10, (n,), dtype=torch.uint8, device="cuda", generator=g) != 0
    out = unstructured_mask(scores, mask, fraction=0.3, only_ones=True)
    expected = unstructured_mask(scores.cpu(), mask.cpu(), fraction=0.3, only_ones=True)
    assert torch.equal(out.cpu(), expected)


@pytest.mark.slow
def test_huge_global_ties_cross_tensors():
    """The second tensor starts past 2^31 in the concatenation."""
    n = 2 ** 31 + 1
    need_gpu_memory(3 * n)
    a = torch.full((n,), 2.0, dtype=torch.float16, device="cuda")
    b = torch.full((TILE + 3,), -2.0, dtype=torch.float16, device="cuda")
    masks = [broadcast(True, torch.bool, (n,), "cuda"), torch.ones(TILE + 3, dtype=torch.bool, device="cuda")]
    out_a, out_b = global_unstructured_masks([a, b], masks, count=n + 10)
    assert not out_a.any()
    assert not out_b[:10].any() and out_b[10:].all()


# ----------------------------------------------------------------------------
# channel_norms
# ----------------------------------------------------------------------------

@pytest.mark.parametrize("p", [1, 2, math.inf, -math.inf, 0, 3, -1.5], ids=str)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_channel_norms_match_cpu(dtype, p):
    t = make_scores("special", (6, 300, 5, 7), dtype)
    # CUDA's powf and glibc's may differ in the last bits of a general power.
    rtol = 1e-12 if dtype == torch.float64 or p in (0, 1, 2, math.inf, -math.inf) else 1e-6
    for layout in ("contiguous", "channels_last", "sliced"):
        x = laid_out(t, "cuda", layout)
        for dim in range(4):
            expected = channel_norms(x.cpu(), dim, p)
            torch.testing.assert_close(channel_norms(x, dim, p).cpu(), expected, rtol=rtol, atol=0,
                                       equal_nan=True, msg=f"{layout} dim {dim}")


def test_channel_norms_opcheck():
    t = make_scores("ties", (4, 5, 3), torch.float32).cuda()
    for args in ((t, 1, 2.0), (t.half().transpose(0, 2), -1, math.inf), (torch.empty(0, 3, device="cuda"), 1, 1.0)):
        torch.library.opcheck(torch.ops.fastprune.channel_norms.default, args)
