"""Pruning in place with 1-bit or bool masks (``fastprune.in_place``,
``FASTPRUNE_IN_PLACE``), in one process.

* The packed format: ``fastprune.ops.pack_mask`` / ``unpack_mask`` /
  ``mask_packed_`` and the ``<name>_mask`` buffer of a prune, against an
  independent pure-torch packing (in_place_util.pack_reference); opcheck;
  a global L1 prune in place over last dims 1, 5 and 16.
* A differential fuzz: a random small model, three copies, a random sequence
  of calls: the reference layout (torch.nn.utils.prune; fastprune.prune
  outside ``in_place`` for fastprune's own methods and for tensors they
  pruned), in place "bits" and in place "bool". After every call the masks
  (``mask_of``, the stored buffer) and values (the parameter vs the
  reference's ``orig * mask``) must agree, and every in-place parameter is
  still the Parameter object it was.

  Every example comes from one integer seed (``random.Random(seed)`` and
  torch generators seeded from it). Values are random normals, so rankings
  have no ties (a removed tensor's zeros are overwritten with fresh values
  right after the check of the remove). CI runs fixed seeds; long mode, with
  fresh seeds (each failure names its seed):

      FASTPRUNE_IN_PLACE_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_in_place.py -k fuzz

  replay: ``FASTPRUNE_IN_PLACE_FUZZ_SEEDS=123,456``.
* Training (AdamW with weight decay, gradient accumulation, a second round
  whose optimizer state predates it), state_dict / deepcopy / pickle round
  trips, torch.compile, remove, the environment variable, invalid formats,
  and a tensor keeping the layout of its first prune.
"""
import copy
import math
import os
import pickle
import random
import textwrap
import traceback

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.prune as REF
from torch.testing import assert_close

import fastprune
import fastprune.prune as FAST
from conftest import assert_same_snapshot, hook_summary, select_oracle, snapshot
from fastprune import ops
from in_place_util import in_place_problems, pack_reference, packed_shape, unpack_reference

FORMATS = ["bits", "bool"]


@pytest.fixture(autouse=True)
def no_environment_layout(monkeypatch):
    """The tests choose the layout themselves: FASTPRUNE_IN_PLACE unset."""
    monkeypatch.delenv("FASTPRUNE_IN_PLACE", raising=False)


# ----------------------------------------------------------------------------
# The packed format
# ----------------------------------------------------------------------------

SHAPES = [(), (1,), (7,), (8,), (9,), (3, 17), (2, 3, 16), (4, 0), (0, 5), (0,), (2, 1, 1), (3, 65)]
MASK_DTYPES = [torch.bool, torch.uint8, torch.int64, torch.float32, torch.float64, torch.float16, torch.bfloat16]


def random_mask(shape, dtype, seed):
    """0/1 values and, for non-bool dtypes, other nonzero values (-2, 0.5 or
    3); floating ones also -0.0 (zero) and NaN (nonzero)."""
    g = torch.Generator().manual_seed(seed)
    levels = torch.tensor([0.0, 1.0, -2.0, 0.5 if dtype.is_floating_point else 3.0, 0.0])
    if dtype.is_floating_point:
        levels = torch.cat([levels, torch.tensor([-0.0, float("nan")])])
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype == torch.uint8:
        levels = levels.abs()
    return levels[torch.randint(0, len(levels), shape, generator=g)].to(dtype)


def layouts_of(t):
    """``t`` contiguous and, where it has 2+ entries in a row, as views with
    other strides holding the same values: transposed storage, a strided
    slice, and an expanded row."""
    out = [("contiguous", t)]
    if t.dim() >= 2:
        out.append(("transposed", t.transpose(-1, -2).contiguous().transpose(-1, -2)))
    if t.dim() >= 1 and t.numel():
        wide = torch.stack([t, torch.zeros_like(t)], dim=-1).flatten(-2)  # every other entry is t's
        out.append(("strided slice", wide[..., ::2]))
        out.append(("expanded", t[..., :1].expand(t.shape)))
    return out


def test_bit_order_by_hand():
    """Entry 8*b+j of a row in bit j of byte b, padding bits 0, 0-d as (1,)."""
    row = torch.zeros(10, dtype=torch.bool)
    row[0] = row[9] = True
    assert ops.pack_mask(row).tolist() == [1, 2]
    assert ops.pack_mask(torch.ones(2, 10)).tolist() == [[255, 3], [255, 3]]  # padding bits of byte 1 clear
    assert ops.pack_mask(torch.arange(8) == 7).tolist() == [128]
    assert ops.pack_mask(torch.tensor([[0.0, -1.0, 0.0, 0.5, 0.0, 0.0, 0.0, 0.0, 2.0]])).tolist() == [[10, 1]]
    for value, byte in ((True, 1), (False, 0), (2.5, 1), (0.0, 0)):
        packed = ops.pack_mask(torch.tensor(value))
        assert packed.dtype == torch.uint8 and packed.shape == (1,) and packed.tolist() == [byte]
    unpacked = ops.unpack_mask(torch.tensor([1], dtype=torch.uint8), ())
    assert unpacked.shape == () and unpacked.dtype == torch.bool and bool(unpacked)
    assert ops.unpack_mask(torch.tensor([[1, 2]], dtype=torch.uint8), (1, 10)).tolist() == [
        [True] + [False] * 8 + [True]]


def test_pack_and_unpack_match_the_reference():
    """Every shape (0-d, empty dims, rows of 1 to 65 entries), mask dtype and
    memory layout packs like the pure-torch packing; unpacking (also of a
    non-contiguous packed tensor) gives back ``mask != 0``."""
    for i, shape in enumerate(SHAPES):
        for dtype in MASK_DTYPES:
            for layout, mask in layouts_of(random_mask(shape, dtype, seed=i)):
                what = (shape, dtype, layout)
                packed = ops.pack_mask(mask)
                assert packed.dtype == torch.uint8 and tuple(packed.shape) == packed_shape(shape), what
                assert torch.equal(packed, pack_reference(mask)), what
                unpacked = ops.unpack_mask(packed, shape)
                assert unpacked.dtype == torch.bool and unpacked.shape == mask.shape, what
                assert torch.equal(unpacked, mask != 0), what
                assert torch.equal(unpack_reference(packed, shape), mask != 0), what  # (the oracle's own check)
        if len(shape) >= 2:
            packed = pack_reference(random_mask(shape, torch.bool, seed=i))
            strided = packed.transpose(-1, -2).contiguous().transpose(-1, -2)
            assert torch.equal(ops.unpack_mask(strided, shape), unpack_reference(packed, shape)), shape


VALUE_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int32, torch.uint8]


def test_mask_packed_zeroes_exactly_the_cleared_entries():
    """In place (the same tensor returned, its storage written), for every
    layout: entries with a clear bit become 0, the others keep their bits."""
    for i, shape in enumerate(SHAPES):
        for dtype in VALUE_DTYPES:
            g = torch.Generator().manual_seed(100 + i)
            values = (torch.randn(shape, generator=g) * 10).to(dtype)
            keep = random_mask(shape, torch.bool, seed=200 + i)
            packed = pack_reference(keep)
            for layout, t in layouts_of(values):
                if layout == "expanded":
                    continue  # (not writable)
                t = t.clone() if layout == "contiguous" else t
                expected = torch.where(keep, t, torch.zeros((), dtype=dtype))
                out = ops.mask_packed_(t, packed)
                assert out is t, (shape, dtype, layout)
                assert torch.equal(t, expected), (shape, dtype, layout)


@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_mask_packed_zeroes_non_finite_entries(layout):
    """"Zero the entries of t whose bit is clear": inf and NaN too (a
    multiplication by 0 would leave NaN), whatever t's strides."""
    t = torch.tensor([[float("nan"), float("inf"), 1.0], [2.0, -float("inf"), float("nan")]])
    keep = torch.tensor([[False, False, True], [True, False, True]])
    if layout == "transposed":
        t = t.t().contiguous().t()
    ops.mask_packed_(t, pack_reference(keep))
    expected = torch.tensor([[0.0, 0.0, 1.0], [2.0, 0.0, float("nan")]])
    assert_close(t, expected, rtol=0, atol=0, equal_nan=True)


def test_opcheck_packed_ops():
    samples = [random_mask((3, 17), torch.bool, 1), random_mask((2, 3, 9), torch.float32, 2).transpose(0, 1),
               torch.tensor(1.0), torch.zeros(4, 0), random_mask((5, 8), torch.bfloat16, 3)]
    for mask in samples:
        torch.library.opcheck(torch.ops.fastprune.pack_mask.default, (mask,))
        shape = tuple(mask.shape)
        packed = pack_reference(mask)
        n = shape[-1] if shape else 1
        torch.library.opcheck(torch.ops.fastprune.unpack_mask.default, (packed, n))
        t = torch.randn(shape if shape else (1,))
        torch.library.opcheck(torch.ops.fastprune.mask_packed_.default, (t, packed))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_packed_ops_on_cuda():
    """The CUDA kernels: the same bytes, bools and zeros as the reference,
    and a prune in place on a CUDA parameter equal to the CPU one."""
    for i, shape in enumerate(SHAPES):
        mask = random_mask(shape, torch.float32, seed=i)
        packed = ops.pack_mask(mask.cuda())
        assert packed.is_cuda and torch.equal(packed.cpu(), pack_reference(mask)), shape
        assert torch.equal(ops.unpack_mask(packed, shape).cpu(), mask != 0), shape
        values = torch.randn(shape, generator=torch.Generator().manual_seed(i))
        out = ops.mask_packed_(values.cuda(), packed)
        assert torch.equal(out.cpu(), values * (mask != 0)), shape
    cpu = param_module(torch.randn(6, 13, generator=torch.Generator().manual_seed(0)))
    gpu = copy.deepcopy(cpu).cuda()
    for module in (cpu, gpu):
        with fastprune.in_place("bits"):
            FAST.l1_unstructured(module, "w", amount=0.5)
    assert torch.equal(gpu.w_mask.cpu(), cpu.w_mask) and torch.equal(gpu.w.detach().cpu(), cpu.w.detach())
    opt = torch.optim.AdamW(gpu.parameters(), lr=0.1, weight_decay=0.1)
    (gpu.w * torch.arange(13, device="cuda")).square().sum().backward()
    opt.step()
    assert (gpu.w[~FAST.mask_of(gpu, "w")] == 0).all()


def param_module(t):
    module = nn.Module()
    module.w = nn.Parameter(t)
    return module


STORED_CASES = {
    "0-d": torch.tensor(-1.5),
    "1 entry": torch.tensor([0.7]),
    "row of 9": torch.randn(9, generator=torch.Generator().manual_seed(1)),
    "13 x 3": torch.randn(13, 3, generator=torch.Generator().manual_seed(2)),
    "4 x 16": torch.randn(4, 16, generator=torch.Generator().manual_seed(3)),
    "conv 3 x 2 x 3 x 3": torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(4)),
    "transposed 5 x 11": torch.randn(11, 5, generator=torch.Generator().manual_seed(5)).t(),
    "channels_last": torch.randn(2, 3, 4, 5, generator=torch.Generator().manual_seed(6)).to(
        memory_format=torch.channels_last),
    "empty 0 x 5": torch.zeros(0, 5),
    "empty 3 x 0": torch.zeros(3, 0),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(STORED_CASES))
def test_mask_buffer_after_a_prune(case, fmt):
    """The buffer of a prune (and of a second prune: a container) holds the
    reference layout's mask in the format asked for, packed as the
    pure-torch packing; the values are its ``orig * mask``; same Parameter."""
    t = STORED_CASES[case]
    ref, mine = param_module(t.clone()), param_module(t.clone())
    param = mine.w
    calls = [lambda P, m: P.l1_unstructured(m, "w", amount=0.4),
             lambda P, m: P.random_unstructured(m, "w", amount=min(1, t.numel()))]
    for seed, call in enumerate(calls):
        # fastprune's reference layout: torch's needs contiguous tensors
        torch.manual_seed(seed)
        call(FAST, ref)
        torch.manual_seed(seed)
        with fastprune.in_place(fmt):
            call(FAST, mine)
        assert in_place_problems(ref, mine, "w", fmt, param) == [], case
        assert mine.w.stride() == t.stride(), "the parameter keeps its strides"
    assert list(mine.state_dict()) == ["w", "w_mask"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("amount", [0.5, 3, 0.0])
def test_global_l1_in_place(fmt, amount):
    """Global L1 over plain tensors with last dims 1, 5 and 16, a first
    prune and a second round: torch's masks, in the format asked for."""
    torch.manual_seed(0)
    ref = nn.ModuleList([nn.Linear(1, 4), nn.Linear(5, 3), nn.Linear(16, 2)])
    mine = copy.deepcopy(ref)
    params = [m.weight for m in mine]
    for _ in range(2):
        REF.global_unstructured([(m, "weight") for m in ref], REF.L1Unstructured, amount=amount)
        with fastprune.in_place(fmt):
            FAST.global_unstructured([(m, "weight") for m in mine], FAST.L1Unstructured, amount=amount)
        for r, m, p in zip(ref, mine, params):
            assert in_place_problems(r, m, "weight", fmt, p) == [], (r, amount)


def sorted_prune(scores, live, count, largest):
    """The reference of prune_in_place_: conftest's stable-sort select_oracle
    over the concatenation, the live entries as candidates."""
    flat = torch.cat([s.detach().flatten() for s in scores])
    alive = torch.cat([m.flatten() for m in live]).to(torch.float64)
    kept = select_oracle(flat, alive, count=count, only_ones=True, largest=largest) == 1
    return [k.view(s.shape) for k, s in zip(kept.split([s.numel() for s in scores]), scores)]


SHAPES = [(256, 300), (129, 257), (64, 64), (40,)]  # 114,217 entries: the kernel samples


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("data", ["normal", "sample misleads", "ties"])
def test_prune_in_place_op_matches_a_sort(fmt, dtype, data):
    """ops.prune_in_place_ on inputs large enough that a sample brackets the
    threshold: two rounds (the second over a partly dead live set), smallest
    and largest, scores apart from the values, against a stable sort. With
    "sample misleads" every eighth entry of the concatenation, where the
    evenly spaced sample falls, is far above the rest, so the bracket misses
    and the kernel must count every bin; with "ties" a few values repeat."""
    g = torch.Generator().manual_seed(3)
    scores = [torch.randn(s, generator=g, dtype=torch.float64) for s in SHAPES]
    flat = torch.cat([s.flatten() for s in scores])
    if data == "sample misleads":
        flat[::8] += 1000.0
    elif data == "ties":
        flat = torch.round(flat * 4) / 4
    scores = [c.view(s).to(dtype) for c, s in zip(flat.split([math.prod(s) for s in SHAPES]), SHAPES)]
    for largest in (False, True):
        values = [torch.randn(s, generator=g).to(dtype) for s in SHAPES]
        live = [torch.ones(s, dtype=torch.bool) for s in SHAPES]
        masks = [ops.pack_mask(m) if fmt == "bits" else m.clone() for m in live]
        for amount in (0.5, 0.3):
            count = round(amount * sum(int(m.sum()) for m in live))
            expect = sorted_prune(scores, live, count, largest)
            before = [v.clone() for v in values]
            ops.prune_in_place_(values, scores, masks, count, largest=largest)
            for m, e, v, b in zip(masks, expect, values, before):
                got = ops.unpack_mask(m, e.shape) if fmt == "bits" else m
                assert torch.equal(got, e), (largest, amount)
                assert torch.equal(v, b * e), (largest, amount)
            live = expect


# ----------------------------------------------------------------------------
# The differential fuzz
# ----------------------------------------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("FASTPRUNE_IN_PLACE_FUZZ_EXAMPLES", "0"))
FUZZ_SEEDS = [int(s) for s in os.environ.get("FASTPRUNE_IN_PLACE_FUZZ_SEEDS", "").split(",") if s.strip()]
CI_EXAMPLES = 600
INF = float("inf")
OWN_METHODS = ("l1_semi_structured", "channelwise_l1_unstructured")  # fastprune's, not torch's


def fuzz_seeds():
    if FUZZ_SEEDS:
        return FUZZ_SEEDS
    if FUZZ_EXAMPLES:
        fresh = random.SystemRandom()
        return [fresh.getrandbits(32) for _ in range(FUZZ_EXAMPLES)]
    return list(range(CI_EXAMPLES))


def draw_layer(rng):
    """(class name, constructor args, bias); last dims 1 to 13."""
    kind = rng.choices(["Linear", "Conv1d", "Conv2d", "Embedding", "LSTM"], [6, 2, 2, 1, 1])[0]
    if kind == "Linear":
        return kind, (rng.randint(1, 13), rng.randint(1, 5)), rng.random() < 0.5
    if kind == "Conv1d":
        return kind, (rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 5)), rng.random() < 0.5
    if kind == "Conv2d":
        return kind, (rng.randint(1, 2), rng.randint(1, 3), rng.randint(1, 3)), rng.random() < 0.5
    if kind == "Embedding":
        return kind, (rng.randint(2, 5), rng.randint(1, 11)), False
    return kind, (rng.randint(1, 9), rng.randint(1, 2)), rng.random() < 0.5


def draw_model(rng):
    """1-3 items, each a layer or a Sequential of 1-2 layers."""
    return [[draw_layer(rng) for _ in range(rng.randint(1, 2))] if rng.random() < 0.3 else draw_layer(rng)
            for _ in range(rng.randint(1, 3))]


def build(spec, dtypes):
    """The model of ``spec`` (default initial values, global RNG untouched)."""
    def layer(item):
        if isinstance(item, list):
            return nn.Sequential(*map(layer, item))
        kind, args, bias = item
        cls = getattr(nn, kind)
        return cls(*args) if kind == "Embedding" else cls(*args, bias=bias)

    with torch.random.fork_rng(devices=[]):
        model = nn.Sequential(*map(layer, spec))
    for path, dtype in dtypes.items():
        model.get_submodule(path).to(dtype)
    return model


def leaves(model):
    return [(path, m) for path, m in model.named_modules() if any(p is not None for p in m._parameters.values())]


def fill_random(tensors, g):
    with torch.no_grad():
        for t in tensors:
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64))


def layer_input(module, dtype, g):
    if isinstance(module, nn.Embedding):
        return torch.randint(0, module.num_embeddings, (2, 3), generator=g)
    if isinstance(module, nn.Linear):
        shape = (2, module.in_features)
    elif isinstance(module, nn.Conv1d):
        shape = (2, module.in_channels, 6)
    elif isinstance(module, nn.Conv2d):
        shape = (2, module.in_channels, 4, 4)
    else:  # LSTM: (sequence, batch, features)
        shape = (3, 2, module.input_size)
    return torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)


def outputs(module, x):
    out = module(x)
    return out[0] if isinstance(out, tuple) else out


class Example:
    """One example: the model, its three copies, the calls."""

    def __init__(self, seed):
        self.seed, self.rng = seed, random.Random(seed)
        self.spec = draw_model(self.rng)
        plain = build(self.spec, {})
        self.dtypes = {path: self.rng.choice([torch.float32, torch.float32, torch.float64])
                       for path, _ in leaves(plain)}
        plain = build(self.spec, self.dtypes)
        fill_random(plain.parameters(), torch.Generator().manual_seed(seed))
        self.targets = [(path, name) for path, m in leaves(plain) for name, p in m._parameters.items()
                        if p is not None]
        self.shapes = {t: tuple(plain.get_submodule(t[0])._parameters[t[1]].shape) for t in self.targets}
        self.models = {"ref": plain, "bits": copy.deepcopy(plain), "bool": copy.deepcopy(plain)}
        self.log = []
        self.hold_params()

    def hold_params(self):
        """The Parameter objects each in-place parameter must keep."""
        self.params = {fmt: {t: self.models[fmt].get_submodule(t[0])._parameters[t[1]] for t in self.targets}
                       for fmt in FORMATS}

    def module(self, key, target):
        return self.models[key].get_submodule(target[0])

    def pruned(self, target):
        return target[1] + "_mask" in self.module("ref", target)._buffers

    def hooked_by(self, target):
        """Which library made the reference copy's hook of ``target``: "torch",
        "fast", or None. fastprune's own methods cannot join torch's
        containers: they prune FAST-hooked targets only, and the reference
        copy prunes those with FAST, torch's methods included."""
        module = self.module("ref", target)
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, REF.BasePruningMethod) and hook._tensor_name == target[1]:
                return "fast" if isinstance(hook, FAST.BasePruningMethod) else "torch"
        return None

    def live(self, target):
        """The reference's mask as bool (all True when unpruned)."""
        if not self.pruned(target):
            return torch.ones(self.shapes[target], dtype=torch.bool)
        return self.module("ref", target)._buffers[target[1] + "_mask"] != 0


def draw_amount(rng, units):
    """A fraction or a count of ``units``; now and then too large or invalid."""
    if rng.random() < 0.04:
        return rng.choice([units + 1, 1.5, -1])
    return rng.choice([rng.random(), rng.random(), 0.0, 1.0, 0.5, rng.randint(0, units), rng.randint(0, units)])


CALL_WEIGHTS = {"l1_unstructured": 4, "random_unstructured": 3, "ln_structured": 3, "random_structured": 2,
                "custom_from_mask": 2, "identity": 1, "global_unstructured": 4, "l1_semi_structured": 2,
                "channelwise_l1_unstructured": 2, "remove": 2, "forward": 2, "edit": 1, "state_dict": 1}


def draw_call(ex):
    """One call, drawn against the reference copy's current state."""
    rng = ex.rng
    kind = rng.choices(list(CALL_WEIGHTS), list(CALL_WEIGHTS.values()))[0]
    pruned = [t for t in ex.targets if ex.pruned(t)]
    call = {"kind": kind, "seed": rng.randrange(2 ** 31), "outside": False}
    if kind == "state_dict":
        call["fresh"] = rng.random() < 0.6
    if kind in ("forward", "state_dict"):
        return call
    if kind in ("remove", "edit"):
        if not pruned:
            return {"kind": "forward", "seed": call["seed"], "outside": False}
        call["target"] = rng.choice(pruned)
        return call
    if kind == "global_unstructured":
        call["pairs"] = rng.sample(ex.targets, rng.randint(1, len(ex.targets)))
        call["method"] = rng.choice(["L1Unstructured", "RandomUnstructured"])
        call["amount"] = draw_amount(rng, sum(int(ex.live(t).sum()) for t in call["pairs"]))
        call["scored"] = [t for t in call["pairs"] if rng.random() < 0.3]
        call["outside"] = all(ex.pruned(t) for t in call["pairs"]) and rng.random() < 0.3
        return call
    candidates = [t for t in ex.targets if kind not in OWN_METHODS or ex.hooked_by(t) != "torch"]
    if kind in ("ln_structured", "random_structured") and rng.random() < 0.9:  # 1-D: mostly errors
        candidates = [t for t in candidates if len(ex.shapes[t]) > 1] or candidates
    if not candidates:
        return {"kind": "forward", "seed": call["seed"], "outside": False}
    target = rng.choice(candidates)
    shape, live = ex.shapes[target], ex.live(target)
    call["target"] = target
    call["outside"] = ex.pruned(target) and rng.random() < 0.3  # keeps the layout of its first prune
    ndim = len(shape)
    if kind in ("l1_unstructured", "random_unstructured"):
        call["amount"] = draw_amount(rng, int(live.sum()))
        call["scores"] = kind == "l1_unstructured" and rng.random() < 0.3
    elif kind in ("ln_structured", "random_structured"):
        call["dim"] = rng.randrange(-ndim, ndim)
        channels = int(live.movedim(call["dim"], 0).reshape(shape[call["dim"]], -1).any(1).sum())
        call["amount"] = draw_amount(rng, channels)
        if kind == "ln_structured":
            # -inf ranks the smallest entries: ties as soon as some are zero
            # (pruned), so on a first prune only; 0 (counts) ties always.
            call["n"] = rng.choice([1, 2, INF, 3] + ([-INF] if not ex.pruned(target) else []))
            call["scores"] = rng.random() < 0.3
    elif kind == "custom_from_mask":
        call["mask"] = rng.choice(["bool", "float"])
    elif kind == "l1_semi_structured":
        dims = [d for d in range(-ndim, 0) if any(shape[d] % m == 0 for m in (2, 3, 4))]
        if not dims:
            return {"kind": "forward", "seed": call["seed"], "outside": False}
        call["dim"] = -1 if -1 in dims and rng.random() < 0.7 else rng.choice(dims)
        call["m"] = rng.choice([m for m in (2, 3, 4) if shape[call["dim"]] % m == 0])
        call["n"] = rng.randrange(call["m"])
    elif kind == "channelwise_l1_unstructured":
        call["dim"] = rng.choice([0, -1]) if ndim > 1 else 0
        per_slice = live.movedim(call["dim"], 0).reshape(shape[call["dim"]], -1).sum(1)
        call["amount"] = draw_amount(rng, int(per_slice.min()) if per_slice.numel() else 0)
    return call


def describe(call):
    return ", ".join(f"{k}={v}" for k, v in call.items() if k != "seed")


def prune_call(P, models, call, key, ex):
    """The prune ``call`` with library ``P`` on ``models[key]``."""
    model = models[key]
    kind = call["kind"]
    g = torch.Generator().manual_seed(call["seed"])
    if kind == "global_unstructured":
        pairs = [(model.get_submodule(path), name) for path, name in call["pairs"]]
        scores = {(model.get_submodule(t[0]), t[1]): torch.randn(ex.shapes[t], generator=g, dtype=torch.float64)
                  .to(ex.dtypes[t[0]]) for t in call["scored"]}
        return P.global_unstructured(pairs, getattr(P, call["method"]), importance_scores=scores or None,
                                     amount=call["amount"])
    path, name = call["target"]
    module = model.get_submodule(path)
    dtype, shape = ex.dtypes[path], ex.shapes[call["target"]]
    kwargs = {}
    if call.get("scores"):
        kwargs["importance_scores"] = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    if kind in ("l1_unstructured", "random_unstructured"):
        return getattr(P, kind)(module, name, call["amount"], **kwargs)
    if kind == "ln_structured":
        return P.ln_structured(module, name, call["amount"], call["n"], call["dim"], **kwargs)
    if kind == "random_structured":
        return P.random_structured(module, name, call["amount"], call["dim"])
    if kind == "custom_from_mask":
        mask = torch.rand(shape, generator=g) < 0.6
        return P.custom_from_mask(module, name, mask if call["mask"] == "bool" else mask.to(dtype))
    if kind == "identity":
        return P.identity(module, name)
    if kind == "l1_semi_structured":
        return P.l1_semi_structured(module, name, n=call["n"], m=call["m"], dim=call["dim"])
    if kind == "channelwise_l1_unstructured":
        return P.channelwise_l1_unstructured(module, name, call["amount"], dim=call["dim"])
    raise AssertionError(kind)


def run_forward(ex, call):
    """Every layer's forward on one input per layer; the outputs must agree."""
    for path, _ in leaves(ex.models["ref"]):
        g = torch.Generator().manual_seed(call["seed"])
        x = layer_input(ex.models["ref"].get_submodule(path), ex.dtypes[path], g)
        with torch.no_grad():
            out = {key: outputs(model.get_submodule(path), x) for key, model in ex.models.items()}
        for fmt in FORMATS:
            assert_close(out[fmt], out["ref"], msg=lambda m, path=path, fmt=fmt: f"{fmt} forward of {path}: {m}")


def round_trip(ex, call):
    """Each copy's state dict, loaded into a fresh model prepared with
    ``identity`` (in place: inside the same ``in_place`` block), or back into
    the same model after zeroing every tensor; then the hooks of a forward."""
    pruned = [t for t in ex.targets if ex.pruned(t)]
    for key, model in list(ex.models.items()):
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        if call["fresh"]:
            new = build(ex.spec, ex.dtypes)
            for path, name in pruned:
                if key == "ref":
                    (FAST if ex.hooked_by((path, name)) == "fast" else REF).identity(new.get_submodule(path), name)
                else:
                    with fastprune.in_place(key):
                        FAST.identity(new.get_submodule(path), name)
            new.load_state_dict(state)
            ex.models[key] = new
        else:
            with torch.no_grad():
                for t in list(model.parameters()) + list(model.buffers()):
                    t.zero_()
            model.load_state_dict(state)
    run_hooks(ex.models["ref"])
    if call["fresh"]:
        ex.hold_params()


def run_hooks(model):
    """The pruning hooks of a forward: the reference's cached tensors refreshed."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, REF.BasePruningMethod):
                hook(module, ())


def make_call(ex, call):
    """Makes ``call`` on the three copies; None, or the reference's exception
    (after checking that both in-place copies raised the same class and were
    left as they were)."""
    kind = call["kind"]
    if kind == "forward":
        return run_forward(ex, call)
    if kind == "state_dict":
        return round_trip(ex, call)
    if kind == "edit":  # a write outside an optimizer: masked before the next forward
        path, name = call["target"]
        new = torch.randn(ex.shapes[call["target"]], generator=torch.Generator().manual_seed(call["seed"]),
                          dtype=torch.float64)
        with torch.no_grad():
            ex.module("ref", call["target"])._parameters[name + "_orig"].copy_(new)
            for fmt in FORMATS:
                ex.module(fmt, call["target"])._parameters[name].copy_(new)
        return run_forward(ex, call)
    if kind == "remove":
        for key, P in (("ref", REF), ("bits", FAST), ("bool", FAST)):
            P.remove(ex.module(key, call["target"]), call["target"][1])
        return None
    targets = call.get("pairs") or [call["target"]]
    own = kind in OWN_METHODS or any(ex.hooked_by(t) == "fast" for t in targets)
    errors, before = {}, {}
    for key in ex.models:
        before[key] = snapshot(ex.models[key])
        torch.manual_seed(call["seed"])
        try:
            if key == "ref":
                prune_call(FAST if own else REF, ex.models, call, key, ex)
            elif call["outside"]:
                prune_call(FAST, ex.models, call, key, ex)
            else:
                with fastprune.in_place(key):
                    prune_call(FAST, ex.models, call, key, ex)
            errors[key] = None
        except Exception as e:  # noqa: BLE001  (compared across the copies)
            errors[key] = e
    classes = {key: type(e).__name__ if e is not None else None for key, e in errors.items()}
    assert len(set(classes.values())) == 1, f"outcomes differ: {classes} ({errors})"
    if errors["ref"] is not None:
        for fmt in FORMATS:
            assert_same_snapshot(before[fmt], snapshot(ex.models[fmt]))
        return errors["ref"]
    return None


def check(ex):
    """Every parameter of the in-place copies against the reference copy."""
    problems = []
    for target in ex.targets:
        path, name = target
        ref = ex.module("ref", target)
        for fmt in FORMATS:
            problems += [f"{fmt} {path}: {p}" for p in
                         in_place_problems(ref, ex.module(fmt, target), name, fmt, ex.params[fmt][target])]
    for path, _ in leaves(ex.models["ref"]):
        for fmt in FORMATS:
            if hook_summary(ex.models[fmt].get_submodule(path)) != hook_summary(ex.models["ref"].get_submodule(path)):
                problems.append(f"{fmt} {path}: hooks {hook_summary(ex.models[fmt].get_submodule(path))} vs "
                                f"{hook_summary(ex.models['ref'].get_submodule(path))}")
    ref_keys = sorted(k.replace("_orig", "") for k in ex.models["ref"].state_dict())
    for fmt in FORMATS:
        if sorted(ex.models[fmt].state_dict()) != ref_keys:
            problems.append(f"{fmt}: state_dict keys {sorted(ex.models[fmt].state_dict())} vs {ref_keys}")
        if FAST.is_pruned(ex.models[fmt]) != REF.is_pruned(ex.models["ref"]):
            problems.append(f"{fmt}: is_pruned differs")
    assert not problems, "\n".join(problems)


def run_example(seed):
    """None, or a report of the first failing call."""
    ex = Example(seed)
    try:
        for i in range(ex.rng.randint(1, 5)):
            call = draw_call(ex)
            ex.log.append(describe(call))
            if make_call(ex, call) is not None:  # an error: the reference may have changed its copy
                break
            check(ex)
            if call["kind"] == "remove":  # fresh values over the zeros: no ties in later rankings
                path, name = call["target"]
                for model in ex.models.values():
                    fill_random([model.get_submodule(path)._parameters[name]], torch.Generator().manual_seed(i))
    except Exception:  # noqa: BLE001  (reported with the seed)
        return (f"seed {seed}: model {ex.spec}, dtypes {[str(d) for d in ex.dtypes.values()]}\n  calls: "
                + "\n         ".join(ex.log) + "\n" + traceback.format_exc(limit=-4))
    return None


def test_fuzz_in_place_matches_reference():
    seeds = fuzz_seeds()
    failures = [f for f in map(run_example, seeds) if f]
    if failures:
        print("failing seeds:", [int(f.split(":")[0].split()[1]) for f in failures])
    assert not failures, f"{len(failures)} of {len(seeds)} examples failed:\n\n" + "\n\n".join(failures[:5])


# ----------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------

class Net(nn.Module):
    """Last dims 3 (conv), 13 and 6: none a multiple of 8."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(12 + 1, 6)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x)).flatten(1)[:, :13]
        return self.head(torch.relu(self.fc(h)))


def batch(seed):
    return torch.randn(4, 2, 5, 5, generator=torch.Generator().manual_seed(seed))


def loss(model, seed):
    return model(batch(seed)).square().mean()


def net_pair(seed=0):
    """A model and an identical copy."""
    torch.manual_seed(seed)
    ref = Net()
    return ref, copy.deepcopy(ref)


def pairs(model):
    return [(model.conv, "weight"), (model.fc, "weight"), (model.head, "weight"), (model.fc, "bias")]


def prune_both(ref, mine, fmt, call):
    """``call(P, model)`` on the reference (torch) and, inside ``in_place(fmt)``, on ``mine``."""
    torch.manual_seed(7)
    call(REF, ref)
    torch.manual_seed(7)
    with fastprune.in_place(fmt):
        call(FAST, mine)


def first_round(P, model):
    P.global_unstructured(pairs(model), P.L1Unstructured, amount=0.5)
    P.random_structured(model.conv, "weight", amount=1, dim=0)


def assert_matches(ref, mine, fmt, params=None):
    """Every pruned tensor of ``mine`` against ``ref``'s (see in_place_problems)."""
    problems = []
    for (r, name), (m, _) in zip(pairs(ref), pairs(mine)):
        problems += in_place_problems(r, m, name, fmt, None if params is None else params[id(m), name])
    assert not problems, "\n".join(problems)


def assert_pruned_zero(model):
    for m, name in pairs(model):
        if name + "_mask" in m._buffers:
            values = getattr(m, name).detach()
            assert (values[~FAST.mask_of(m, name)] == 0).all(), (m, name)


def train_step(ref, mine, opts, seed, check_grads=True):
    """Two accumulated micro-batches and an optimizer step on both models;
    the in-place gradients must be the reference's ``<name>_orig`` gradients."""
    for opt in opts:
        opt.zero_grad()
    for micro in range(2):
        loss(ref, 10 * seed + micro).backward()
        loss(mine, 10 * seed + micro).backward()
    if check_grads:
        for (r, name), (m, _) in zip(pairs(ref), pairs(mine)):
            orig = r._parameters.get(name + "_orig", r._parameters.get(name))
            grad = getattr(m, name).grad
            assert_close(grad, orig.grad)
            if name + "_mask" in m._buffers:
                assert (grad[~FAST.mask_of(m, name)] == 0).all(), "gradient not masked"
        norms = [torch.nn.utils.get_total_norm([p.grad for p in model.parameters()]) for model in (ref, mine)]
        assert_close(norms[1], norms[0])  # what gradient clipping sees
    for opt in opts:
        opt.step()


@pytest.mark.parametrize("fmt", FORMATS)
def test_training_keeps_zeros_and_matches_reference(fmt):
    """AdamW (weight decay) built before the prune: the same Parameter
    objects keep training; gradients are the reference's ``orig`` gradients;
    pruned entries stay exactly 0 and outputs follow the reference. A second
    round, whose optimizer state (momentum) predates it, keeps its new zeros."""
    ref, mine = net_pair()
    params = {(id(m), name): getattr(m, name) for m, name in pairs(mine)}
    opts = [torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1) for model in (ref, mine)]
    prune_both(ref, mine, fmt, first_round)
    assert_matches(ref, mine, fmt, params)
    for step in range(5):
        train_step(ref, mine, opts, step)
        assert_pruned_zero(mine)
        with torch.no_grad():
            assert_close(mine(batch(99)), ref(batch(99)))
    # Round 2 on the trained values (the same scores on both sides), then more steps.
    scores = {name: torch.randn(getattr(mine, name).weight.shape, generator=torch.Generator().manual_seed(3))
              for name in ("fc", "conv")}
    prune_both(ref, mine, fmt, lambda P, m: (
        P.l1_unstructured(m.fc, "weight", amount=0.4, importance_scores=scores["fc"]),
        P.ln_structured(m.conv, "weight", amount=1, n=2, dim=1, importance_scores=scores["conv"]),
        P.l1_unstructured(m.head, "bias", amount=2)))
    for (r, name), (m, _) in zip(pairs(ref), pairs(mine)):
        assert torch.equal(FAST.mask_of(m, name), r._buffers[name + "_mask"] != 0), name
    for step in range(5, 8):
        train_step(ref, mine, opts, step)
        assert_pruned_zero(mine)
        assert (mine.head.bias[~FAST.mask_of(mine.head, "bias")] == 0).all()
    with torch.no_grad():
        assert_close(mine(batch(99)), ref(batch(99)))
    for (r, name), (m, _) in zip(pairs(ref), pairs(mine)):
        assert_close(getattr(m, name).detach(), r.get_parameter(name + "_orig").detach() * r.get_buffer(name + "_mask"))


# ----------------------------------------------------------------------------
# Round trips: state_dict, deepcopy, pickle, torch.compile, remove
# ----------------------------------------------------------------------------

def pruned_pair(fmt, seed=0):
    ref, mine = net_pair(seed)
    prune_both(ref, mine, fmt, first_round)
    return ref, mine


def prepared(fmt, seed):
    """A fresh model prepared with ``identity`` on the pairs inside ``in_place(fmt)``."""
    _, fresh = net_pair(seed)
    with fastprune.in_place(fmt):
        for m, name in pairs(fresh):
            FAST.identity(m, name)
    return fresh


@pytest.mark.parametrize("fmt", FORMATS)
def test_state_dict_round_trip(fmt):
    ref, mine = pruned_pair(fmt)
    state = mine.state_dict()
    expected_keys = set(Net().state_dict()) | {f"{path}.{name}_mask" for path, name in
                                               (("conv", "weight"), ("fc", "weight"), ("head", "weight"),
                                                ("fc", "bias"))}
    assert set(state) == expected_keys
    for m, name in pairs(mine):
        path = next(p for p, sub in mine.named_modules() if sub is m)
        mask, value = state[f"{path}.{name}_mask"], state[f"{path}.{name}"]
        assert value.dtype == torch.float32 and value.shape == getattr(m, name).shape
        if fmt == "bits":
            assert mask.dtype == torch.uint8 and tuple(mask.shape) == packed_shape(value.shape)
        else:
            assert mask.dtype == torch.bool and mask.shape == value.shape
    fresh = prepared(fmt, seed=1)
    fresh.load_state_dict(state)
    assert_matches(ref, fresh, fmt)
    with torch.no_grad():
        assert_close(fresh(batch(5)), ref(batch(5)))

    # A state dict whose pruned entries are not zero (the reference's
    # unmasked values): masked before the next forward.
    dense = dict(state)
    for r, name in pairs(ref):
        path = next(p for p, sub in ref.named_modules() if sub is r)
        dense[f"{path}.{name}"] = r._parameters[name + "_orig"].detach().clone()
        assert (dense[f"{path}.{name}"] != 0).all()
    loaded = prepared(fmt, seed=2)
    loaded.load_state_dict(dense)
    with torch.no_grad():
        assert_close(loaded(batch(5)), ref(batch(5)))
    assert_matches(ref, loaded, fmt)


def train_alone(model, steps, seed=0):
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    for step in range(steps):
        opt.zero_grad()
        loss(model, seed + step).backward()
        for m, name in pairs(model):
            assert (getattr(m, name).grad[~FAST.mask_of(m, name)] == 0).all(), "gradient not masked"
        opt.step()
        assert_pruned_zero(model)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_stay_pruned(fmt, how):
    """A copy holds the masks and values (in the same formats), and training
    the copy keeps its zeros and leaves the original alone."""
    ref, mine = pruned_pair(fmt)
    other = copy.deepcopy(mine) if how == "deepcopy" else pickle.loads(pickle.dumps(mine))
    assert_matches(ref, other, fmt)
    before = {k: v.clone() for k, v in mine.state_dict().items()}
    assert not {id(p) for p in other.parameters()} & {id(p) for p in mine.parameters()}
    train_alone(other, 3)
    assert all(torch.equal(v, before[k]) for k, v in mine.state_dict().items())
    assert any(not torch.equal(v, before[k]) for k, v in other.state_dict().items())
    assert_matches(ref, mine, fmt)


@pytest.mark.parametrize("fmt", FORMATS)
def test_torch_compile(fmt):
    """A compiled pruned model (aot_eager) computes what the eager one does,
    and training it keeps the zeros and follows the reference."""
    ref, mine = pruned_pair(fmt)
    compiled = torch.compile(mine, backend="aot_eager")
    with torch.no_grad():
        assert_close(compiled(batch(3)), mine(batch(3)))
        assert_close(compiled(batch(3)), ref(batch(3)))
    opts = [torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1) for model in (ref, mine)]
    for step in range(3):
        for opt in opts:
            opt.zero_grad()
        loss(ref, step).backward()
        loss(compiled, step).backward()
        for (r, name), (m, _) in zip(pairs(ref), pairs(mine)):
            assert_close(getattr(m, name).grad, r._parameters[name + "_orig"].grad)
        for opt in opts:
            opt.step()
        assert_pruned_zero(mine)
    with torch.no_grad():
        assert_close(compiled(batch(4)), ref(batch(4)))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("write", ["load_state_dict", "manual edit"])
def test_torch_compile_forward_after_a_write(fmt, write):
    """Values written since they were last masked are masked before a
    forward of a compiled model too: a loaded state dict whose pruned
    entries are not zero at once (load_state_dict's hook runs in eager code);
    a manual edit at the next eager forward or optimizer step, as
    docs/in_place.md says (inside the compiled graph the version check would
    cost a graph break per pruned module)."""
    ref, mine = pruned_pair(fmt)
    compiled = torch.compile(mine, backend="aot_eager")
    with torch.no_grad():
        compiled(batch(3))
        state = mine.state_dict()
        for (r, name), (m, _) in zip(pairs(ref), pairs(mine)):
            r._parameters[name + "_orig"].fill_(0.25)
            if write == "manual edit":
                getattr(m, name).fill_(0.25)
            else:
                path = next(p for p, sub in mine.named_modules() if sub is m)
                state[f"{path}.{name}"] = torch.full_like(state[f"{path}.{name}"], 0.25)
        if write == "load_state_dict":
            mine.load_state_dict(state)
        else:
            mine(batch(3))  # the eager forward masks the edit
        assert_close(compiled(batch(3)), ref(batch(3)))


@pytest.mark.parametrize("fmt", FORMATS)
def test_remove(fmt):
    """remove leaves a plain parameter (the same object) with the pruned
    values, and nothing that keeps it pruned any more."""
    ref, mine = pruned_pair(fmt)
    params = {(id(m), name): getattr(m, name) for m, name in pairs(mine)}
    expected = {(id(m), name): getattr(m, name).detach().clone() for m, name in pairs(mine)}
    for m, name in pairs(mine):
        FAST.remove(m, name)
    assert not FAST.is_pruned(mine) and not REF.is_pruned(mine)
    for m, name in pairs(mine):
        p = m._parameters[name]
        assert p is params[id(m), name] and type(p) is nn.Parameter
        assert torch.equal(p.detach(), expected[id(m), name])
        assert name + "_mask" not in m._buffers and not m._forward_pre_hooks
        assert not getattr(p, "_post_accumulate_grad_hooks", None)
    assert set(mine.state_dict()) == set(Net().state_dict())
    # Trains as an unpruned model: gradients and steps reach the old zeros.
    opt = torch.optim.SGD(mine.parameters(), lr=0.1)
    opt.zero_grad()
    loss(mine, 0).backward()
    assert all((getattr(m, name).grad != 0).any() for m, name in pairs(mine))
    opt.step()
    zeros_before = sum(int((v == 0).sum()) for v in expected.values())
    zeros_after = sum(int((getattr(m, name) == 0).sum()) for m, name in pairs(mine))
    assert zeros_after < zeros_before // 2


# ----------------------------------------------------------------------------
# The environment variable, invalid formats, layouts kept
# ----------------------------------------------------------------------------

UNMODIFIED = textwrap.dedent('''\
    import torch
    import torch.nn.utils.prune as prune

    m = torch.nn.Linear(11, 3)
    weight = m.weight
    prune.l1_unstructured(m, "weight", amount=0.5)
    prune.global_unstructured([(m, "weight"), (m, "bias")], prune.L1Unstructured, amount=2)
    x = torch.randn(2, 11)
    zeros = int((m.weight == 0).sum()) + int((m.bias == 0).sum())  # 16 + 2 pruned, stored as zeros
    print(m.weight_mask.dtype, tuple(m.weight_mask.shape), hasattr(m, "weight_orig"), m.weight is weight, zeros,
          type(m._forward_pre_hooks[next(iter(m._forward_pre_hooks))]).__module__)
    ''')


@pytest.mark.parametrize("fmt,runner", [("bits", "FASTPRUNE_PATCH=1"), ("bool", "python -m fastprune")])
def test_environment_variable_prunes_unmodified_code_in_place(fmt, runner, tmp_path, monkeypatch):
    from test_patch import run_python

    script = tmp_path / "user.py"
    script.write_text(UNMODIFIED)
    monkeypatch.setenv("FASTPRUNE_IN_PLACE", fmt)
    if runner == "FASTPRUNE_PATCH=1":
        proc = run_python([str(script)], cwd=tmp_path, env_patch="1", check_rc=0)
    else:
        proc = run_python(["-m", "fastprune", str(script)], cwd=tmp_path, check_rc=0)
    shape = "(3, 2)" if fmt == "bits" else "(3, 11)"
    assert proc.stdout.split() == [f"torch.{'uint8' if fmt == 'bits' else 'bool'}", *shape.split(), "False", "True",
                                   "18", "fastprune.prune"], proc.stdout + proc.stderr


@pytest.mark.parametrize("fmt", FORMATS)
def test_environment_variable_in_process(fmt, monkeypatch):
    ref, mine = net_pair()
    monkeypatch.setenv("FASTPRUNE_IN_PLACE", fmt.upper())
    params = {(id(m), name): getattr(m, name) for m, name in pairs(mine)}
    torch.manual_seed(7)
    first_round(FAST, mine)
    monkeypatch.delenv("FASTPRUNE_IN_PLACE")
    torch.manual_seed(7)
    first_round(REF, ref)
    assert_matches(ref, mine, fmt, params)


def test_invalid_formats_raise_and_change_nothing(monkeypatch):
    _, mine = net_pair()
    FAST.l1_unstructured(mine.head, "weight", amount=2)  # one pruned in the reference layout
    before = snapshot(mine)
    with pytest.raises(ValueError, match="nope"):
        with fastprune.in_place(mask="nope"):
            FAST.l1_unstructured(mine.fc, "weight", amount=0.5)
    with pytest.raises(ValueError):
        with fastprune.in_place("dense"):
            FAST.l1_unstructured(mine.fc, "weight", amount=0.5)
    monkeypatch.setenv("FASTPRUNE_IN_PLACE", "nope")
    with pytest.raises(ValueError, match="nope"):
        FAST.l1_unstructured(mine.fc, "weight", amount=0.5)
    with pytest.raises(ValueError, match="nope"):
        FAST.global_unstructured(pairs(mine), FAST.L1Unstructured, amount=0.5)
    assert_same_snapshot(before, snapshot(mine))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_tensor_keeps_the_layout_of_its_first_prune(fmt):
    """Reference layout first: re-pruned inside ``in_place`` it keeps
    ``<name>_orig`` and its float mask. In place first: re-pruned outside
    ``in_place``, or inside with the other format, it keeps its format. A
    global prune mixing both (and an unpruned tensor) leaves each as it was.
    Masks and values follow torch's on the same sequence throughout."""
    other = "bool" if fmt == "bits" else "bits"
    ref, mine = net_pair()
    params = {(id(m), name): getattr(m, name) for m, name in pairs(mine)}

    def check_layouts():
        assert "weight_orig" in mine.fc._parameters and mine.fc.weight_mask.dtype == torch.float32
        assert "weight" in mine.head._parameters and format_of(mine.head.weight_mask) == fmt
        fc = mine.fc.weight_orig
        assert_close(FAST.mask_of(mine.fc, "weight"), ref.fc.weight_mask != 0, rtol=0, atol=0)
        assert torch.equal(mine.fc.weight, fc * mine.fc.weight_mask)
        assert in_place_problems(ref.head, mine.head, "weight", fmt, params[id(mine.head), "weight"]) == []

    REF.l1_unstructured(ref.fc, "weight", amount=0.3)
    FAST.l1_unstructured(mine.fc, "weight", amount=0.3)
    REF.l1_unstructured(ref.head, "weight", amount=0.3)
    with fastprune.in_place(fmt):
        FAST.l1_unstructured(mine.head, "weight", amount=0.3)
    check_layouts()
    REF.ln_structured(ref.fc, "weight", amount=1, n=1, dim=0)
    REF.ln_structured(ref.head, "weight", amount=1, n=1, dim=0)
    with fastprune.in_place(fmt):
        FAST.ln_structured(mine.fc, "weight", amount=1, n=1, dim=0)
    FAST.ln_structured(mine.head, "weight", amount=1, n=1, dim=0)
    check_layouts()
    torch.manual_seed(3)
    REF.global_unstructured([(ref.fc, "weight"), (ref.head, "weight"), (ref.conv, "weight")],
                            REF.RandomUnstructured, amount=0.3)
    torch.manual_seed(3)
    with fastprune.in_place(other):
        FAST.global_unstructured([(mine.fc, "weight"), (mine.head, "weight"), (mine.conv, "weight")],
                                 FAST.RandomUnstructured, amount=0.3)
    check_layouts()
    assert in_place_problems(ref.conv, mine.conv, "weight", other, params[id(mine.conv), "weight"]) == []
    assert [type(h).__name__ for h in mine.fc._forward_pre_hooks.values()] == ["PruningContainer"]


def format_of(mask):
    return {torch.uint8: "bits", torch.bool: "bool"}.get(mask.dtype, "dense")
