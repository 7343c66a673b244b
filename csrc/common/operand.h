// The operand of every mask op (select, passes, segmented select): one
// (scores, mask) pair checked, its output buffers, and the tiny mask helpers
// they share (a broadcast mask, the bits of 1).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <cstdint>
#include <cstring>

namespace fastprune {

// A stride-0 expand of one value over every entry (read without materializing).
inline bool is_broadcast_scalar(const at::Tensor& t) {
  if (t.numel() <= 1) return false;
  for (int64_t s : t.strides()) {
    if (s != 0) return false;
  }
  return true;
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

// Calls f(bits_t{}) with the unsigned type of an element size: kernels that
// only copy or zero elements (masks, values) read and write them as raw bits.
template <typename F>
void dispatch_bits(const char* op, int64_t size, const F& f) {
  switch (size) {
    case 1: return f(uint8_t{});
    case 2: return f(uint16_t{});
    case 4: return f(uint32_t{});
    case 8: return f(uint64_t{});
    default: TORCH_CHECK(false, op, ": unsupported element size ", size);
  }
}

// One (scores, mask) pair of a mask op: the tensors it needs kept alive, and
// the result.
struct Operand {
  at::Tensor scores;  // contiguous
  at::Tensor mask;    // contiguous or broadcast
  at::Tensor out;     // returned: the mask's dtype and memory format
  at::Tensor dst;     // contiguous buffer written (out itself when contiguous)
  int64_t packed_row = 0;  // > 0: mask and out are packed bits (bits.h), rows of this many entries
};

// Allocates an uninitialized tensor with the sizes and strides of
// at::empty_like(like, dtype, format); each device file passes its own.
using EmptyLike = at::Tensor (*)(const at::Tensor& like, at::ScalarType dtype, at::MemoryFormat format);

inline at::Tensor plain_empty_like(const at::Tensor& like, at::ScalarType dtype, at::MemoryFormat format) {
  return at::empty_like(like, like.options().dtype(dtype), format);
}

// Checks what every (scores, mask) pair of a mask op must satisfy.
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

}  // namespace fastprune
