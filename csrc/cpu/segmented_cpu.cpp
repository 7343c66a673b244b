// CPU kernel of segmented_mask: an exact-k select inside every segment (an
// N:M group, or a whole slice for per-channel pruning), all segments in one
// call, with the key transform and tie rule of csrc/common/segments.h.
//
// Segments are consecutive runs of the buffers make_segmented_operand lays
// out; threads take contiguous ranges of segments (at::parallel_for), and
// nothing is sorted:
// - short segments (N:M groups, up to kSmallSegment entries) are decided in
//   registers by rank counting on (key, position), without branches; 2, 4,
//   8 and 16 entries are unrolled at compile time (and vectorize);
// - long segments (rows) take two passes over the row, which stays in cache:
//   a histogram of the keys' top 12 bits (the leading one is always 0) over
//   the live entries finds the threshold's bin, the few live entries in that
//   bin are collected as (key, position) into a per-thread buffer and
//   std::nth_element picks the threshold pair among them, and one pass writes
//   the row: a live entry is pruned when its (key, position) is at or below
//   the threshold pair.
// The mask is read as raw bits of its element size (an entry is live when its
// bits are those of 1, as mask == 1 in every dtype) and written with
// keep_or_zero, so the kernel is instantiated per mask size, not per dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

#include "../common/operand.h"
#include "../common/segmented_operands.h"
#include "../common/segments.h"
#include "cache_cpu.h"

namespace fastprune {
namespace {

constexpr int kHistBits = 11;  // the key bits below the always-zero top bit
constexpr int64_t kHistBins = int64_t{1} << kHistBits;

template <typename score_t, typename bits_t, bool kBroadcast>
class SegmentedSelect {
  using key_t = typename KeyOf<score_t>::type;
  static constexpr int kShift = static_cast<int>(sizeof(key_t) * 8) - kHistBits - 1;

  struct Candidate {
    key_t key;
    int64_t pos;
    bool operator<(const Candidate& o) const { return ranks_before(key, pos, o.key, o.pos); }
  };

 public:
  SegmentedSelect(const SegmentedOperand& s, uint64_t one, int64_t count, double fraction, bool keep)
      : scores_(s.op.scores.const_data_ptr<score_t>()),
        mask_(static_cast<const bits_t*>(s.op.mask.const_data_ptr())),
        out_(static_cast<bits_t*>(s.op.dst.mutable_data_ptr())),
        one_(static_cast<bits_t>(one)), length_(s.length), segments_(s.segments),
        count_(count), fraction_(fraction), keep_(keep) {}

  // Writes every segment; returns the first segment asked to prune more
  // entries than it has live ones, or -1.
  int64_t run() {
    std::atomic<int64_t> first_bad{std::numeric_limits<int64_t>::max()};
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(length_, 1));
    // Short segments: the prune count for every possible live count, as int
    // (what keeps their loops vectorized), capped where it is an error anyway.
    int counts[kSmallSegment + 1];
    for (int64_t live = 0; live <= std::min<int64_t>(length_, kSmallSegment); ++live) {
      counts[live] = static_cast<int>(std::min<int64_t>(
          segment_prune_count(live, count_, fraction_, keep_), kSmallSegment + 1));
    }
    at::parallel_for(0, segments_, grain, [&](int64_t begin, int64_t end) {
      int64_t bad = -1;
      if (length_ == 2) {
        bad = small<2>(begin, end, counts);
      } else if (length_ == 4) {
        bad = small<4>(begin, end, counts);
      } else if (length_ == 8) {
        bad = small<8>(begin, end, counts);
      } else if (length_ == 16) {
        bad = small<16>(begin, end, counts);
      } else if (length_ <= kSmallSegment) {
        bad = small<kSmallSegment>(begin, end, counts);
      } else {
        std::vector<int64_t> hist(kHistBins);
        std::vector<Candidate> pool;
        for (int64_t s = begin; s < end && bad < 0; ++s) bad = large(s, hist, pool) ? -1 : s;
      }
      int64_t seen = first_bad.load();
      while (bad >= 0 && bad < seen && !first_bad.compare_exchange_weak(seen, bad)) {
      }
    });
    const int64_t bad = first_bad.load();
    return bad == std::numeric_limits<int64_t>::max() ? -1 : bad;
  }

  // The live entries of segment s.
  int64_t live_count(int64_t s) const {
    int64_t live = 0;
    for (int64_t i = 0; i < length_; ++i) live += is_live(mask_at(s * length_ + i));
    return live;
  }

 private:
  bits_t mask_at(int64_t i) const { return mask_[kBroadcast ? 0 : i]; }
  uint32_t is_live(bits_t v) const { return v == one_; }
  key_t key_at(int64_t i) const { return magnitude_key(scores_[i], false); }

  // Segments [begin, end) of length_ <= N entries: keys and live flags in
  // registers, each entry ranked against the others of its segment, the
  // prune count looked up by live count. Straight-line code without
  // branches on the data (N = 2, 4, 8, 16 unroll fully). Returns the first
  // segment with more to prune than live entries, or -1.
  template <int N>
  C10_NOINLINE int64_t small(int64_t begin, int64_t end, const int* counts) {  // (inlined, GCC leaves it scalar)
    const int n = N == kSmallSegment ? static_cast<int>(length_) : N;
    const score_t* sc = scores_;
    const bits_t* mk = mask_;
    const bits_t first = mk[0];  // the broadcast value, read once
    int ktab[kSmallSegment + 1];  // a local copy: `out` (maybe int-typed) cannot alias it
    std::copy(counts, counts + n + 1, ktab);
    bits_t* out = out_;
    const bits_t one = one_;
    int64_t bad = -1;
    for (int64_t s = begin; s < end; ++s) {
      const int64_t base = s * n;
      key_t keys[N];
      uint32_t live[N];
      bits_t v[N];
      int nlive = 0;
      for (int j = 0; j < n; ++j) {
        v[j] = kBroadcast ? first : mk[base + j];
        live[j] = v[j] == one;
        keys[j] = magnitude_key(sc[base + j], false);
        nlive += live[j];
      }
      const int k = ktab[nlive];
      bad = (k > nlive) & (bad < 0) ? s : bad;
      for (int j = 0; j < n; ++j) {
        out[base + j] = keep_or_zero(v[j], !pruned_by_rank(keys, live, n, j, k));
      }
    }
    return bad;
  }

  // A long segment: histogram pass, candidates of the threshold bin, write
  // pass. Returns false when k > live.
  bool large(int64_t s, std::vector<int64_t>& hist, std::vector<Candidate>& pool) {
    const int64_t base = s * length_, n = length_;
    const score_t* sc = scores_ + base;
    bits_t* out = out_ + base;
    std::fill(hist.begin(), hist.end(), 0);
    int64_t nlive = 0;
    for (int64_t i = 0; i < n; ++i) {
      const uint32_t live = is_live(mask_at(base + i));
      hist[magnitude_key(sc[i], false) >> kShift] += live;
      nlive += live;
    }
    const int64_t k = segment_prune_count(nlive, count_, fraction_, keep_);
    if (k > nlive) return false;
    if (k == 0 || k == nlive) {  // nothing, or every live entry
      const bool all = k != 0;
      for (int64_t i = 0; i < n; ++i) {
        const bits_t v = mask_at(base + i);
        out[i] = keep_or_zero(v, !(all && is_live(v)));
      }
      return true;
    }
    const Bucket b = find_bucket(hist.data(), k);
    pool.clear();
    for (int64_t i = 0; i < n; ++i) {
      const key_t key = magnitude_key(sc[i], false);
      if ((key >> kShift) == b.bin && is_live(mask_at(base + i))) pool.push_back(Candidate{key, i});
    }
    const int64_t rank = k - b.below;  // 1-based, inside the bin
    std::nth_element(pool.begin(), pool.begin() + (rank - 1), pool.end());
    const Candidate thr = pool[rank - 1];
    // A live entry goes when (key, position) ranks at or below the threshold
    // pair: up to its position when key <= the threshold's, after it when
    // key < it. Two loops with no position compare, which vectorize.
    auto write = [&](int64_t from, int64_t to, key_t below) {
      for (int64_t i = from; i < to; ++i) {
        const bits_t v = mask_at(base + i);
        out[i] = keep_or_zero(v, !(is_live(v) & (magnitude_key(sc[i], false) < below)));
      }
    };
    write(0, thr.pos + 1, thr.key + 1);  // (the key of a live entry is below ~0)
    write(thr.pos + 1, n, thr.key);
    return true;
  }

  const score_t* scores_;
  const bits_t* mask_;
  bits_t* out_;
  bits_t one_;
  int64_t length_;
  int64_t segments_;
  int64_t count_;
  double fraction_;
  bool keep_;
};

at::Tensor segmented_mask_cpu(
    const at::Tensor& scores, const at::Tensor& mask, int64_t dim, int64_t group,
    int64_t count, double fraction, bool keep) {
  SegmentedOperand s = make_segmented_operand(
      scores, mask, dim, group, count, fraction, keep, cached_empty_like);
  if (s.segments == 0) return take_output(s);
  const bool broadcast = is_broadcast_scalar(s.op.mask);
  const uint64_t one = one_bits(mask.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, scores.scalar_type(), "segmented_mask", [&] {
        dispatch_bits("segmented_mask", s.op.mask.element_size(), [&](auto bits) {
          using bits_t = decltype(bits);
          auto check = [&](auto& select) {
            const int64_t bad = select.run();
            if (bad >= 0) {
              const int64_t live = select.live_count(bad);
              fail_segment_count(bad, live, segment_prune_count(live, count, fraction, keep));
            }
          };
          if (broadcast) {
            SegmentedSelect<scalar_t, bits_t, true> select(s, one, count, fraction, keep);
            check(select);
          } else {
            SegmentedSelect<scalar_t, bits_t, false> select(s, one, count, fraction, keep);
            check(select);
          }
        });
      });
  return take_output(s);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("segmented_mask", &segmented_mask_cpu);
}

}  // namespace fastprune
