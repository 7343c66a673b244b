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
#include <type_traits>
#include <vector>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include "../common/select.h"

namespace fastprune {
namespace {

// Large fresh outputs are page-faulted in 4 KiB pages by default, which costs
// more than the select itself; asking for transparent huge pages before the
// first touch cuts that cost several fold. Advisory only.
void advise_huge_pages(const at::Tensor& t) {
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t hi = end & ~(kHuge - 1);
  if (hi > lo) {
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
  }
#endif
}

template <typename score_t, typename mask_t>
class UnstructuredSelect {
  using key_t = typename KeyOf<score_t>::type;
  static constexpr int kDigits = num_digits<key_t>();
  static constexpr int kWays = 4;

  struct Candidate {
    key_t key;
    int64_t index;
    bool operator<(const Candidate& o) const {
      return key != o.key ? key < o.key : index < o.index;
    }
  };

 public:
  UnstructuredSelect(
      const score_t* scores, const mask_t* mask, bool mask_broadcast,
      mask_t* out, int64_t numel, bool only_ones, bool largest)
      : scores_(scores), mask_(mask), mask_broadcast_(mask_broadcast),
        out_(out), numel_(numel), only_ones_(only_ones), largest_(largest),
        chunks_(numel < (int64_t{1} << 15) ? 1 : at::get_num_threads()),
        hist_(chunks_ * kWays * kBins), total_(kBins), candidates_(chunks_) {}

  // Prunes k = count (or round(fraction * candidates) when count < 0).
  void run(int64_t count, double fraction) {
    histogram(0, 0);
    int64_t n = 0;
    for (int64_t c : candidates_) n += c;
    const int64_t k = count >= 0 ? count : round_half_even(fraction, n);
    TORCH_CHECK_VALUE(
        k <= n, "unstructured_mask: cannot prune ", k, " entries out of ", n,
        " candidates");
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
  int64_t lo(int64_t chunk) const { return numel_ * chunk / chunks_; }
  int64_t hi(int64_t chunk) const { return numel_ * (chunk + 1) / chunks_; }

  template <typename F>
  void for_each_chunk(const F& f) {
    at::parallel_for(0, chunks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) f(c);
    });
  }

  // Runs f(std::integral_constant<bool, only_ones>, ..<bool, broadcast>) so
  // that the per-element loops test neither flag at run time.
  template <typename F>
  void with_flags(const F& f) const {
    using T = std::true_type;
    using N = std::false_type;
    if (only_ones_) {
      mask_broadcast_ ? f(T{}, T{}) : f(T{}, N{});
    } else {
      mask_broadcast_ ? f(N{}, T{}) : f(N{}, N{});
    }
  }

  // Histogram of digit d over the candidates whose higher digits equal
  // `prefix`; per chunk, then summed into total_. Branch-free: every element
  // adds 0 or 1, so half-pruned masks cost no mispredictions; kWays
  // interleaved sub-histograms keep repeated bins from serializing.
  void histogram(int d, key_t prefix) {
    const key_t pmask = prefix_mask<key_t>(d);
    const int shift = static_cast<int>(sizeof(key_t) * 8) - kDigitBits * (d + 1);
    with_flags([&](auto only_ones, auto broadcast) {
      for_each_chunk([&](int64_t c) {
        int64_t* h = hist_.data() + c * kWays * kBins;
        std::fill(h, h + kWays * kBins, 0);
        const score_t* s = scores_;
        const mask_t* m = mask_;
        const bool largest = largest_;
        int64_t n = 0;
        for (int64_t i = lo(c), e = hi(c); i < e; ++i) {
          int64_t cand = 1;
          if constexpr (decltype(only_ones)::value) {
            cand = m[decltype(broadcast)::value ? 0 : i] == mask_t(1);
          }
          n += cand;
          const key_t key = magnitude_key(s[i], largest);
          const auto bin = static_cast<uint32_t>((key >> shift) & (kBins - 1));
          h[(i & (kWays - 1)) * kBins + bin] += cand & ((key & pmask) == prefix);
        }
        for (int w = 1; w < kWays; ++w) {
          for (int64_t b = 0; b < kBins; ++b) h[b] += h[w * kBins + b];
        }
        candidates_[c] = n;
      });
    });
    std::fill(total_.begin(), total_.end(), 0);
    for (int64_t c = 0; c < chunks_; ++c) {
      const int64_t* h = hist_.data() + c * kWays * kBins;
      for (int64_t b = 0; b < kBins; ++b) total_[b] += h[b];
    }
  }

  // Count of bin `bin` in chunk c's histogram from the last pass.
  int64_t chunk_count(int64_t c, uint32_t bin) const {
    return hist_[c * kWays * kBins + bin];
  }

  // The write pass: out = mask, except candidates for which the chunk's
  // decider says prune, which get 0. The decider returns its verdict without
  // branching on the common path.
  template <typename MakeDecider>
  void write_with(const MakeDecider& make_decider) {
    with_flags([&](auto only_ones, auto broadcast) {
      for_each_chunk([&](int64_t c) {
        auto prune = make_decider(c);
        const score_t* s = scores_;
        const mask_t* m = mask_;
        mask_t* out = out_;
        const bool largest = largest_;
        for (int64_t i = lo(c), e = hi(c); i < e; ++i) {
          const mask_t v = m[decltype(broadcast)::value ? 0 : i];
          bool cand = true;
          if constexpr (decltype(only_ones)::value) cand = v == mask_t(1);
          const bool cut = prune(magnitude_key(s[i], largest), i, cand);
          out[i] = keep_or_zero(v, !cut);
        }
      });
    });
  }

  // Candidates with key < thr are pruned, and of those with key == thr the
  // first `need` in flat order (chunk shares from the last histogram's `bin`).
  void write(key_t thr, int64_t need, uint32_t bin) {
    write_with([&](int64_t c) {
      int64_t before = 0;
      for (int64_t p = 0; p < c; ++p) before += chunk_count(p, bin);
      int64_t quota = tie_quota(need, before, chunk_count(c, bin));
      return [thr, quota](key_t key, int64_t, bool cand) mutable -> bool {
        if (C10_UNLIKELY(cand & (key == thr))) {
          if (quota == 0) return false;
          --quota;
          return true;
        }
        return cand & (key < thr);
      };
    });
  }

  // Writes the mask from the first digit alone, collecting the candidates of
  // the threshold bin; then prunes the `need` smallest (key, index) of those.
  void write_and_collect(uint32_t bin, int64_t need) {
    std::vector<int64_t> offset(chunks_ + 1, 0);
    for (int64_t c = 0; c < chunks_; ++c) {
      offset[c + 1] = offset[c] + chunk_count(c, bin);
    }
    std::vector<Candidate> pool(offset[chunks_]);
    write_with([&](int64_t c) {
      return [bin, next = pool.data() + offset[c]](key_t key, int64_t i, bool cand) mutable -> bool {
        const uint32_t digit = key_digit(key, 0);
        if (C10_UNLIKELY(cand & (digit == bin))) *next++ = Candidate{key, i};
        return cand & (digit < bin);
      };
    });
    std::nth_element(pool.begin(), pool.begin() + (need - 1), pool.end());
    for (int64_t j = 0; j < need; ++j) out_[pool[j].index] = mask_t(0);
  }

  const score_t* scores_;
  const mask_t* mask_;
  bool mask_broadcast_;
  mask_t* out_;
  int64_t numel_;
  bool only_ones_;
  bool largest_;
  int64_t chunks_;
  std::vector<int64_t> hist_;
  std::vector<int64_t> total_;
  std::vector<int64_t> candidates_;
};

bool is_broadcast_scalar(const at::Tensor& t) {
  if (t.numel() <= 1) return false;
  for (int64_t s : t.strides()) {
    if (s != 0) return false;
  }
  return true;
}

at::Tensor unstructured_mask_cpu(
    const at::Tensor& scores, const at::Tensor& mask, int64_t count,
    double fraction, bool only_ones, bool largest) {
  TORCH_CHECK(
      scores.sizes() == mask.sizes(),
      "unstructured_mask: scores and mask must have the same shape, got ",
      scores.sizes(), " vs ", mask.sizes());
  TORCH_CHECK(
      at::isFloatingType(scores.scalar_type()),
      "unstructured_mask: scores must be a floating point tensor, got ",
      scores.scalar_type());
  TORCH_CHECK(
      fraction >= 0.0 && fraction <= 1.0,
      "unstructured_mask: fraction must lie in [0, 1], got ", fraction);
  // Same memory format as the mask (what clone/ones_like would give); a
  // broadcast mask follows the scores instead.
  const bool broadcast = is_broadcast_scalar(mask);
  at::Tensor out = broadcast ? at::empty_like(scores, mask.options())
                             : at::empty_like(mask);
  if (out.numel() == 0) return out;
  const at::Tensor s = scores.contiguous();
  const at::Tensor m = broadcast ? mask : mask.contiguous();
  at::Tensor dst = out.is_contiguous()
      ? out
      : at::empty(out.sizes(), out.options());
  advise_huge_pages(dst);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, s.scalar_type(), "unstructured_mask_cpu", [&] {
        using score_t = scalar_t;
        AT_DISPATCH_ALL_TYPES_AND3(
            at::kHalf, at::kBFloat16, at::kBool, m.scalar_type(),
            "unstructured_mask_cpu", [&] {
              UnstructuredSelect<score_t, scalar_t>(
                  s.const_data_ptr<score_t>(), m.const_data_ptr<scalar_t>(),
                  broadcast, dst.mutable_data_ptr<scalar_t>(), s.numel(),
                  only_ones, largest)
                  .run(count, fraction);
            });
      });
  if (!dst.is_same(out)) out.copy_(dst);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("unstructured_mask", &unstructured_mask_cpu);
}

}  // namespace fastprune
