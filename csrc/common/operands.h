// Host-side argument handling shared by the CPU and CUDA kernels: validation,
// the result's layout, and the buffers the kernels read and write.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <vector>

#include "select.h"

namespace fastprune {

// A stride-0 expand of one value over every entry (read without materializing).
inline bool is_broadcast_scalar(const at::Tensor& t) {
  if (t.numel() <= 1) return false;
  for (int64_t s : t.strides()) {
    if (s != 0) return false;
  }
  return true;
}

// One tensor of a select: the tensors it needs kept alive, and the result.
struct Operand {
  at::Tensor scores;  // contiguous
  at::Tensor mask;    // contiguous or broadcast
  at::Tensor out;     // returned: the mask's dtype and memory format
  at::Tensor dst;     // contiguous buffer written (out itself when contiguous)
};

// Allocates an uninitialized tensor with the sizes and strides of
// at::empty_like(like, dtype, format); each device file passes its own.
using EmptyLike = at::Tensor (*)(const at::Tensor& like, at::ScalarType dtype, at::MemoryFormat format);

inline at::Tensor plain_empty_like(const at::Tensor& like, at::ScalarType dtype, at::MemoryFormat format) {
  return at::empty_like(like, like.options().dtype(dtype), format);
}

// Checks what every (scores, mask) pair of a select must satisfy.
inline void check_pair(const at::Tensor& scores, const at::Tensor& mask) {
  TORCH_CHECK(
      scores.sizes() == mask.sizes(),
      "fastprune: scores and mask must have the same shape, got ",
      scores.sizes(), " vs ", mask.sizes());
  TORCH_CHECK(
      at::isFloatingType(scores.scalar_type()),
      "fastprune: scores must be a floating point tensor, got ",
      scores.scalar_type());
  TORCH_CHECK(
      scores.device() == mask.device(),
      "fastprune: scores and mask must be on the same device, got ",
      scores.device(), " and ", mask.device());
}

inline Operand make_operand(
    const at::Tensor& scores, const at::Tensor& mask, EmptyLike empty_like = plain_empty_like) {
  check_pair(scores, mask);
  // Same memory format as the mask (what clone/ones_like would give); a
  // broadcast mask follows the scores instead.
  const bool broadcast = is_broadcast_scalar(mask);
  Operand op;
  const auto preserve = at::MemoryFormat::Preserve;
  op.out = empty_like(broadcast ? scores : mask, mask.scalar_type(), preserve);
  op.scores = scores.contiguous();
  op.mask = broadcast ? mask : mask.contiguous();
  op.dst = op.out.is_contiguous()
      ? op.out
      : empty_like(op.out, op.out.scalar_type(), at::MemoryFormat::Contiguous);
  return op;
}

inline std::vector<Operand> make_operands(
    at::TensorList scores, at::TensorList masks, EmptyLike empty_like = plain_empty_like) {
  TORCH_CHECK(
      scores.size() == masks.size(),
      "global_unstructured_masks: got ", scores.size(), " score tensors and ",
      masks.size(), " masks");
  std::vector<Operand> ops;
  for (size_t i = 0; i < scores.size(); ++i) {
    ops.push_back(make_operand(scores[i], masks[i], empty_like));
  }
  return ops;
}

// The inputs of a pass that writes nothing (radix_histogram, count_at_key):
// scores and masks read in place (contiguous or a broadcast mask), no output.
inline std::vector<Operand> make_pass_inputs(
    const char* op, at::TensorList scores, at::TensorList masks) {
  TORCH_CHECK(
      scores.size() == masks.size(), op, ": got ", scores.size(),
      " score tensors and ", masks.size(), " masks");
  TORCH_CHECK(!scores.empty(), op, ": expected at least one tensor");
  std::vector<Operand> ops;
  for (size_t i = 0; i < scores.size(); ++i) {
    check_pair(scores[i], masks[i]);
    Operand op_i;
    op_i.scores = scores[i].contiguous();
    op_i.mask = is_broadcast_scalar(masks[i]) ? masks[i] : masks[i].contiguous();
    ops.push_back(std::move(op_i));
  }
  return ops;
}

// A key passed through an `int` schema argument: keys are below 2^63 (the
// key transform clears the sign bit), so they travel as non-negative int64.
template <typename key_t>
key_t pass_key(const char* op, int64_t key) {
  TORCH_CHECK(
      key >= 0 && static_cast<uint64_t>(key) <= static_cast<uint64_t>(static_cast<key_t>(~key_t{0})),
      op, ": key must lie in [0, ", static_cast<uint64_t>(static_cast<key_t>(~key_t{0})),
      "] for these scores, got ", key);
  return static_cast<key_t>(key);
}

inline void check_pass_digit(const char* op, int64_t digit, int digits) {
  TORCH_CHECK(
      digit >= 0 && digit < digits, op, ": digit must lie in [0, ", digits,
      ") for these scores, got ", digit);
}

inline void check_tie_window(const char* op, int64_t skip, int64_t take) {
  TORCH_CHECK(
      skip >= 0 && take >= 0, op, ": skip and take must be non-negative, got ",
      skip, " and ", take);
}

// k of a select over n candidates: `count`, or round(fraction * n) when
// count < 0; more than n is a ValueError.
inline int64_t prune_count(int64_t count, double fraction, int64_t n) {
  const int64_t k = count >= 0 ? count : round_half_even(fraction, n);
  TORCH_CHECK_VALUE(
      k <= n, "fastprune: cannot prune ", k, " entries out of ", n,
      " candidates");
  return k;
}

// Checks what all tensors of one select must share.
inline void check_operands(const std::vector<Operand>& ops, double fraction) {
  TORCH_CHECK(
      fraction >= 0.0 && fraction <= 1.0,
      "fastprune: fraction must lie in [0, 1], got ", fraction);
  for (const Operand& op : ops) {
    TORCH_CHECK(
        op.scores.scalar_type() == ops[0].scores.scalar_type(),
        "fastprune: all scores must have one dtype, got ",
        ops[0].scores.scalar_type(), " and ", op.scores.scalar_type());
    TORCH_CHECK(
        op.scores.device() == ops[0].scores.device(),
        "fastprune: all tensors must be on one device, got ",
        ops[0].scores.device(), " and ", op.scores.device());
  }
}

// The results, copied into their memory format where that is not contiguous.
inline std::vector<at::Tensor> take_outputs(std::vector<Operand>& ops) {
  std::vector<at::Tensor> outs;
  for (Operand& op : ops) {
    if (!op.dst.is_same(op.out)) op.out.copy_(op.dst);
    outs.push_back(std::move(op.out));
  }
  return outs;
}

// A tensor read as (outer, channels, inner) contiguous entries: channel c of
// outer slice o is the run data[(o * channels + c) * inner, ... + inner).
struct ChannelView {
  at::Tensor data;  // contiguous; keeps a copy alive when one was needed
  int64_t outer, channels, inner;
};

// Checks the arguments of channel_norms and views `t` by channel along `dim`
// without copying when its memory is dense in any dimension order
// (contiguous, channels_last, transposed, ...); other layouts are copied.
inline ChannelView channel_view(const at::Tensor& t, int64_t dim) {
  TORCH_CHECK(
      at::isFloatingType(t.scalar_type()),
      "channel_norms: expected a floating point tensor, got ", t.scalar_type());
  TORCH_CHECK(t.dim() >= 1, "channel_norms: expected a tensor with at least one dimension");
  dim = c10::maybe_wrap_dim(dim, t.dim());
  // Dimensions by decreasing stride: a dense tensor permuted so is contiguous.
  std::vector<int64_t> order(t.dim());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return t.stride(a) > t.stride(b);
  });
  at::Tensor v = t.permute(order);
  if (!v.is_contiguous()) {
    v = t.contiguous();
    std::iota(order.begin(), order.end(), 0);
  }
  const auto pos = std::find(order.begin(), order.end(), dim) - order.begin();
  ChannelView view{v, 1, t.size(dim), 1};
  for (int64_t i = 0; i < t.dim(); ++i) {
    if (i < pos) view.outer *= v.size(i);
    if (i > pos) view.inner *= v.size(i);
  }
  return view;
}

// The bits of the value 1 in a mask dtype (any real dtype or bool).
inline uint64_t one_bits(at::ScalarType type) {
  uint64_t bits = 0;
  AT_DISPATCH_ALL_TYPES_AND3(
      at::kHalf, at::kBFloat16, at::kBool, type, "fastprune_one_bits", [&] {
        const scalar_t one(1);
        std::memcpy(&bits, &one, sizeof(one));
      });
  return bits;
}

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

// Calls f(bits_t{}) with the unsigned type of a mask's element size: the
// segmented kernels read and write masks as raw bits.
template <typename F>
void dispatch_mask_bits(int64_t size, const F& f) {
  switch (size) {
    case 1: return f(uint8_t{});
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
    default: TORCH_CHECK(false, "segmented_mask: unsupported mask element size ", size);
  }
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
