// CPU kernels of the unstructured (magnitude / random-draw) select.
//
// Radix select on the keys of csrc/common/select.h, 16-bit digits, never a
// sort: a histogram pass per digit over the candidates, read in place (the
// restriction to mask == 1 is read inside the pass; nothing is gathered or
// scattered), then one pass that writes the new mask. For 32- and 64-bit keys
// the first histogram usually leaves a small bucket of candidates; then the
// write pass also collects that bucket and a small select over it finishes the
// job, so fp32 needs two passes over the data instead of three.
//
// Work is split into one fixed contiguous chunk per thread; per-chunk
// histograms give every chunk its exact share of the threshold ties, so the
// tie rule (lower flat index first) holds for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../common/operands.h"
#include "../common/select.h"

namespace fastprune {
namespace {

// Large fresh outputs are page-faulted in 4 KiB pages by default, which costs
// more than the select itself; asking for transparent huge pages before the
// first touch cuts that cost several fold. Advisory only.
void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.storage().data());
  const uintptr_t end = begin + t.storage().nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (hi > lo) {
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
}

// One tensor of a select over one or several tensors, flattened row-major;
// several tensors are ranked as if concatenated in their given order.
struct Segment {
  const void* scores;  // contiguous score_t
  const void* mask;    // contiguous, or a single value when `broadcast`
  bool broadcast;
  void* out;  // contiguous, the mask's dtype
  at::ScalarType mask_type;
  int64_t begin;  // position of its first element in the concatenation
  int64_t numel;
};

template <typename score_t>
class UnstructuredSelect {
  using key_t = typename KeyOf<score_t>::type;
  static constexpr int kDigits = num_digits<key_t>();
  static constexpr int kWays = 4;
  static constexpr int64_t kSmall = 4096;  // run_small up to this many entries
  static constexpr int64_t kBlock = int64_t{1} << 31;  // < 2^32 per way

  struct Candidate {
    key_t key;
    int64_t index;
    bool operator<(const Candidate& o) const {
      return key != o.key ? key < o.key : index < o.index;
    }
  };

 public:
  UnstructuredSelect(std::vector<Segment> segments, bool only_ones, bool largest)
      : segs_(std::move(segments)),
        numel_(segs_.empty() ? 0 : segs_.back().begin + segs_.back().numel),
        only_ones_(only_ones), largest_(largest),
        chunks_(numel_ < (int64_t{1} << 15) ? 1 : at::get_num_threads()),
        hist_(chunks_ * kBins), total_(kBins), candidates_(chunks_) {}

  // Prunes k = count (or round(fraction * candidates) when count < 0).
  void run(int64_t count, double fraction) {
    if (numel_ <= kSmall) {
      run_small(count, fraction);
      return;
    }
    histogram(0, 0);
    int64_t n = 0;
    for (int64_t c : candidates_) n += c;
    const int64_t k = prune_count(count, fraction, n);
    if (k == 0) {
      write(key_t{0}, 0, 0);  // nothing below key 0, no quota: a plain copy
      return;
    }
    int64_t rank = k;  // the k-th smallest key is the threshold
    key_t prefix = 0;
    for (int d = 0;; ++d) {
      if (d > 0) histogram(d, prefix);
      const Bucket b = find_bucket(total_.data(), rank);
      rank -= b.below;
      const int shift = static_cast<int>(sizeof(key_t) * 8) - kDigitBits * (d + 1);
      prefix |= static_cast<key_t>(static_cast<key_t>(b.bin) << shift);
      if (d + 1 == kDigits) {
        write(prefix, rank, b.bin);
        return;
      }
      if (d == 0 && total_[b.bin] <= std::max<int64_t>(numel_ / 32, kBins)) {
        write_and_collect(b.bin, rank);
        return;
      }
    }
  }

 private:
  static int64_t prune_count(int64_t count, double fraction, int64_t n) {
    const int64_t k = count >= 0 ? count : round_half_even(fraction, n);
    TORCH_CHECK_VALUE(
        k <= n, "fastprune: cannot prune ", k, " entries out of ", n,
        " candidates");
    return k;
  }

  // Small inputs: collect every candidate, select the k smallest (key,
  // position) directly. Avoids the histograms' fixed cost.
  void run_small(int64_t count, double fraction) {
    std::vector<Candidate> pool(numel_);
    Candidate* end = pool.data();
    write_with([&](int64_t) { return CollectAll{&end}; });
    pool.resize(end - pool.data());
    const int64_t k = prune_count(count, fraction, static_cast<int64_t>(pool.size()));
    if (k > 0) std::nth_element(pool.begin(), pool.begin() + (k - 1), pool.end());
    zero_at(pool, k);
  }

  // Sets the outputs of the first `count` candidates of `pool` to 0.
  void zero_at(const std::vector<Candidate>& pool, int64_t count) const {
    for (int64_t j = 0; j < count; ++j) {
      const Segment& seg = segment_of(pool[j].index);
      const size_t size = c10::elementSize(seg.mask_type);
      // An all-zero byte pattern is 0 (or false) in every mask dtype.
      std::memset(
          static_cast<char*>(seg.out) + (pool[j].index - seg.begin) * size, 0, size);
    }
  }

  int64_t lo(int64_t chunk) const { return numel_ * chunk / chunks_; }
  int64_t hi(int64_t chunk) const { return numel_ * (chunk + 1) / chunks_; }

  // The segment holding concatenation position i.
  const Segment& segment_of(int64_t i) const {
    auto it = std::upper_bound(
        segs_.begin(), segs_.end(), i,
        [](int64_t v, const Segment& s) { return v < s.begin; });
    return *(it - 1);
  }

  template <typename F>
  void for_each_chunk(const F& f) {
    at::parallel_for(0, chunks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) f(c);
    });
  }

  // Calls f(only_ones, broadcast, scores, mask, out, begin, end) for each
  // piece of a segment inside chunk c: [begin, end) are indices into that
  // segment, the two flags std::integral_constant<bool, ...> so that the
  // per-element loops test neither at run time, and mask/out typed pointers.
  template <typename F>
  void for_each_piece(int64_t c, const F& f) const {
    const int64_t clo = lo(c), chi = hi(c);
    if (clo >= chi) return;
    using T = std::true_type;
    using N = std::false_type;
    for (const Segment* seg = &segment_of(clo);
         seg != segs_.data() + segs_.size() && seg->begin < chi; ++seg) {
      const int64_t b = std::max(clo, seg->begin) - seg->begin;
      const int64_t e = std::min(chi, seg->begin + seg->numel) - seg->begin;
      if (b >= e) continue;
      const auto* s = static_cast<const score_t*>(seg->scores);
      AT_DISPATCH_ALL_TYPES_AND3(
          at::kHalf, at::kBFloat16, at::kBool, seg->mask_type, "fastprune_select", [&] {
            const auto* m = static_cast<const scalar_t*>(seg->mask);
            auto* o = static_cast<scalar_t*>(seg->out);
            if (only_ones_) {
              seg->broadcast ? f(T{}, T{}, s, m, o, b, e, seg->begin)
                             : f(T{}, N{}, s, m, o, b, e, seg->begin);
            } else {
              seg->broadcast ? f(N{}, T{}, s, m, o, b, e, seg->begin)
                             : f(N{}, N{}, s, m, o, b, e, seg->begin);
            }
          });
    }
  }

  // Histogram of digit d over the candidates whose higher digits equal
  // `prefix`; per chunk, then summed into total_. Candidates add 1 and other
  // entries 0 without a branch, so half-pruned masks cost no mispredictions.
  // Counting goes to
  // kWays interleaved 32-bit sub-counters per bin (element i to way i % kWays),
  // so runs of one bin do not serialize on a single counter; they are folded
  // into the chunk's 64-bit histogram before they could overflow.
  void histogram(int d, key_t prefix) {
    const key_t pmask = prefix_mask<key_t>(d);
    const int shift = static_cast<int>(sizeof(key_t) * 8) - kDigitBits * (d + 1);
    const bool largest = largest_;
    for_each_chunk([&](int64_t c) {
      int64_t* h = hist_.data() + c * kBins;
      std::fill(h, h + kBins, 0);
      std::vector<uint32_t> ways(kBins * kWays, 0);
      int64_t pending = 0;
      auto fold = [&] {
        for (int64_t b = 0; b < kBins; ++b) {
          for (int w = 0; w < kWays; ++w) h[b] += ways[b * kWays + w];
        }
        std::fill(ways.begin(), ways.end(), 0);
        pending = 0;
      };
      int64_t n = 0;
      for_each_piece(c, [&](auto only_ones, auto broadcast, const score_t* s,
                            const auto* m, auto*, int64_t b, int64_t e, int64_t) {
        using mask_t = std::remove_cv_t<std::remove_pointer_t<decltype(m)>>;
        // Locals, not captures: the counter stores could alias the captured
        // 32-bit values and force a reload every element.
        const key_t pm = pmask, pre = prefix;
        const int sh = shift;
        const bool first = d == 0;
        const bool lg = largest;
        uint32_t* w = ways.data();
        for (int64_t start = b; start < e; start += kBlock) {
          const int64_t stop = std::min(e, start + kBlock);
          if (pending + (stop - start) > kBlock) fold();
          pending += stop - start;
          for (int64_t i = start; i < stop; ++i) {
            uint32_t cand = 1;
            if constexpr (decltype(only_ones)::value) {
              cand = m[decltype(broadcast)::value ? 0 : i] == mask_t(1);
            }
            n += cand;
            const key_t key = magnitude_key(s[i], lg);
            const auto bin = static_cast<uint32_t>((key >> sh) & (kBins - 1));
            // The first digit counts every candidate; later digits only the
            // few that share the prefix, so a (predictable) branch there saves
            // read-modify-writes to random bins.
            if (first || C10_UNLIKELY((key & pm) == pre)) {
              w[bin * kWays + (i & (kWays - 1))] += cand;
            }
          }
        }
      });
      fold();
      candidates_[c] = n;
    });
    std::fill(total_.begin(), total_.end(), 0);
    for (int64_t c = 0; c < chunks_; ++c) {
      const int64_t* h = hist_.data() + c * kBins;
      for (int64_t b = 0; b < kBins; ++b) total_[b] += h[b];
    }
  }

  // Count of bin `bin` in chunk c's histogram from the last pass.
  int64_t chunk_count(int64_t c, uint32_t bin) const {
    return hist_[c * kBins + bin];
  }

  // The write pass: out = mask, except candidates for which the chunk's
  // decider (PruneBelow, PruneBelowBin) says prune, which get 0. It is called
  // with the key, the concatenation position and whether the entry is a
  // candidate, and answers without branching on the common path.
  template <typename MakeDecider>
  void write_with(const MakeDecider& make_decider) {
    const bool largest = largest_;
    for_each_chunk([&](int64_t c) {
      auto prune = make_decider(c);
      for_each_piece(c, [&](auto only_ones, auto broadcast, const score_t* s,
                            const auto* m, auto* out, int64_t b, int64_t e,
                            int64_t begin) {
        using mask_t = std::remove_cv_t<std::remove_pointer_t<decltype(m)>>;
        auto decide = prune;  // a local copy: its state then stays in registers
        const bool lg = largest;
        for (int64_t i = b; i < e; ++i) {
          const mask_t v = m[decltype(broadcast)::value ? 0 : i];
          bool cand = true;
          if constexpr (decltype(only_ones)::value) cand = v == mask_t(1);
          const bool cut = decide(magnitude_key(s[i], lg), begin + i, cand);
          out[i] = keep_or_zero(v, !cut);
        }
        prune = decide;
      });
    });
  }

  // Prunes candidates with key < thr, and the first `quota` with key == thr.
  struct PruneBelow {
    key_t thr;
    int64_t quota;
    bool operator()(key_t key, int64_t, bool cand) {
      if (C10_UNLIKELY(cand & (key == thr))) {
        if (quota == 0) return false;
        --quota;
        return true;
      }
      return cand & (key < thr);
    }
  };

  // Prunes candidates whose first digit is below `bin` and collects those in
  // `bin` (key, position) at `next`.
  struct PruneBelowBin {
    uint32_t bin;
    Candidate* next;
    bool operator()(key_t key, int64_t i, bool cand) {
      const uint32_t digit = key_digit(key, 0);
      if (C10_UNLIKELY(cand & (digit == bin))) *next++ = Candidate{key, i};
      return cand & (digit < bin);
    }
  };

  // Prunes nothing; collects every candidate (key, position) at `*next`.
  struct CollectAll {
    Candidate** next;
    bool operator()(key_t key, int64_t i, bool cand) {
      if (cand) *(*next)++ = Candidate{key, i};
      return false;
    }
  };

  // Candidates with key < thr are pruned, and of those with key == thr the
  // first `need` in flat order (chunk shares from the last histogram's `bin`).
  void write(key_t thr, int64_t need, uint32_t bin) {
    write_with([&](int64_t c) {
      int64_t before = 0;
      for (int64_t p = 0; p < c; ++p) before += chunk_count(p, bin);
      return PruneBelow{thr, tie_quota(need, before, chunk_count(c, bin))};
    });
  }

  // Writes the mask from the first digit alone, collecting the candidates of
  // the threshold bin; then prunes the `need` smallest (key, position) of those.
  void write_and_collect(uint32_t bin, int64_t need) {
    std::vector<int64_t> offset(chunks_ + 1, 0);
    for (int64_t c = 0; c < chunks_; ++c) {
      offset[c + 1] = offset[c] + chunk_count(c, bin);
    }
    std::vector<Candidate> pool(offset[chunks_]);
    write_with([&](int64_t c) { return PruneBelowBin{bin, pool.data() + offset[c]}; });
    std::nth_element(pool.begin(), pool.begin() + (need - 1), pool.end());
    zero_at(pool, need);
  }

  std::vector<Segment> segs_;
  int64_t numel_;
  bool only_ones_;
  bool largest_;
  int64_t chunks_;
  std::vector<int64_t> hist_;
  std::vector<int64_t> total_;
  std::vector<int64_t> candidates_;
};

std::vector<at::Tensor> select_masks(
    std::vector<Operand> ops, int64_t count, double fraction, bool only_ones,
    bool largest) {
  check_operands(ops, fraction);
  std::vector<Segment> segs;
  int64_t begin = 0;
  for (const Operand& op : ops) {
    if (op.scores.numel() == 0) continue;
    advise_huge_pages(op.dst);
    segs.push_back(Segment{
        op.scores.const_data_ptr(), op.mask.const_data_ptr(),
        is_broadcast_scalar(op.mask), op.dst.mutable_data_ptr(),
        op.mask.scalar_type(), begin, op.scores.numel()});
    begin += op.scores.numel();
  }
  if (!ops.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, ops[0].scores.scalar_type(), "fastprune_select", [&] {
          UnstructuredSelect<scalar_t>(std::move(segs), only_ones, largest)
              .run(count, fraction);
        });
  }
  return take_outputs(ops);
}

at::Tensor unstructured_mask_cpu(
    const at::Tensor& scores, const at::Tensor& mask, int64_t count,
    double fraction, bool only_ones, bool largest) {
  return select_masks({make_operand(scores, mask)}, count, fraction, only_ones, largest)[0];
}

std::vector<at::Tensor> global_unstructured_masks_cpu(
    at::TensorList scores, at::TensorList masks, int64_t count,
    double fraction, bool only_ones, bool largest) {
  return select_masks(make_operands(scores, masks), count, fraction, only_ones, largest);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("unstructured_mask", &unstructured_mask_cpu);
  m.impl("global_unstructured_masks", &global_unstructured_masks_cpu);
  m.impl("advise_huge_pages", &advise_huge_pages);
}

}  // namespace fastprune
