// Host-side argument handling of the unstructured select and its separable
// passes, shared by the CPU and CUDA kernels: the operands of one or several
// tensors, the checks of counts, keys, digits and tie windows, and the results.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "bits.h"
#include "operand.h"
#include "select.h"

namespace fastprune {

// One tensor of a select: checked, its scores (and a mask that is not a
// broadcast) read contiguous, its result allocated.
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

// Whether `mask` is the packed mask (bits.h) of scores: uint8 of the packed
// shape, where that is not the scores' own (for a last dim of 1 the packed
// bytes and a 0/1 uint8 mask are the same thing, and are read as the latter).
inline bool is_packed_mask(const at::Tensor& scores, const at::Tensor& mask) {
  return mask.scalar_type() == at::kByte && scores.sizes() != mask.sizes() &&
      mask.sizes() == at::IntArrayRef(packed_sizes(scores.sizes()));
}

// One (scores, mask) pair of a separable pass: a mask of the scores' shape
// (as make_operand checks it), or its packed mask. With `write`, the result
// is allocated as masks_at_threshold returns it: the mask's format (a packed
// result is contiguous and zeroed, its bytes a multiple of 4 for the CUDA
// kernel's 32-bit writes).
inline Operand make_pass_operand(
    const at::Tensor& scores, const at::Tensor& mask, bool write, EmptyLike empty_like = plain_empty_like) {
  if (!is_packed_mask(scores, mask)) {
    if (write) return make_operand(scores, mask, empty_like);
    check_pair(scores, mask);
    Operand op;
    op.scores = scores.contiguous();
    op.mask = is_broadcast_scalar(mask) ? mask : mask.contiguous();
    return op;
  }
  TORCH_CHECK(
      at::isFloatingType(scores.scalar_type()),
      "fastprune: scores must be a floating point tensor, got ", scores.scalar_type());
  TORCH_CHECK(
      scores.device() == mask.device(), "fastprune: scores and mask must be on the same device, got ",
      scores.device(), " and ", mask.device());
  Operand op;
  op.scores = scores.contiguous();
  op.mask = is_broadcast_scalar(mask) ? mask : mask.contiguous();
  op.packed_row = std::max<int64_t>(packed_rows(scores.sizes()).n, 1);
  if (write) {
    const std::vector<int64_t> sizes = packed_sizes(scores.sizes());
    int64_t bytes = 1;
    for (int64_t s : sizes) bytes *= s;
    op.out = at::zeros({(bytes + 3) / 4 * 4}, mask.options()).narrow(0, 0, bytes).view(sizes);
    op.dst = op.out;
  }
  return op;
}

// The operands of a separable pass, checked as one select's.
inline std::vector<Operand> make_pass_operands(
    const char* op, at::TensorList scores, at::TensorList masks, bool write,
    EmptyLike empty_like = plain_empty_like) {
  TORCH_CHECK(
      scores.size() == masks.size(), op, ": got ", scores.size(),
      " score tensors and ", masks.size(), " masks");
  TORCH_CHECK(write || !scores.empty(), op, ": expected at least one tensor");
  std::vector<Operand> ops;
  for (size_t i = 0; i < scores.size(); ++i) {
    ops.push_back(make_pass_operand(scores[i], masks[i], write, empty_like));
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

}  // namespace fastprune
