// CPU kernels of the packed masks (csrc/common/bits.h): pack, unpack, and
// zero a tensor where its packed mask is clear. Rows are split across
// threads; every byte is written by one thread. A row's whole bytes go eight
// entries per SIMD step with software prefetch (lanes.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <type_traits>

#include "../common/bits.h"
#include "../common/operand.h"
#include "lanes.h"

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
    // An entry is nonzero when its bits are, but for a float's sign (-0.0 == 0).
    using bits_t = BitsOf<scalar_t>;
    constexpr bool kFloat = std::is_floating_point_v<scalar_t> || std::is_same_v<scalar_t, c10::Half> ||
                            std::is_same_v<scalar_t, c10::BFloat16>;
    constexpr auto kValue = static_cast<bits_t>(kFloat ? static_cast<bits_t>(~bits_t{0}) >> 1 : ~bits_t{0});
    at::parallel_for(0, r.rows, row_grain(r.n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        const scalar_t* in = x + row * r.n;
        uint8_t* out = o + row * r.bytes;
        int64_t b = 0;
        for (; b < r.n / 8; ++b) {  // whole bytes: eight entries per SIMD step
          prefetch_ahead(in + 8 * b);
          out[b] = bits_of<bits_t>(lane_mask<bits_t>((load_lanes<bits_t>(in + 8 * b) & kValue) != 0));
        }
        for (; b < r.bytes; ++b) out[b] = pack_byte(in, b, r.n);
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
  // Zeroing acts on the bits, so the values go by their size: whole bytes'
  // eight entries per SIMD step, a row's last byte by zero_cleared.
  dispatch_bits("mask_packed_", t.element_size(), [&](auto zero) {
    using bits_t = decltype(zero);
    bits_t* v = static_cast<bits_t*>(t.mutable_data_ptr());
    at::parallel_for(0, r.rows, row_grain(r.n), [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        bits_t* values = v + row * r.n;
        const uint8_t* bytes = x + row * r.bytes;
        int64_t b = 0;
        for (; b < r.n / 8; ++b) {
          prefetch_ahead<true>(values + 8 * b);
          if (bytes[b] != 0xFF) {
            store_lanes<bits_t>(values + 8 * b, load_lanes<bits_t>(values + 8 * b) & lanes_of<bits_t>(bytes[b]));
          }
        }
        for (; b < r.bytes; ++b) zero_cleared(values, b, r.n, bytes[b]);
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
