// Host-side argument handling of channel_norms, shared by the CPU and CUDA
// kernels: the check of its arguments and the (outer, channels, inner) view.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

namespace fastprune {

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

}  // namespace fastprune
