// CPU kernel of channel_norms: the norm of every channel of a tensor along one
// dimension, in one read of the tensor, with the reductions of
// csrc/common/norms.h.
//
// The tensor is read as (outer, channels, inner) contiguous runs (see
// channel_view). Threads take contiguous ranges of runs and fold each run into
// their own row of per-channel accumulators, which are combined at the end, so
// any dimension (first, middle, last, channels_last) is one sequential pass.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../common/channel_view.h"
#include "../common/norms.h"

namespace fastprune {
namespace {

// One run of `n` entries folded into one value. Long runs use kLanes
// independent accumulators so that the loop vectorizes and the additions of
// one lane do not wait on each other (a single dependent chain caps it at one
// add per latency); short runs (a middle or last channel dim) use one, as
// setting up and combining the lanes would cost more than the run.
constexpr int kLanes = 8;

template <NormKind K, typename scalar_t>
double fold_run(const scalar_t* x, int64_t n, double p) {
  if (n < 2 * kLanes) {
    double a = norm_identity<K>();
    for (int64_t i = 0; i < n; ++i) a = norm_combine<K>(a, norm_term<K>(x[i], p));
    return a;
  }
  double acc[kLanes];
  for (double& a : acc) a = norm_identity<K>();
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      acc[j] = norm_combine<K>(acc[j], norm_term<K>(x[i + j], p));
    }
  }
  for (; i < n; ++i) {
    acc[0] = norm_combine<K>(acc[0], norm_term<K>(x[i], p));
  }
  for (int width = kLanes / 2; width > 0; width /= 2) {
    for (int j = 0; j < width; ++j) acc[j] = norm_combine<K>(acc[j], acc[j + width]);
  }
  return acc[0];
}

template <NormKind K, typename scalar_t>
void channel_norms_kernel(const ChannelView& v, double p, double* out) {
  const scalar_t* x = v.data.const_data_ptr<scalar_t>();
  const int64_t runs = v.outer * v.channels;
  const int threads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(threads) * v.channels, norm_identity<K>());
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(v.inner, 1));
  at::parallel_for(0, runs, grain, [&](int64_t begin, int64_t end) {
    double* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * v.channels;
    int64_t c = begin % v.channels;
    for (int64_t r = begin; r < end; ++r) {
      acc[c] = norm_combine<K>(acc[c], fold_run<K>(x + r * v.inner, v.inner, p));
      if (++c == v.channels) c = 0;
    }
  });
  for (int64_t c = 0; c < v.channels; ++c) {
    double total = norm_identity<K>();
    for (int t = 0; t < threads; ++t) {
      total = norm_combine<K>(total, partial[static_cast<size_t>(t) * v.channels + c]);
    }
    out[c] = norm_finish<K>(total, p);
  }
}

at::Tensor channel_norms_cpu(const at::Tensor& t, int64_t dim, double p) {
  const ChannelView v = channel_view(t, dim);
  at::Tensor out = at::empty({v.channels}, t.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "channel_norms", [&] {
    dispatch_norm_kind(norm_kind(p), [&](auto tag) {
      channel_norms_kernel<decltype(tag)::value, scalar_t>(v, p, out.mutable_data_ptr<double>());
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("channel_norms", &channel_norms_cpu);
}

}  // namespace fastprune
