// Host-side argument handling of segmented_mask, shared by the CPU and CUDA
// kernels: the operand laid out in segment order, the mask's raw bits, the
// count error and the result.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "operand.h"

namespace fastprune {

// The operands of segmented_mask with every segment a run of `length`
// consecutive entries of the contiguous buffers: slices along `dim` (group
// 0) are read with `dim` moved first, groups of `group` entries along `dim`
// with `dim` moved last. Either keeps the row-major order inside a segment,
// and is a view, not a copy, when the tensor already has that layout (a
// contiguous tensor with dim first for slices; dim last, or channels_last with
// dim 1, for groups); other layouts are copied once.
struct SegmentedOperand {
  Operand op;       // scores, mask (or a broadcast), out and dst, in segment order
  at::Tensor view;  // out seen in segment order; dst is copied there when distinct
  int64_t length;   // entries per segment
  int64_t segments;
};

inline SegmentedOperand make_segmented_operand(
    const at::Tensor& scores, const at::Tensor& mask, int64_t dim, int64_t group,
    int64_t count, double fraction, bool keep, EmptyLike empty_like = plain_empty_like) {
  check_pair(scores, mask);
  TORCH_CHECK_INDEX(
      scores.dim() >= 1,
      "segmented_mask: expected a tensor with at least one dimension, got shape ", scores.sizes());
  dim = c10::maybe_wrap_dim(dim, scores.dim());
  const int64_t size = scores.size(dim);
  TORCH_CHECK_VALUE(group >= 0, "segmented_mask: group must be >= 0, got ", group);
  TORCH_CHECK_VALUE(
      group == 0 || size % group == 0,
      "segmented_mask: the size of dim ", dim, " (", size,
      ") must be a multiple of the group size ", group, ", got shape ", scores.sizes());
  TORCH_CHECK_VALUE(
      !keep || count >= 0, "segmented_mask: keep needs a count >= 0, got ", count);
  TORCH_CHECK_VALUE(
      fraction >= 0.0 && fraction <= 1.0,
      "segmented_mask: fraction must lie in [0, 1], got ", fraction);
  const int64_t to = group == 0 ? 0 : scores.dim() - 1;
  const bool broadcast = is_broadcast_scalar(mask);
  SegmentedOperand s;
  s.op.out = empty_like(broadcast ? scores : mask, mask.scalar_type(), at::MemoryFormat::Preserve);
  s.op.scores = scores.movedim(dim, to).contiguous();
  s.op.mask = broadcast ? mask : mask.movedim(dim, to).contiguous();
  s.view = s.op.out.movedim(dim, to);
  s.op.dst = s.view.is_contiguous()
      ? s.view
      : empty_like(s.view, s.view.scalar_type(), at::MemoryFormat::Contiguous);
  const int64_t numel = scores.numel();
  s.length = group > 0 ? group : (size == 0 ? 0 : numel / size);
  s.segments = s.length == 0 ? 0 : numel / s.length;
  return s;
}

// The error of a segment asked to prune more entries than it has live ones.
inline void fail_segment_count(
    int64_t segment, int64_t live, int64_t prune) {
  TORCH_CHECK_VALUE(
      false, "segmented_mask: cannot prune ", prune, " entries of segment ", segment,
      ", which has ", live, " live entries (mask == 1)");
}

// The result of a segmented select, its values copied into `out`'s layout
// where that is not the segment order.
inline at::Tensor take_output(SegmentedOperand& s) {
  if (!s.op.dst.is_same(s.view)) s.view.copy_(s.op.dst);
  return std::move(s.op.out);
}

}  // namespace fastprune
