// Device-agnostic core of the segmented select (N:M groups, per-channel
// exact k), shared by csrc/cpu/segmented_cpu.cpp and
// csrc/cuda/segmented_cuda.cu so that the two cannot drift. The key transform
// (magnitude_key), rounding (round_half_even) and keep_or_zero come from
// select.h, the same as the unstructured select's.
//
// A segment is a run of `length` consecutive entries of a contiguous buffer
// (the host puts them in that order, see make_segmented_operand). Its live
// entries are those whose mask is 1; the select prunes the k live entries of
// smallest (key, position): the smallest |score| (NaN above +inf), and of
// equal keys the lower position in the segment first.
#pragma once

#include <c10/macros/Macros.h>

#include <cstdint>

#include "select.h"

namespace fastprune {

// Segments up to this length are decided by rank counting (no histogram).
constexpr int kSmallSegment = 32;

// How many of a segment's `live` entries to prune: at most `count` stay when
// `keep` (N:M: max(live - count, 0)); else exactly `count` when count >= 0,
// or round-half-even(fraction * live). A result above `live` is an error the
// caller reports.
C10_HOST_DEVICE inline int64_t segment_prune_count(
    int64_t live, int64_t count, double fraction, bool keep) {
  if (keep) return live > count ? live - count : 0;
  return count >= 0 ? count : round_half_even(fraction, live);
}

// The tie rule inside a segment: (key a at position i) ranks before (key b at
// position j).
template <typename key_t>
C10_HOST_DEVICE inline bool ranks_before(key_t a, int64_t i, key_t b, int64_t j) {
  return (a < b) | ((a == b) & (i < j));  // no branches: called in tight loops
}

// Small segments: whether the entry at position j of an n-entry segment
// (keys and 0/1 live flags given) is among its k smallest live (key,
// position), counting the live entries that rank before it. k is an int (a
// 64-bit compare keeps the CPU loop from vectorizing); callers cap it at n.
template <typename key_t>
C10_HOST_DEVICE inline bool pruned_by_rank(
    const key_t* keys, const uint32_t* live, int n, int j, int k) {
  // ranks_before(keys[l], l, keys[j], j) written so that, once the loops over
  // a fixed n unroll, each term is a single compare (about 3x faster on x86-64)
  int rank = 0;
  for (int l = 0; l < n; ++l) {
    rank += static_cast<int>(live[l] & (l < j ? keys[l] <= keys[j] : keys[l] < keys[j]));
  }
  return live[j] & (rank < k);
}

}  // namespace fastprune
