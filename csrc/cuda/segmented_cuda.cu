// CUDA kernels of segmented_mask: the same masks, bit for bit, as
// csrc/cpu/segmented_cpu.cpp, through the prune count, tie rule, key and
// keep-or-zero logic of csrc/common/segments.h and select.h.
//
// One launch serves every segment (make_segmented_operand lays them out as
// consecutive runs of `length` entries):
// - short segments (N:M groups, up to kSmallSegment entries): one thread per
//   segment, rank counting on (key, position) as on the CPU;
// - long segments (rows): one block per segment (grid-stride over
//   segments). A radix select on the keys with 8-bit digits (one pass per
//   digit, 256-bin shared-memory histogram over the live entries that share
//   the digits found so far; the row stays in L2) finds the threshold key
//   and how many of its ties to prune; one write pass prunes the live
//   entries below it and the first `need` ties in position order, ranked by
//   a block scan chunk by chunk.
// An exact count above a segment's live entries is an error: the first such
// segment is recorded with atomicMin and read back (one host sync) only when
// the count is exact (a fraction or an N:M count never exceeds them).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <limits>

#include "../common/operand.h"
#include "../common/segmented_operands.h"
#include "../common/segments.h"

namespace fastprune {
namespace {

constexpr int kSegThreads = 256;
constexpr int kSegDigitBits = 8;
constexpr int kSegBins = 1 << kSegDigitBits;
constexpr int64_t kMaxBlocks = int64_t{1} << 20;
constexpr unsigned long long kNoBad = std::numeric_limits<long long>::max();

struct SegmentArgs {
  const void* scores;  // contiguous score_t, segment after segment
  const void* mask;    // contiguous, or a single value when `broadcast`
  void* out;           // contiguous, the mask's dtype
  int64_t length;
  int64_t segments;
  int64_t count;
  double fraction;
  uint64_t one;  // the bits of the value 1 in the mask's dtype
  unsigned long long* bad;  // the first segment with more to prune than live
  bool keep;
  bool broadcast;
};

template <typename score_t, typename bits_t>
__global__ void small_segments_kernel(SegmentArgs a) {
  using key_t = typename KeyOf<score_t>::type;
  const auto* scores = static_cast<const score_t*>(a.scores);
  const auto* mask = static_cast<const bits_t*>(a.mask);
  auto* out = static_cast<bits_t*>(a.out);
  const auto one = static_cast<bits_t>(a.one);
  const int n = static_cast<int>(a.length);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t s = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; s < a.segments; s += stride) {
    const int64_t base = s * a.length;
    key_t keys[kSmallSegment];
    uint32_t live[kSmallSegment];
    int64_t nlive = 0;
    for (int j = 0; j < n; ++j) {
      live[j] = mask[a.broadcast ? 0 : base + j] == one;
      keys[j] = magnitude_key(scores[base + j], false);
      nlive += live[j];
    }
    const int64_t k = segment_prune_count(nlive, a.count, a.fraction, a.keep);
    if (k > nlive) atomicMin(a.bad, static_cast<unsigned long long>(s));
    const int capped = static_cast<int>(k < n ? k : n);  // prunes every live entry from n on
    for (int j = 0; j < n; ++j) {
      const bits_t v = mask[a.broadcast ? 0 : base + j];
      out[base + j] = keep_or_zero(v, !pruned_by_rank(keys, live, n, j, capped));
    }
  }
}

template <typename score_t, typename bits_t>
__global__ void long_segments_kernel(SegmentArgs a) {
  using key_t = typename KeyOf<score_t>::type;
  constexpr int kKeyBits = static_cast<int>(sizeof(key_t) * 8);
  constexpr int kPasses = kKeyBits / kSegDigitBits;
  using Scan = cub::BlockScan<int, kSegThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ unsigned long long hist[kSegBins];
  __shared__ unsigned long long live_total;
  __shared__ key_t found_prefix;
  __shared__ long long found_rank;

  const auto* scores = static_cast<const score_t*>(a.scores);
  const auto* mask = static_cast<const bits_t*>(a.mask);
  auto* out = static_cast<bits_t*>(a.out);
  const auto one = static_cast<bits_t>(a.one);
  const int64_t n = a.length;
  for (int64_t s = blockIdx.x; s < a.segments; s += gridDim.x) {
    const int64_t base = s * n;
    auto live_at = [&](int64_t i) { return mask[a.broadcast ? 0 : base + i] == one; };
    // Radix passes: after pass d, `prefix` holds the threshold key's top
    // digits and `rank` its 1-based rank among the live keys sharing them.
    key_t prefix = 0;
    int64_t rank = 0;
    int mode = 2;  // 0: prune nothing, 1: every live entry, 2: by threshold
    for (int d = 0; d < kPasses; ++d) {
      for (int b = threadIdx.x; b < kSegBins; b += kSegThreads) hist[b] = 0;
      if (threadIdx.x == 0) live_total = 0;
      __syncthreads();
      const int shift = kKeyBits - kSegDigitBits * (d + 1);
      const key_t pmask = d == 0 ? key_t{0}
                                 : static_cast<key_t>(static_cast<key_t>(~key_t{0}) << (kKeyBits - kSegDigitBits * d));
      unsigned long long mine = 0;
      for (int64_t i = threadIdx.x; i < n; i += kSegThreads) {
        const bool live = live_at(i);
        const key_t key = magnitude_key(scores[base + i], false);
        mine += live;
        if (live && (key & pmask) == prefix) {
          atomicAdd(&hist[static_cast<uint32_t>(key >> shift) & (kSegBins - 1)], 1ull);
        }
      }
      if (d == 0) atomicAdd(&live_total, mine);
      __syncthreads();
      if (d == 0) {
        const auto nlive = static_cast<int64_t>(live_total);
        const int64_t k = segment_prune_count(nlive, a.count, a.fraction, a.keep);
        if (k > nlive && threadIdx.x == 0) atomicMin(a.bad, static_cast<unsigned long long>(s));
        rank = k;
        if (k == 0 || k >= nlive) {  // the same for every thread of the block
          mode = k == 0 ? 0 : 1;
          break;
        }
      }
      if (threadIdx.x == 0) {
        const Bucket b = find_bucket(reinterpret_cast<const int64_t*>(hist), rank);
        found_prefix = static_cast<key_t>(prefix | (static_cast<key_t>(b.bin) << shift));
        found_rank = rank - b.below;
      }
      __syncthreads();
      prefix = found_prefix;
      rank = found_rank;
      __syncthreads();  // everyone has read them before the next pass
    }
    // Write pass, chunk by chunk in position order: `offset` counts the
    // threshold ties of earlier chunks, the scan those before each entry.
    const key_t thr = prefix;
    int64_t offset = 0;
    for (int64_t start = 0; start < n; start += kSegThreads) {
      const int64_t i = start + threadIdx.x;
      bits_t v = 0;
      bool live = false;
      key_t key = 0;
      if (i < n) {
        v = mask[a.broadcast ? 0 : base + i];
        live = v == one;
        key = magnitude_key(scores[base + i], false);
      }
      bool cut = mode == 1 && live;
      if (mode == 2) {
        const int tie = live && key == thr;
        int before = 0, ties = 0;
        Scan(scan_storage).ExclusiveSum(tie, before, ties);
        __syncthreads();  // the scan storage is reused by the next chunk
        cut = live && (key < thr || (tie && offset + before < rank));
        offset += ties;
      }
      if (i < n) out[base + i] = keep_or_zero(v, !cut);
    }
    __syncthreads();  // hist and live_total are reset by the next segment
  }
}

at::Tensor segmented_mask_cuda(
    const at::Tensor& scores, const at::Tensor& mask, int64_t dim, int64_t group,
    int64_t count, double fraction, bool keep) {
  c10::cuda::CUDAGuard guard(scores.device());
  SegmentedOperand s = make_segmented_operand(scores, mask, dim, group, count, fraction, keep);
  if (s.segments == 0) return take_output(s);
  const bool broadcast = is_broadcast_scalar(s.op.mask);
  at::Tensor bad = at::full({1}, static_cast<int64_t>(kNoBad), scores.options().dtype(at::kLong));
  SegmentArgs args{
      s.op.scores.const_data_ptr(), s.op.mask.const_data_ptr(), s.op.dst.mutable_data_ptr(),
      s.length, s.segments, count, fraction, one_bits(mask.scalar_type()),
      reinterpret_cast<unsigned long long*>(bad.mutable_data_ptr<int64_t>()), keep, broadcast};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, scores.scalar_type(), "segmented_mask", [&] {
        dispatch_bits("segmented_mask", s.op.mask.element_size(), [&](auto bits) {
          using bits_t = decltype(bits);
          if (s.length <= kSmallSegment) {
            const int64_t blocks = std::min(kMaxBlocks, (s.segments + kSegThreads - 1) / kSegThreads);
            small_segments_kernel<scalar_t, bits_t>
                <<<static_cast<unsigned>(blocks), kSegThreads, 0, stream>>>(args);
          } else {
            const int64_t blocks = std::min(kMaxBlocks, s.segments);
            long_segments_kernel<scalar_t, bits_t>
                <<<static_cast<unsigned>(blocks), kSegThreads, 0, stream>>>(args);
          }
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  if (!keep && count >= 0) {  // only an exact count can exceed the live entries
    const int64_t first = bad.item<int64_t>();
    if (first != static_cast<int64_t>(kNoBad)) {
      const int64_t live = broadcast
          ? (s.op.mask.reshape(-1)[0].eq(1).item<bool>() ? s.length : 0)
          : s.op.mask.reshape(-1).narrow(0, first * s.length, s.length).eq(1).sum().item<int64_t>();
      fail_segment_count(first, live, segment_prune_count(live, count, fraction, keep));
    }
  }
  return take_output(s);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("segmented_mask", &segmented_mask_cuda);
}

}  // namespace fastprune
