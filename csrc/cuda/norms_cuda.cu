// CUDA kernel of channel_norms: the same norms as csrc/cpu/norms_cpu.cpp,
// through the reductions of csrc/common/norms.h (float64 accumulation; the
// order of the additions differs from the CPU's, as between thread counts).
//
// One block per channel: its threads stride over the channel's outer * inner
// entries of the (outer, channels, inner) view (see channel_view), fold them,
// and a block reduction combines the threads' partial results.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>

#include <limits>

#include "../common/channel_view.h"
#include "../common/norms.h"

namespace fastprune {
namespace {

constexpr int kNormThreads = 256;

template <NormKind K>
struct Combine {
  __device__ double operator()(double a, double b) const { return norm_combine<K>(a, b); }
};

template <NormKind K, typename scalar_t>
__global__ void channel_norms_kernel(
    const scalar_t* x, int64_t outer, int64_t channels, int64_t inner, double p, double* out) {
  const int64_t c = blockIdx.x;
  const int64_t per_channel = outer * inner;
  double acc = norm_identity<K>();
  for (int64_t j = threadIdx.x; j < per_channel; j += kNormThreads) {
    const int64_t o = j / inner, i = j - o * inner;
    acc = norm_combine<K>(acc, norm_term<K>(x[(o * channels + c) * inner + i], p));
  }
  using Reduce = cub::BlockReduce<double, kNormThreads>;
  __shared__ typename Reduce::TempStorage temp;
  const double total = Reduce(temp).Reduce(acc, Combine<K>());
  if (threadIdx.x == 0) out[c] = norm_finish<K>(total, p);
}

at::Tensor channel_norms_cuda(const at::Tensor& t, int64_t dim, double p) {
  c10::cuda::CUDAGuard guard(t.device());
  const ChannelView v = channel_view(t, dim);
  at::Tensor out = at::empty({v.channels}, t.options().dtype(at::kDouble));
  if (v.channels == 0) return out;
  TORCH_CHECK(v.channels <= std::numeric_limits<int32_t>::max(),
              "channel_norms: at most 2^31 - 1 channels on CUDA, got ", v.channels);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "channel_norms", [&] {
    dispatch_norm_kind(norm_kind(p), [&](auto tag) {
      channel_norms_kernel<decltype(tag)::value, scalar_t>
          <<<static_cast<unsigned>(v.channels), kNormThreads, 0, stream>>>(
              v.data.const_data_ptr<scalar_t>(), v.outer, v.channels, v.inner, p,
              out.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("channel_norms", &channel_norms_cuda);
}

}  // namespace fastprune
