// Packed masks (the in-place layout's mask="bits"), shared by the CPU and
// CUDA kernels: one bit per entry. A tensor is read as rows of its last
// dimension (a 0-d tensor as one row of one entry); a row of n entries is
// packed into ceil(n / 8) bytes, entry 8 b + j in bit j (least significant
// first) of byte b, the padding bits of a row's last byte 0. So a packed mask
// has the shape (*shape[:-1], ceil(shape[-1] / 8)), and (1,) for a 0-d tensor.
#pragma once

#include <ATen/ATen.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <vector>

#include "select.h"

namespace fastprune {

// The bytes of one packed row of n entries.
C10_HOST_DEVICE inline int64_t packed_row_bytes(int64_t n) { return (n + 7) / 8; }

// Entries [8 b, 8 b + width) of a row share byte b: width is 8 except in a
// row's last byte.
C10_HOST_DEVICE inline int byte_width(int64_t b, int64_t n) {
  const int64_t left = n - 8 * b;
  return left < 8 ? static_cast<int>(left) : 8;
}

// Byte b of the packed row `row` (n entries): bit j set where entry 8 b + j
// is nonzero.
template <typename T>
C10_HOST_DEVICE inline uint8_t pack_byte(const T* row, int64_t b, int64_t n) {
  const int width = byte_width(b, n);
  uint32_t byte = 0;
  for (int j = 0; j < width; ++j) byte |= static_cast<uint32_t>(row[8 * b + j] != T(0)) << j;
  return static_cast<uint8_t>(byte);
}

// Zeroes the entries of byte b's span of `row` whose bit is clear (a whole
// byte in a loop of constant length, which unrolls).
template <typename T>
C10_HOST_DEVICE inline void zero_cleared(T* row, int64_t b, int64_t n, uint8_t byte) {
  if (byte == 0xFF) return;
  T* p = row + 8 * b;
  const int width = byte_width(b, n);
  if (width == 8) {
    for (int j = 0; j < 8; ++j) p[j] = keep_or_zero(p[j], ((byte >> j) & 1) != 0);
    return;
  }
  for (int j = 0; j < width; ++j) p[j] = keep_or_zero(p[j], ((byte >> j) & 1) != 0);
}

// Host side: the packed shape of a tensor of shape `sizes`.
inline std::vector<int64_t> packed_sizes(at::IntArrayRef sizes) {
  if (sizes.empty()) return {1};
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = packed_row_bytes(out.back());
  return out;
}

// Host side: a tensor of shape `sizes` as packed rows.
struct PackedRows {
  int64_t rows, n, bytes;  // rows, entries per row, bytes per packed row
};

inline PackedRows packed_rows(at::IntArrayRef sizes) {
  const int64_t n = sizes.empty() ? 1 : sizes.back();
  int64_t rows = 1;
  for (size_t d = 0; d + 1 < sizes.size(); ++d) rows *= sizes[d];
  return {n == 0 ? 0 : rows, n, packed_row_bytes(n)};
}

// Host side: checks that `packed` is the packed mask of a tensor `t`.
inline void check_packed(const char* op, const at::Tensor& t, const at::Tensor& packed) {
  TORCH_CHECK(packed.scalar_type() == at::kByte, op, ": a packed mask is uint8, got ", packed.scalar_type());
  TORCH_CHECK(
      packed.sizes() == at::IntArrayRef(packed_sizes(t.sizes())), op, ": a tensor of shape ", t.sizes(),
      " has a packed mask of shape ", at::IntArrayRef(packed_sizes(t.sizes())), ", got ", packed.sizes());
  TORCH_CHECK(t.device() == packed.device(), op, ": the tensor and its packed mask must be on one device, got ",
              t.device(), " and ", packed.device());
}

// Host side: checks the arguments of unpack_mask and allocates its result,
// the bool mask of shape (*packed.shape[:-1], n).
inline at::Tensor unpacked_empty(const at::Tensor& packed, int64_t n) {
  TORCH_CHECK(n >= 0, "unpack_mask: n must be >= 0, got ", n);
  TORCH_CHECK(packed.dim() >= 1, "unpack_mask: expected a packed mask with at least one dimension");
  std::vector<int64_t> sizes(packed.sizes().begin(), packed.sizes().end());
  sizes.back() = n;
  at::Tensor out = at::empty(sizes, packed.options().dtype(at::kBool));
  check_packed("unpack_mask", out, packed);
  return out;
}

}  // namespace fastprune
