"""The packed-mask kernels and the in-place select on CUDA against the CPU,
bit for bit: pack_mask, unpack_mask, mask_packed_, the separable passes with
packed masks, prune_in_place_, and a global prune in place of CUDA
parameters against the same prune on the CPU (skipped without a GPU)."""
import pytest
import torch
import torch.nn as nn

import fastprune
import fastprune.prune as prune
from fastprune import ops
from fastprune._in_place import all_live, new_mask

from conftest import assert_bitwise_equal

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHAPES = [(), (1,), (3, 1), (5, 13), (300, 301), (2, 4096, 9), (70000,)]


def drawn(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).round().to(dtype)  # rounded: ties


def live(shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) > 0.3


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_mask_match_cpu(shape):
    m = live(shape, 0)
    packed = ops.pack_mask(m)
    assert_bitwise_equal(ops.pack_mask(m.cuda()).cpu(), packed)
    assert_bitwise_equal(ops.unpack_mask(packed.cuda(), shape).cpu(), m)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        t = drawn(shape, 1, dtype)
        cpu, gpu = t.clone(), t.cuda()
        ops.mask_packed_(cpu, packed)
        ops.mask_packed_(gpu, packed.cuda())
        assert_bitwise_equal(gpu.cpu(), cpu)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_passes_with_packed_masks_match_cpu(dtype):
    scores = [drawn(s, i, dtype) for i, s in enumerate(SHAPES)]
    masks = [ops.pack_mask(live(s, 10 + i)) for i, s in enumerate(SHAPES)]
    cuda = ([s.cuda() for s in scores], [m.cuda() for m in masks])
    for d in range(ops.pass_digits(dtype)):
        assert_bitwise_equal(ops.radix_histogram(*cuda, d, 0, only_ones=True).cpu(),
                             ops.radix_histogram(scores, masks, d, 0, only_ones=True))
    key = int(ops.radix_step(ops.radix_histogram(scores, masks, 0, 0, only_ones=True), 0, 0, 50, dtype).prefix)
    assert_bitwise_equal(ops.count_at_key(*cuda, key, only_ones=True).cpu(),
                         ops.count_at_key(scores, masks, key, only_ones=True))
    for skip, take in [(0, 0), (0, 2 ** 62), (3, 7)]:
        for c, g in zip(ops.masks_at_threshold(scores, masks, key, skip=skip, take=take, only_ones=True),
                        ops.masks_at_threshold(*cuda, key, skip=skip, take=take, only_ones=True)):
            assert_bitwise_equal(g.cpu(), c)
    ones = [all_live("bits", s) for s in scores]
    for c, g in zip(ops.masks_at_threshold(scores, ones, key, take=2 ** 62, only_ones=True),
                    ops.masks_at_threshold(cuda[0], [m.cuda() for m in ones], key, take=2 ** 62, only_ones=True)):
        assert_bitwise_equal(g.cpu(), c)


@pytest.mark.parametrize("fmt", ["bits", "bool"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prune_in_place_matches_cpu(fmt, dtype):
    values = [drawn(s, i, dtype) for i, s in enumerate(SHAPES)]
    masks = [new_mask(fmt, v) for v in values]
    gpu_values, gpu_masks = [v.cuda() for v in values], [m.cuda() for m in masks]
    k = sum(v.numel() for v in values) // 2
    ops.prune_in_place_(values, values, masks, k)
    ops.prune_in_place_(gpu_values, gpu_values, gpu_masks, k)
    for c, g in zip(values + masks, gpu_values + gpu_masks):
        assert_bitwise_equal(g.cpu(), c)


def test_global_prune_in_place_of_cuda_parameters_matches_cpu():
    torch.manual_seed(0)
    cpu = nn.Sequential(nn.Linear(64, 37), nn.Linear(37, 9))
    gpu = nn.Sequential(nn.Linear(64, 37), nn.Linear(37, 9)).cuda()
    gpu.load_state_dict(cpu.state_dict())
    pairs = lambda m: [(m[0], "weight"), (m[1], "weight"), (m[0], "bias")]  # noqa: E731
    with fastprune.in_place("bits"):
        for model in (cpu, gpu):
            prune.global_unstructured(pairs(model), prune.L1Unstructured, amount=0.4)
            prune.global_unstructured(pairs(model), prune.L1Unstructured, amount=5)
    for (c, name), (g, _) in zip(pairs(cpu), pairs(gpu)):
        assert_bitwise_equal(getattr(g, name + "_mask").cpu(), getattr(c, name + "_mask"))
        assert_bitwise_equal(getattr(g, name).detach().cpu(), getattr(c, name).detach())
