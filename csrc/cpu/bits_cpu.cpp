// CPU kernels of the packed masks (csrc/common/bits.h): pack, unpack, and
// zero a tensor where its packed mask is clear. Rows are split across
// threads; every byte is written by one thread.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../common/bits.h"

namespace fastprune {
namespace {

// Rows per parallel task: at least ~64K entries each.
int64_t row_grain(int64_t n) { return std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(n, 1)); }

at::Tensor pack_mask_cpu(const at::Tensor& mask) {
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty(packed_sizes(mask.sizes()), mask.options().dtype(at::kByte));
  const PackedRows r = packed_rows(mask.sizes());
  uint8_t* o = out.mutable_data_ptr<uint8_t>();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, m.scalar_type(), "pack_mask", [&] {
    const scalar_t* x = m.const_data_ptr<scalar_t>();
    at::parallel_for(0, r.rows, row_grain(r.n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t b = 0; b < r.bytes; ++b) o[row * r.bytes + b] = pack_byte(x + row * r.n, b, r.n);
      }
    });
  });
  return out;
}

at::Tensor unpack_mask_cpu(const at::Tensor& packed, int64_t n) {
  at::Tensor out = unpacked_empty(packed, n);
  const at::Tensor p = packed.contiguous();
  const PackedRows r = packed_rows(out.sizes());
  const uint8_t* x = p.const_data_ptr<uint8_t>();
  bool* o = out.mutable_data_ptr<bool>();
  at::parallel_for(0, r.rows, row_grain(r.n), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      for (int64_t i = 0; i < r.n; ++i) o[row * r.n + i] = (x[row * r.bytes + i / 8] >> (i % 8)) & 1;
    }
  });
  return out;
}

void mask_packed_cpu(const at::Tensor& t, const at::Tensor& packed) {
  check_packed("mask_packed_", t, packed);
  TORCH_CHECK(t.is_contiguous(), "mask_packed_: the tensor must be contiguous");
  const at::Tensor p = packed.contiguous();
  const PackedRows r = packed_rows(t.sizes());
  const uint8_t* x = p.const_data_ptr<uint8_t>();
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, t.scalar_type(), "mask_packed_", [&] {
    scalar_t* v = t.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, r.rows, row_grain(r.n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        for (int64_t b = 0; b < r.bytes; ++b) zero_cleared(v + row * r.n, b, r.n, x[row * r.bytes + b]);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("pack_mask", &pack_mask_cpu);
  m.impl("unpack_mask", &unpack_mask_cpu);
  m.impl("mask_packed_", &mask_packed_cpu);
}

}  // namespace fastprune
