// CUDA kernels of the packed masks: the same results as csrc/cpu/bits_cpu.cpp
// through csrc/common/bits.h. One thread per packed byte (8 entries).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../common/bits.h"

namespace fastprune {
namespace {

constexpr int kBitsThreads = 256;

unsigned blocks_for(int64_t bytes) {
  return static_cast<unsigned>((bytes + kBitsThreads - 1) / kBitsThreads);
}

template <typename scalar_t>
__global__ void pack_kernel(const scalar_t* x, PackedRows r, uint8_t* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kBitsThreads) + threadIdx.x;
  if (i >= r.rows * r.bytes) return;
  const int64_t row = i / r.bytes, b = i - row * r.bytes;
  out[i] = pack_byte(x + row * r.n, b, r.n);
}

__global__ void unpack_kernel(const uint8_t* packed, PackedRows r, bool* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kBitsThreads) + threadIdx.x;
  if (i >= r.rows * r.bytes) return;
  const int64_t row = i / r.bytes, b = i - row * r.bytes;
  const int width = byte_width(b, r.n);
  for (int j = 0; j < width; ++j) out[row * r.n + 8 * b + j] = (packed[i] >> j) & 1;
}

template <typename scalar_t>
__global__ void mask_kernel(scalar_t* v, PackedRows r, const uint8_t* packed) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(kBitsThreads) + threadIdx.x;
  if (i >= r.rows * r.bytes) return;
  const int64_t row = i / r.bytes, b = i - row * r.bytes;
  zero_cleared(v + row * r.n, b, r.n, packed[i]);
}

at::Tensor pack_mask_cuda(const at::Tensor& mask) {
  c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty(packed_sizes(mask.sizes()), mask.options().dtype(at::kByte));
  const PackedRows r = packed_rows(mask.sizes());
  if (r.rows * r.bytes == 0) return out;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, m.scalar_type(), "pack_mask", [&] {
    pack_kernel<scalar_t><<<blocks_for(r.rows * r.bytes), kBitsThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        m.const_data_ptr<scalar_t>(), r, out.mutable_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor unpack_mask_cuda(const at::Tensor& packed, int64_t n) {
  c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = unpacked_empty(packed, n);
  const at::Tensor p = packed.contiguous();
  const PackedRows r = packed_rows(out.sizes());
  if (r.rows * r.bytes == 0) return out;
  unpack_kernel<<<blocks_for(r.rows * r.bytes), kBitsThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      p.const_data_ptr<uint8_t>(), r, out.mutable_data_ptr<bool>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void mask_packed_cuda(const at::Tensor& t, const at::Tensor& packed) {
  c10::cuda::CUDAGuard guard(t.device());
  check_packed("mask_packed_", t, packed);
  TORCH_CHECK(t.is_contiguous(), "mask_packed_: the tensor must be contiguous");
  const at::Tensor p = packed.contiguous();
  const PackedRows r = packed_rows(t.sizes());
  if (r.rows * r.bytes == 0) return;
  AT_DISPATCH_ALL_TYPES_AND3(at::kHalf, at::kBFloat16, at::kBool, t.scalar_type(), "mask_packed_", [&] {
    mask_kernel<scalar_t><<<blocks_for(r.rows * r.bytes), kBitsThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        t.mutable_data_ptr<scalar_t>(), r, p.const_data_ptr<uint8_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("pack_mask", &pack_mask_cuda);
  m.impl("unpack_mask", &unpack_mask_cuda);
  m.impl("mask_packed_", &mask_packed_cuda);
}

}  // namespace fastprune
