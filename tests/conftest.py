"""Shared helpers for the fastprune test suite.

`REF` is ``torch.nn.utils.prune`` (the reference), `FAST` is ``fastprune.prune``.
Differential tests run the same call through both on identical, tie-free
inputs and compare the resulting module state exactly.

`LIBS["fast"]` is fastprune as the differential tests reach it: the direct
import, or (under the `fast_impl` fixture's "patched" case) torch's own module
with ``fastprune.patch()`` on. Loop over the libraries with `each_lib()`,
which turns the patch on around the fastprune side only, so the reference
side always runs unpatched, first.
"""
import contextlib
import math
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as REF

import fastprune
import fastprune.prune as FAST

LIBS = {"ref": REF, "fast": FAST}


def lib_context(key):
    """The context in which `LIBS[key]` computes as it should: patched for
    fastprune reached through torch's module, else nothing."""
    return fastprune.patched() if key == "fast" and LIBS["fast"] is REF else contextlib.nullcontext()


def each_lib():
    """`(key, lib)` for the reference, then fastprune; the loop body runs in
    `lib_context(key)`."""
    for key, lib in list(LIBS.items()):
        with lib_context(key):
            yield key, lib


@pytest.fixture(params=["direct", "patched"])
def fast_impl(request):
    """Runs a differential test twice: with fastprune imported directly, and
    with fastprune reached as ``torch.nn.utils.prune`` under ``fastprune.patch()``."""
    LIBS["fast"] = REF if request.param == "patched" else FAST
    try:
        yield request.param
    finally:
        LIBS["fast"] = FAST
        leaked = fastprune.is_patched()
        fastprune.unpatch()
        assert not leaked, "the test left torch.nn.utils.prune patched"

FLOAT_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

# The largest n for which every integer 1..n is exact in the dtype.
_EXACT_INTS = {torch.float32: 2 ** 24, torch.float64: 2 ** 53, torch.float16: 2 ** 11, torch.bfloat16: 2 ** 8}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def tie_free(shape, dtype=torch.float32, seed=0):
    """A tensor of `shape` whose magnitudes are all distinct and non-zero.

    A random permutation of a ladder of distinct positive values (exact
    multiples of a power of two while the dtype can hold them, else consecutive
    representable numbers), with random signs. Deterministic in `seed`; does
    not touch the global RNG.
    """
    g = _gen(seed)
    n = math.prod(shape)
    perm = torch.randperm(n, generator=g)
    if n <= _EXACT_INTS[dtype]:
        scale = 2.0 ** -max(1, math.ceil(math.log2(n + 1)))
        mag = ((perm + 1).to(torch.float64) * scale).to(dtype)
    else:  # consecutive representable values upward from a small normal number
        assert dtype in (torch.float16, torch.bfloat16), "ladder fallback is for half types"
        base = torch.tensor(2.0 ** -10, dtype=dtype).view(torch.int16)
        mag = (base + perm.to(torch.int16)).view(dtype)
        assert torch.isfinite(mag).all()
    sign = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    return (mag * sign.to(dtype)).reshape(shape)


def channel_separated(shape, dim, dtype=torch.float32, seed=0):
    """Tie-free values in which every slice along `dim` gets a contiguous block
    of the sorted magnitudes (blocks assigned to channels in random order), so
    that channel norms for any p > 0 and p = -inf are strictly ordered with a
    wide margin, whatever the dtype's rounding."""
    g = _gen(seed)
    dim = dim % len(shape)
    nch = shape[dim]
    per = math.prod(shape) // nch
    flat = tie_free((math.prod(shape),), dtype, seed).abs().to(torch.float64).sort().values
    blocks = flat.reshape(nch, per)[torch.randperm(nch, generator=g)]
    blocks = blocks[:, torch.randperm(per, generator=g)]
    sign = (torch.randint(0, 2, blocks.shape, generator=g) * 2 - 1).to(torch.float64)
    moved = [nch] + [s for i, s in enumerate(shape) if i != dim]
    out = (blocks * sign).reshape(moved).movedim(0, dim).contiguous()
    return out.to(dtype)


def with_channel_zeros(t, dim):
    """Copy of `t` in which channel c (along `dim`) has a distinct number of
    zeros (random positions), so that L0 norms (count of non-zeros) differ."""
    t = t.clone()
    moved = t.movedim(dim, 0)
    g = _gen(123)
    counts = torch.randperm(moved.shape[0], generator=g)
    flat = moved.reshape(moved.shape[0], -1)
    assert flat.shape[1] > moved.shape[0], "need more entries per channel than channels"
    for c in range(moved.shape[0]):
        idx = torch.randperm(flat.shape[1], generator=g)[: int(counts[c])]
        flat[c, idx] = 0
    return flat.reshape(moved.shape).movedim(0, dim).contiguous()


def fill_tie_free(module, seed=0):
    """Overwrites every parameter of `module` (recursively) with values that are
    tie-free across all of them together (one permutation split over the
    parameters), so global pruning is unambiguous too."""
    params = list(module.parameters())
    total = sum(p.numel() for p in params)
    for p in params:
        assert total <= _EXACT_INTS[p.dtype], f"{total} values cannot be tie-free in {p.dtype}"
    values = tie_free((total,), torch.float64, seed)
    with torch.no_grad():
        start = 0
        for p in params:
            p.copy_(values[start:start + p.numel()].view(p.shape))
            start += p.numel()
    return module


def assert_bitwise_equal(a, b):
    """Same dtype, shape and bits (distinguishes -0.0 from +0.0, NaN payloads)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.device == b.device, (a.device, b.device)
    if a.device.type == "meta":  # no values to compare
        return
    if a.is_floating_point():
        ibits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        a, b = a.view(ibits), b.view(ibits)
    assert torch.equal(a, b), f"\n{a}\n!=\n{b}"


def assert_mask_equal(a, b):
    """Masks compared exactly: dtype, shape and values (rtol=0, atol=0)."""
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def select_oracle(scores, mask, count=None, fraction=None, only_ones=False, largest=False):
    """Reference result of unstructured_mask, computed with a stable sort.

    Candidates (all entries, or those with mask == 1) are ordered by |score|
    (NaN above +inf; -0.0 == +0.0), descending when `largest`, and ties by
    increasing row-major flat index; the first k are set to 0.
    """
    s = scores.detach().cpu().reshape(-1).to(torch.float64)
    m = mask.detach().cpu().reshape(-1).clone()
    nan = torch.isnan(s)
    mag = torch.where(nan, torch.zeros_like(s), s.abs())
    cand = (m == 1) if only_ones else torch.ones_like(s, dtype=torch.bool)
    idx = torch.nonzero(cand).reshape(-1)
    n = idx.numel()
    k = count if count is not None else round(fraction * n)
    if k > n:
        raise ValueError(f"cannot prune {k} of {n}")
    key_mag, key_nan = mag[idx], nan[idx]
    if largest:
        key_mag, key_nan = -key_mag, ~key_nan
    order = torch.sort(key_mag, stable=True).indices
    order = order[torch.sort(key_nan[order].to(torch.uint8), stable=True).indices]
    m[idx[order[:k]]] = 0
    return m.reshape(mask.shape)


# ----------------------------------------------------------------------------
# Hooks and module state
# ----------------------------------------------------------------------------

def pruning_hooks(module):
    """[(key, hook)] for the pruning hooks of `module`, in hook order."""
    return [(k, h) for k, h in module._forward_pre_hooks.items() if isinstance(h, REF.BasePruningMethod)]


def hook_summary(module):
    """Library-independent description of a module's forward pre-hooks, in
    order: class name, tensor name and, for containers, the contents."""
    out = []
    for h in module._forward_pre_hooks.values():
        entry = (type(h).__name__, getattr(h, "_tensor_name", None))
        if isinstance(h, REF.PruningContainer):
            entry += (tuple(type(m).__name__ for m in h),)
        out.append(entry)
    return out


def _tensor_record(t):
    if t is None:
        return None
    return {
        "id": id(t), "cls": type(t).__name__, "dtype": t.dtype, "shape": tuple(t.shape),
        "stride": t.stride(), "requires_grad": t.requires_grad, "value": t.detach().clone(),
    }


def snapshot(module):
    """Everything about `module` (and its submodules) that pruning touches:
    parameter and buffer names, order, ids, dtypes, strides and values, plain
    tensor attributes (the cached pruned tensors), the forward pre-hooks (keys,
    order, object ids, classes, tensor names, container contents) and the
    non-persistent buffer set."""
    snap = {}
    for mname, m in module.named_modules():
        hooks = []
        for k, h in m._forward_pre_hooks.items():
            rec = (k, id(h), type(h).__name__, getattr(h, "_tensor_name", "<unset>"))
            if isinstance(h, REF.PruningContainer):
                rec += (tuple(id(x) for x in h),)
            hooks.append(rec)
        snap[mname] = {
            "parameters": [(n, _tensor_record(p)) for n, p in m._parameters.items()],
            "buffers": [(n, _tensor_record(b)) for n, b in m._buffers.items()],
            "attributes": [(n, _tensor_record(v)) for n, v in sorted(vars(m).items()) if isinstance(v, torch.Tensor)],
            "hooks": hooks,
            "non_persistent": sorted(m._non_persistent_buffers_set),
        }
    return snap


def assert_same_snapshot(before, after):
    """Two snapshots of the same module are identical (values bit for bit)."""
    assert before.keys() == after.keys()
    for mname in before:
        b, a = before[mname], after[mname]
        assert a["hooks"] == b["hooks"], f"{mname}: hooks changed"
        assert a["non_persistent"] == b["non_persistent"]
        for kind in ("parameters", "buffers", "attributes"):
            assert [n for n, _ in a[kind]] == [n for n, _ in b[kind]], f"{mname}: {kind} names/order changed"
            for (n, rb), (_, ra) in zip(b[kind], a[kind]):
                if rb is None or ra is None:
                    assert rb is ra, f"{mname}.{n}"
                    continue
                vb, va = rb.pop("value"), ra.pop("value")
                assert ra == rb, f"{mname}.{n}: {kind} metadata changed"
                assert_bitwise_equal(va, vb)
                rb["value"], ra["value"] = vb, va


def assert_same_pruned_state(ref_module, fast_module, autograd=True):
    """A module pruned by the reference and its twin pruned by fastprune agree
    on everything a user can observe (object ids aside). `autograd=False`
    skips whether the cached pruned tensors require grad."""
    ref_mods, fast_mods = dict(ref_module.named_modules()), dict(fast_module.named_modules())
    assert ref_mods.keys() == fast_mods.keys()
    for mname, r in ref_mods.items():
        f = fast_mods[mname]
        assert list(f._parameters) == list(r._parameters), f"{mname}: parameter order"
        assert list(f._buffers) == list(r._buffers), f"{mname}: buffer order"
        for n in r._parameters:
            rp, fp = r._parameters[n], f._parameters[n]
            assert type(fp) is type(rp)
            if rp is None:
                continue
            assert fp.requires_grad == rp.requires_grad
            assert_bitwise_equal(fp.detach(), rp.detach())
        for n in r._buffers:
            rb, fb = r._buffers[n], f._buffers[n]
            assert_mask_equal(fb, rb)
            assert fb.stride() == rb.stride(), f"{mname}.{n}: strides {fb.stride()} vs {rb.stride()}"
            assert not fb.requires_grad
        assert hook_summary(f) == hook_summary(r), f"{mname}: hooks"
        rattrs = {n for n, v in vars(r).items() if isinstance(v, torch.Tensor)}
        fattrs = {n for n, v in vars(f).items() if isinstance(v, torch.Tensor)}
        assert fattrs == rattrs, f"{mname}: cached attributes {fattrs} vs {rattrs}"
        for n in rattrs:
            rv, fv = getattr(r, n), getattr(f, n)
            assert not isinstance(fv, nn.Parameter)
            assert fv.dtype == rv.dtype
            assert fv.stride() == rv.stride(), f"{mname}.{n}: strides {fv.stride()} vs {rv.stride()}"
            torch.testing.assert_close(fv, rv, rtol=0, atol=0, equal_nan=True)
            if autograd:
                assert fv.requires_grad == rv.requires_grad
                assert type(fv.grad_fn) is type(rv.grad_fn), f"{mname}.{n}: {fv.grad_fn} vs {rv.grad_fn}"
    assert list(fast_module.state_dict()) == list(ref_module.state_dict())
    assert REF.is_pruned(fast_module) == REF.is_pruned(ref_module)


def normalize_message(msg):
    """An exception message with library paths and object addresses made
    comparable across the two libraries."""
    msg = re.sub(r" at 0x[0-9a-fA-F]+", " at 0x?", str(msg))
    return msg.replace("torch.nn.utils.prune.", "prune.").replace("fastprune.prune.", "prune.")


def every_other(P):
    """A user method class on `P.BasePruningMethod` (`P`: either library), in
    the tutorial's pattern: prune every other entry."""
    class EveryOther(P.BasePruningMethod):
        """Tutorial pattern: prune every other entry."""
        PRUNING_TYPE = "unstructured"

        def compute_mask(self, t, default_mask):
            mask = default_mask.clone()
            mask.view(-1)[::2] = 0
            return mask
    return EveryOther


# ----------------------------------------------------------------------------
# Model factories
# ----------------------------------------------------------------------------

class Net(nn.Module):
    """A small model with 1-D, 2-D and 4-D parameters (212 in all)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(16, 5)
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(torch.relu(self.fc(self.conv(x).flatten(1))))


def example_input(module, seed=5):
    """An input batch for the modules made below, on their device."""
    g = _gen(seed)
    p = next(module.parameters())
    if isinstance(module, nn.Linear):
        shape = (2, module.in_features)
    elif isinstance(module, nn.Conv2d):
        shape = (2, module.in_channels, 5, 5)
    elif isinstance(module, nn.BatchNorm1d):
        shape = (2, module.num_features)
    else:
        shape = (2, 3, 4, 4)
    return torch.randn(shape, generator=g).to(p.device, p.dtype)


def make_linear(dtype=torch.float32, seed=0):
    return fill_tie_free(nn.Linear(6, 5).to(dtype), seed)


def make_conv(dtype=torch.float32, seed=0):
    return fill_tie_free(nn.Conv2d(3, 4, 3).to(dtype), seed)


def make_net(dtype=torch.float32, seed=0):
    return fill_tie_free(Net().to(dtype), seed)
