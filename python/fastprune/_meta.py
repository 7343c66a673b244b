"""Fake (meta) kernels: shapes, dtypes and strides of every op's result."""
import torch

from .ops import is_broadcast_one, packed_shape


@torch.library.register_fake("fastprune::unstructured_mask")
def _unstructured_mask_fake(scores, mask, count, fraction, only_ones, largest):
    torch._check(scores.shape == mask.shape, lambda: "unstructured_mask: scores and mask must have the same shape")
    torch._check(scores.is_floating_point(), lambda: "unstructured_mask: scores must be a floating point tensor")
    if is_broadcast_one(mask):
        return torch.empty_like(scores, dtype=mask.dtype)
    return torch.empty_like(mask)


@torch.library.register_fake("fastprune::global_unstructured_masks")
def _global_unstructured_masks_fake(scores, masks, count, fraction, only_ones, largest):
    torch._check(len(scores) == len(masks), lambda: "global_unstructured_masks: as many masks as scores")
    return [_unstructured_mask_fake(s, m, count, fraction, only_ones, largest) for s, m in zip(scores, masks)]


@torch.library.register_fake("fastprune::segmented_mask")
def _segmented_mask_fake(scores, mask, dim, group, count, fraction, keep):
    torch._check(scores.shape == mask.shape, lambda: "segmented_mask: scores and mask must have the same shape")
    torch._check(scores.is_floating_point(), lambda: "segmented_mask: scores must be a floating point tensor")
    torch._check(scores.dim() >= 1, lambda: "segmented_mask: expected a tensor with at least one dimension")
    size = scores.shape[dim]
    torch._check(group >= 0 and (group == 0 or size % group == 0),
                 lambda: f"segmented_mask: the size of dim {dim} ({size}) must be a multiple of the group size {group}")
    if is_broadcast_one(mask):
        return torch.empty_like(scores, dtype=mask.dtype)
    return torch.empty_like(mask)


@torch.library.register_fake("fastprune::channel_norms")
def _channel_norms_fake(t, dim, p):
    torch._check(t.is_floating_point(), lambda: "channel_norms: expected a floating point tensor")
    torch._check(t.dim() >= 1, lambda: "channel_norms: expected a tensor with at least one dimension")
    return t.new_empty((t.shape[dim],), dtype=torch.float64)


@torch.library.register_fake("fastprune::cached_empty_like")
def _cached_empty_like_fake(t):
    return torch.empty_like(t)


def _check_pass_inputs(op, scores, masks):
    torch._check(len(scores) == len(masks), lambda: f"{op}: as many masks as scores")
    torch._check(len(scores) > 0, lambda: f"{op}: expected at least one tensor")
    for s, m in zip(scores, masks):
        torch._check(s.shape == m.shape, lambda: f"{op}: scores and mask must have the same shape")
        torch._check(s.is_floating_point(), lambda: f"{op}: scores must be a floating point tensor")


@torch.library.register_fake("fastprune::radix_histogram")
def _radix_histogram_fake(scores, masks, digit, prefix, only_ones, largest):
    _check_pass_inputs("radix_histogram", scores, masks)
    return scores[0].new_empty((2048,), dtype=torch.int64)


@torch.library.register_fake("fastprune::count_at_key")
def _count_at_key_fake(scores, masks, key, only_ones, largest):
    _check_pass_inputs("count_at_key", scores, masks)
    return scores[0].new_empty((len(scores),), dtype=torch.int64)


@torch.library.register_fake("fastprune::masks_at_threshold")
def _masks_at_threshold_fake(scores, masks, key, skip, take, only_ones, largest):
    torch._check(len(scores) == len(masks), lambda: "masks_at_threshold: as many masks as scores")
    return [_unstructured_mask_fake(s, m, 0, 0.0, only_ones, largest) for s, m in zip(scores, masks)]


@torch.library.register_fake("fastprune::pack_mask")
def _pack_mask_fake(mask):
    return mask.new_empty(packed_shape(mask.shape), dtype=torch.uint8)


@torch.library.register_fake("fastprune::unpack_mask")
def _unpack_mask_fake(packed, n):
    torch._check(packed.dim() >= 1, lambda: "unpack_mask: expected a packed mask with at least one dimension")
    torch._check(packed.dtype == torch.uint8, lambda: "unpack_mask: a packed mask is uint8")
    torch._check(packed.shape[-1] == (n + 7) // 8, lambda: "unpack_mask: the packed mask's last size is not ceil(n / 8)")
    return packed.new_empty((*packed.shape[:-1], n), dtype=torch.bool)


@torch.library.register_fake("fastprune::mask_packed_")
def _mask_packed_fake(t, packed):
    torch._check(tuple(packed.shape) == packed_shape(t.shape), lambda: "mask_packed_: the packed mask's shape")
    torch._check(packed.dtype == torch.uint8, lambda: "mask_packed_: a packed mask is uint8")


@torch.library.register_fake("fastprune::prune_in_place_")
def _prune_in_place_fake(values, scores, masks, count, largest):
    torch._check(len(values) == len(scores) == len(masks), lambda: "prune_in_place_: as many values, scores, masks")
    for v, s, m in zip(values, scores, masks):
        torch._check(v.shape == s.shape, lambda: "prune_in_place_: scores of the values' shape")
        torch._check(m.shape == v.shape if m.dtype == torch.bool else tuple(m.shape) == packed_shape(v.shape),
                     lambda: "prune_in_place_: a bool mask of the values' shape or their packed mask")
