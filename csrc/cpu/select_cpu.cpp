// CPU kernels of the unstructured (magnitude / random-draw) select.
//
// On the keys of csrc/common/select.h, never a sort, reading scores and masks
// in place (the restriction to mask == 1 is read inside the passes; nothing is
// gathered or scattered). First try, one pass: a strided sample of the keys
// brackets the threshold, the pass writes the mask for everything outside the
// bracket and collects the few entries inside it, and a select over those
// finishes the job. When the sample misleads (a miss, or heavy ties), the
// exact radix select runs: a histogram pass per 16-bit digit, then one pass
// that writes the mask; for 32- and 64-bit keys that pass usually also
// collects the first digit's threshold bucket, so fp32 needs two passes.
//
// Work is split into one fixed contiguous chunk per thread; per-chunk counts
// give every chunk its exact share of the threshold ties, and the collected
// entries are ranked by (key, position), so the tie rule (lower flat index
// first) holds for any thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../common/operand.h"
#include "../common/select.h"
#include "../common/select_operands.h"
#include "bracket_cpu.h"
#include "cache_cpu.h"

namespace fastprune {
namespace {

// One tensor of a select over one or several tensors (a piece, as in
// python/fastprune/_crossrank.py; not a segment, which is an N:M group or row
// of segmented_mask), flattened row-major; several tensors are ranked as if
// concatenated in their given order.
struct Piece {
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
  using Digits = Radix<key_t, 16>;
  static constexpr int64_t kBins = Digits::kBins;
  static constexpr int kWays = 4;
  static constexpr int64_t kSmall = 4096;  // run_small up to this many entries
  static constexpr int64_t kBlock = int64_t{1} << 31;  // < 2^32 per way
  static constexpr int64_t kMaxSample = int64_t{1} << 19;
  static constexpr int64_t kLane = 16;

  struct Candidate {
    key_t key;
    int64_t index;
    bool operator<(const Candidate& o) const {
      return key != o.key ? key < o.key : index < o.index;
    }
  };

 public:
  UnstructuredSelect(std::vector<Piece> pieces, bool only_ones, bool largest)
      : pieces_(std::move(pieces)),
        numel_(pieces_.empty() ? 0 : pieces_.back().begin + pieces_.back().numel),
        only_ones_(only_ones), largest_(largest),
        chunks_(numel_ < (int64_t{1} << 15) ? 1 : at::get_num_threads()),
        hist_(chunks_ * kBins), total_(kBins), candidates_(chunks_) {}

  // Prunes k = count (or round(fraction * candidates) when count < 0), by
  // the first of three strategies that applies: a direct select on small
  // inputs; one pass bracketed by a sample; the exact radix passes.
  void run(int64_t count, double fraction) {
    if (numel_ <= kSmall) {
      run_small(count, fraction);
    } else if (!run_sampled(count, fraction)) {
      run_exact(count, fraction);
    }
  }

 private:
  // One pass instead of two or more, exact but for speed a bet on a sample:
  // a strided sample of the candidates' keys brackets the threshold key in
  // [lo, hi) with a wide margin (sampled_bracket, bracket_cpu.h);
  // one pass then prunes every candidate below lo, keeps the others and
  // collects those inside the bracket, and the k - below smallest of these
  // (key, position) are pruned after. Returns false, having written outputs
  // the exact passes will overwrite, when the bracket misses the threshold or
  // holds too many entries (heavy ties).
  bool run_sampled(int64_t count, double fraction) {
    const int64_t s = std::min(kMaxSample, std::max(numel_ / 128, kSmall));
    std::vector<key_t> sample = sample_keys(s);
    if (sample.empty()) return false;
    const KeyBracket<key_t> bracket = sampled_bracket(sample, s, numel_, count, fraction);
    const key_t lo = bracket.lo, width = bracket.hi - bracket.lo;
    // Room for four times the entries the margin should bring in; more means
    // heavy ties at the bracket, left to the exact passes.
    const int64_t cap = 4 * bracket.ranks * (numel_ / s + 1) + kBins;

    std::vector<std::vector<Candidate>> pools(chunks_);
    std::vector<int64_t> below(chunks_), cands(chunks_);
    std::vector<char> overflow(chunks_, 0);
    const bool largest = largest_;
    for_each_chunk([&](int64_t c) {
      std::vector<Candidate>& pool = pools[c];
      int64_t used = 0, nb = 0, nc = 0;
      for_each_part(c, [&](auto only_ones, auto broadcast, const score_t* sc,
                            const auto* mk, auto* out, int64_t b, int64_t e,
                            int64_t begin) {
        using mask_t = std::remove_cv_t<std::remove_pointer_t<decltype(mk)>>;
        const key_t l = lo, w = width;
        const bool lg = largest;
        // One block of kLane entries from i0 (fewer at the end when `tail`):
        // a branch-free loop the compiler vectorizes, then a second, branch-free
        // look only at blocks with entries in the bracket.
        auto block = [&](int64_t i0, auto tail) {
          const int64_t len = decltype(tail)::value ? e - i0 : kLane;
          uint32_t hits = 0, cuts = 0, live = 0;
          for (int64_t j = 0; j < len; ++j) {
            const mask_t v = mk[decltype(broadcast)::value ? 0 : i0 + j];
            uint32_t cand = 1;
            if constexpr (decltype(only_ones)::value) cand = v == mask_t(1);
            const key_t key = magnitude_key(sc[i0 + j], lg);
            const uint32_t cut = cand & (key < l);
            hits += cand & (static_cast<key_t>(key - l) < w);
            cuts += cut;
            live += cand;
            out[i0 + j] = keep_or_zero(v, !cut);
          }
          nb += cuts;
          nc += live;
          if (C10_LIKELY(hits == 0)) return;
          if (used + hits > cap) {
            overflow[c] = 1;
            return;
          }
          if (used + kLane > static_cast<int64_t>(pool.size())) {
            pool.resize(std::max<int64_t>(2 * pool.size(), used + kLane));
          }
          for (int64_t j = 0; j < len; ++j) {
            uint32_t cand = 1;
            if constexpr (decltype(only_ones)::value) {
              cand = mk[decltype(broadcast)::value ? 0 : i0 + j] == mask_t(1);
            }
            const key_t key = magnitude_key(sc[i0 + j], lg);
            pool[used] = Candidate{key, begin + i0 + j};
            used += cand & (static_cast<key_t>(key - l) < w);
          }
        };
        int64_t i0 = b;
        for (; i0 + kLane <= e && !overflow[c]; i0 += kLane) block(i0, std::false_type{});
        if (i0 < e && !overflow[c]) block(i0, std::true_type{});
      });
      pool.resize(used);
      below[c] = nb;
      cands[c] = nc;
    });
    if (std::find(overflow.begin(), overflow.end(), 1) != overflow.end()) return false;
    int64_t n = 0, nbelow = 0;
    for (int64_t c = 0; c < chunks_; ++c) {
      n += cands[c];
      nbelow += below[c];
    }
    const int64_t k = prune_count(count, fraction, n);
    std::vector<Candidate> pool;
    size_t total = 0;
    for (const auto& part : pools) total += part.size();
    pool.reserve(total);
    for (auto& part : pools) {
      pool.insert(pool.end(), part.begin(), part.end());
      std::vector<Candidate>().swap(part);
    }
    const int64_t need = k - nbelow;
    if (need < 0 || need > static_cast<int64_t>(pool.size())) return false;
    prune_smallest(pool, need);
    return true;
  }

  // Exact by construction: a histogram pass per 16-bit digit narrows the
  // threshold key down, then one pass writes the mask (for 32- and 64-bit
  // keys usually right after the first digit, collecting that digit's
  // threshold bucket, whose k - below smallest are pruned after).
  void run_exact(int64_t count, double fraction) {
    histogram(0, 0);
    int64_t n = 0;
    for (int64_t c : candidates_) n += c;
    const int64_t k = prune_count(count, fraction, n);
    if (k == 0) {
      write(key_t{0}, 0, 0);  // nothing below key 0, no quota: a plain copy
      return;
    }
    // The k-th smallest key is the threshold; the descent stops after the
    // first digit when that digit's threshold bin is small enough to collect.
    const RadixStep<key_t> step = radix_descent<Digits>(
        total_.data(), k,
        [&](int d, key_t prefix) {
          histogram(d, prefix);
          return total_.data();
        },
        [&](int d, const RadixStep<key_t>& s) {
          return d == 0 && s.count <= std::max<int64_t>(numel_ / 32, kBins);
        });
    if (step.last) {
      write(step.prefix, step.rank, step.bin);
    } else {
      write_and_collect(step.bin, step.rank);
    }
  }

  // Keys of the candidates among s entries evenly spaced over the concatenation.
  std::vector<key_t> sample_keys(int64_t s) const {
    std::vector<key_t> keys;
    keys.reserve(s);
    const int64_t step = numel_ / s;  // >= 1: s <= numel_
    int64_t j = 0;
    for (const Piece& piece : pieces_) {
      const auto* sc = static_cast<const score_t*>(piece.scores);
      AT_DISPATCH_ALL_TYPES_AND3(
          at::kHalf, at::kBFloat16, at::kBool, piece.mask_type, "fastprune_sample", [&] {
            const auto* mk = static_cast<const scalar_t*>(piece.mask);
            for (; j < s; ++j) {
              const int64_t i = j * step + step / 2 - piece.begin;
              if (i >= piece.numel) break;
              if (only_ones_ && !(mk[piece.broadcast ? 0 : i] == scalar_t(1))) continue;
              keys.push_back(magnitude_key(sc[i], largest_));
            }
          });
    }
    return keys;
  }

  // Small inputs: collect every candidate, select the k smallest (key,
  // position) directly. Avoids the histograms' fixed cost.
  void run_small(int64_t count, double fraction) {
    std::vector<Candidate> pool(numel_);
    Candidate* end = pool.data();
    write_with([&](int64_t) { return CollectAll{&end}; });
    pool.resize(end - pool.data());
    prune_smallest(pool, prune_count(count, fraction, static_cast<int64_t>(pool.size())));
  }

  // Sets the outputs of the `count` smallest (key, position) of `pool` to 0.
  // A large pool is first narrowed by a histogram of its keys' spread, so
  // that the element-wise select runs on one bin.
  void prune_smallest(std::vector<Candidate>& pool, int64_t count) const {
    if (count <= 0) return;
    auto first = pool.begin(), last = pool.end();
    int64_t rank = count;
    if (static_cast<int64_t>(pool.size()) > kBins) {
      key_t lo = first->key, hi = first->key;
      for (const Candidate& c : pool) {
        lo = std::min(lo, c.key);
        hi = std::max(hi, c.key);
      }
      int shift = 0;
      while ((static_cast<key_t>(hi - lo) >> shift) >= kBins) ++shift;
      auto bin_of = [&](const Candidate& c) {
        return static_cast<uint32_t>(static_cast<key_t>(c.key - lo) >> shift);
      };
      std::vector<int64_t> hist(kBins, 0);
      for (const Candidate& c : pool) ++hist[bin_of(c)];
      const Bucket b = find_bucket(hist.data(), count);
      first = std::partition(pool.begin(), pool.end(),
                             [&](const Candidate& c) { return bin_of(c) < b.bin; });
      last = std::partition(first, last, [&](const Candidate& c) { return bin_of(c) == b.bin; });
      rank -= b.below;
    }
    std::nth_element(first, first + (rank - 1), last);
    at::parallel_for(0, count, int64_t{1} << 14, [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j) {
        const Piece& piece = piece_of(pool[j].index);
        const size_t size = c10::elementSize(piece.mask_type);
        // An all-zero byte pattern is 0 (or false) in every mask dtype.
        std::memset(
            static_cast<char*>(piece.out) + (pool[j].index - piece.begin) * size, 0, size);
      }
    });
  }

  int64_t lo(int64_t chunk) const { return numel_ * chunk / chunks_; }
  int64_t hi(int64_t chunk) const { return numel_ * (chunk + 1) / chunks_; }

  // The piece holding concatenation position i.
  const Piece& piece_of(int64_t i) const {
    auto it = std::upper_bound(
        pieces_.begin(), pieces_.end(), i,
        [](int64_t v, const Piece& s) { return v < s.begin; });
    return *(it - 1);
  }

  template <typename F>
  void for_each_chunk(const F& f) {
    at::parallel_for(0, chunks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) f(c);
    });
  }

  // Calls f(only_ones, broadcast, scores, mask, out, begin, end) for each
  // part of a piece inside chunk c: [begin, end) are indices into that
  // piece, the two flags std::integral_constant<bool, ...> so that the
  // per-element loops test neither at run time, and mask/out typed pointers.
  template <typename F>
  void for_each_part(int64_t c, const F& f) const {
    const int64_t clo = lo(c), chi = hi(c);
    if (clo >= chi) return;
    using T = std::true_type;
    using N = std::false_type;
    for (const Piece* piece = &piece_of(clo);
         piece != pieces_.data() + pieces_.size() && piece->begin < chi; ++piece) {
      const int64_t b = std::max(clo, piece->begin) - piece->begin;
      const int64_t e = std::min(chi, piece->begin + piece->numel) - piece->begin;
      if (b >= e) continue;
      const auto* s = static_cast<const score_t*>(piece->scores);
      AT_DISPATCH_ALL_TYPES_AND3(
          at::kHalf, at::kBFloat16, at::kBool, piece->mask_type, "fastprune_select", [&] {
            const auto* m = static_cast<const scalar_t*>(piece->mask);
            auto* o = static_cast<scalar_t*>(piece->out);
            if (only_ones_) {
              piece->broadcast ? f(T{}, T{}, s, m, o, b, e, piece->begin)
                               : f(T{}, N{}, s, m, o, b, e, piece->begin);
            } else {
              piece->broadcast ? f(N{}, T{}, s, m, o, b, e, piece->begin)
                               : f(N{}, N{}, s, m, o, b, e, piece->begin);
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
    const key_t pmask = Digits::prefix_mask(d);
    const int shift = Digits::shift(d);
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
      for_each_part(c, [&](auto only_ones, auto broadcast, const score_t* s,
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
      for_each_part(c, [&](auto only_ones, auto broadcast, const score_t* s,
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
      const uint32_t digit = Digits::digit(key, 0);
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
    prune_smallest(pool, need);
  }

  std::vector<Piece> pieces_;
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
  std::vector<Piece> pieces;
  int64_t begin = 0;
  for (const Operand& op : ops) {
    if (op.scores.numel() == 0) continue;
    pieces.push_back(Piece{
        op.scores.const_data_ptr(), op.mask.const_data_ptr(),
        is_broadcast_scalar(op.mask), op.dst.mutable_data_ptr(),
        op.mask.scalar_type(), begin, op.scores.numel()});
    begin += op.scores.numel();
  }
  if (!ops.empty()) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, ops[0].scores.scalar_type(), "fastprune_select", [&] {
          UnstructuredSelect<scalar_t>(std::move(pieces), only_ones, largest)
              .run(count, fraction);
        });
  }
  return take_outputs(ops);
}

at::Tensor unstructured_mask_cpu(
    const at::Tensor& scores, const at::Tensor& mask, int64_t count,
    double fraction, bool only_ones, bool largest) {
  return select_masks({make_operand(scores, mask, cached_empty_like)}, count, fraction, only_ones, largest)[0];
}

std::vector<at::Tensor> global_unstructured_masks_cpu(
    at::TensorList scores, at::TensorList masks, int64_t count,
    double fraction, bool only_ones, bool largest) {
  return select_masks(make_operands(scores, masks, cached_empty_like), count, fraction, only_ones, largest);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("unstructured_mask", &unstructured_mask_cpu);
  m.impl("global_unstructured_masks", &global_unstructured_masks_cpu);
}

}  // namespace fastprune
