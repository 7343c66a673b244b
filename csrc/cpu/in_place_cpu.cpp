// CPU kernel of prune_in_place_: the global magnitude select of the in-place
// layout. It ranks the live entries of several tensors as one concatenation,
// as global_unstructured_masks does with only_ones, but reads each mask in
// its stored format (packed bits, csrc/common/bits.h, or bool) and writes the
// result into it and into the values, in place: in the last pass a pruned
// entry's mask bit is cleared and its value set to 0. Nothing the size of a
// tensor is allocated.
//
// Passes: a 65536-bin histogram per 16-bit digit of the keys (one pass for
// float16/bfloat16, two for float32, four for float64), then the write pass.
// Work is split into one contiguous chunk of the concatenation per thread,
// its bounds moved back to a byte of a packed row so that every byte has one
// writer; each chunk keeps its own histogram, so the last pass's count at the
// threshold gives each chunk its share of the ties (lower position first).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/bits.h"
#include "../common/in_place_operands.h"
#include "../common/operand.h"
#include "../common/select.h"

namespace fastprune {
namespace {

template <typename score_t, bool kLargest>
class InPlaceSelect {
  using key_t = typename KeyOf<score_t>::type;
  using Digits = Radix<key_t, 16>;
  static constexpr int64_t kBins = Digits::kBins;
  static constexpr int kWays = 4;  // interleaved counters per bin (see histogram)
  static constexpr int64_t kBlock = int64_t{1} << 31;  // entries per fold: < 2^32 per way

 public:
  explicit InPlaceSelect(std::vector<Target> targets) : targets_(std::move(targets)) {
    for (const Target& t : targets_) numel_ += t.numel;
    chunks_ = numel_ < (int64_t{1} << 15) ? 1 : at::get_num_threads();
    bounds_.push_back(0);
    for (int64_t c = 1; c < chunks_; ++c) bounds_.push_back(byte_bound(numel_ * c / chunks_));
    bounds_.push_back(numel_);
    hist_.assign(chunks_ * kBins, 0);
  }

  // Prunes the `count` live entries of smallest key (ties: lower position).
  void run(int64_t count) {
    if (count == 0) return;
    histogram(0, 0);
    int64_t n = 0;
    for (int64_t b = 0; b < kBins; ++b) n += total_[b];
    TORCH_CHECK_VALUE(count <= n, "prune_in_place_: cannot prune ", count, " entries out of ", n, " live ones");
    const RadixStep<key_t> step = radix_descent<Digits>(total_.data(), count, [&](int d, key_t prefix) {
      histogram(d, prefix);
      return total_.data();
    });
    write(step.prefix, step.rank, step.bin);
  }

 private:
  // A concatenation position moved back to the first entry of its byte when
  // it falls inside a packed row.
  int64_t byte_bound(int64_t at) const {
    int64_t begin = 0;
    for (const Target& t : targets_) {
      if (at < begin + t.numel) return t.row > 0 ? at - (at - begin) % t.row % 8 : at;
      begin += t.numel;
    }
    return at;
  }

  // Calls visit(target, b, e) for the part [b, e) of each target in chunk c.
  template <typename F>
  void for_each_part(int64_t c, const F& visit) const {
    int64_t begin = 0;
    for (const Target& t : targets_) {
      const int64_t b = std::max(bounds_[c], begin) - begin;
      const int64_t e = std::min(bounds_[c + 1], begin + t.numel) - begin;
      if (b < e) visit(t, b, e);
      begin += t.numel;
    }
  }

  // Calls cut = f(lane, key, live) for the entries of [b, e) of `t` in order
  // (lane: the entry's place in its byte, 0 for a bool mask; f cuts live
  // entries only); with `write`, a cut entry's mask is cleared and its value
  // set to 0. Bytes of a packed mask with no live entry are skipped whole.
  template <bool write, typename F>
  void scan(const Target& t, int64_t b, int64_t e, const F& f) const {
    const auto* s = static_cast<const score_t*>(t.scores);
    dispatch_bits("prune_in_place_", t.value_size, [&](auto zero) {
      using bits_t = decltype(zero);
      auto* v = static_cast<bits_t*>(t.values);
      if (t.row == 0) {  // bool
        auto* m = static_cast<bool*>(t.mask);
        for (int64_t i = b; i < e; ++i) {
          const bool live = m[i];
          const bool cut = f(0, magnitude_key(s[i], kLargest), live);
          if constexpr (write) {
            m[i] = live & !cut;
            v[i] = keep_or_zero(v[i], !cut);
          }
        }
        return;
      }
      auto* m = static_cast<uint8_t*>(t.mask);
      const int64_t n = t.row;
      // One byte: its `width` entries from i (a constant 8 for whole bytes,
      // so that loop unrolls).
      auto byte_at = [&](int64_t at, int64_t i, auto width) {
        const uint32_t byte = m[at];
        if (byte == 0) return;
        uint32_t kept = byte;
        if (byte == 0xFF && static_cast<int>(width) == 8) {  // all live (a first prune): no test per entry
          for (int j = 0; j < 8; ++j) {
            const bool cut = f(j, magnitude_key(s[i + j], kLargest), std::true_type{});
            kept &= ~(static_cast<uint32_t>(cut) << j);
            if constexpr (write) v[i + j] = keep_or_zero(v[i + j], !cut);
          }
        } else {
          for (int j = 0; j < static_cast<int>(width); ++j) {
            const bool live = (byte >> j) & 1;
            const bool cut = f(j, magnitude_key(s[i + j], kLargest), live);
            kept &= ~(static_cast<uint32_t>(cut) << j);
            if constexpr (write) v[i + j] = keep_or_zero(v[i + j], !cut);
          }
        }
        if constexpr (write) m[at] = static_cast<uint8_t>(kept);
      };
      int64_t col = b % n, at = (b / n) * packed_row_bytes(n) + col / 8;
      for (int64_t i = b; i < e; ++at) {
        const int64_t width = std::min<int64_t>(8, n - col);
        if (width == 8) {
          byte_at(at, i, std::integral_constant<int, 8>{});
        } else {
          byte_at(at, i, width);
        }
        i += width;
        col += width;
        if (col == n) col = 0;
      }
    });
  }

  // Histogram of digit d over the live entries whose higher digits equal
  // `prefix`, per chunk (kept for the tie split), summed into total_. Each
  // bin has kWays 32-bit counters, an entry's lane picking one, so a run of
  // one bin does not serialize on one counter; they are folded into the
  // chunk's 64-bit counts before they could overflow.
  void histogram(int d, key_t prefix) {
    const key_t pmask = Digits::prefix_mask(d);
    const int shift = Digits::shift(d);
    at::parallel_for(0, chunks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        int64_t* h = hist_.data() + c * kBins;
        std::fill(h, h + kBins, 0);
        std::vector<uint32_t> ways(kBins * kWays, 0);
        int64_t pending = 0;
        auto fold = [&] {
          for (int64_t bin = 0; bin < kBins; ++bin) {
            for (int w = 0; w < kWays; ++w) h[bin] += ways[bin * kWays + w];
          }
          std::fill(ways.begin(), ways.end(), 0);
          pending = 0;
        };
        for_each_part(c, [&](const Target& t, int64_t b, int64_t e) {
          for (int64_t start = b; start < e; start += kBlock) {
            const int64_t stop = std::min(e, start + kBlock);
            if (pending + (stop - start) > kBlock) fold();
            pending += stop - start;
            uint32_t* w = ways.data();
            if (d == 0) {  // every live entry counts
              scan<false>(t, start, stop, [w, shift](int lane, key_t key, auto live) {
                w[((key >> shift) & (kBins - 1)) * kWays + (lane & (kWays - 1))] += live;
                return false;
              });
            } else {
              scan<false>(t, start, stop, [w, shift, pmask, prefix](int lane, key_t key, auto live) {
                if ((key & pmask) == prefix) w[((key >> shift) & (kBins - 1)) * kWays + (lane & (kWays - 1))] += live;
                return false;
              });
            }
          }
        });
        fold();
      }
    });
    total_.assign(kBins, 0);
    for (int64_t c = 0; c < chunks_; ++c) {
      for (int64_t bin = 0; bin < kBins; ++bin) total_[bin] += hist_[c * kBins + bin];
    }
  }

  // Prunes every live entry with key < thr and the first `need` with key ==
  // thr (whose last digit is `bin`), each chunk its share of those ties.
  void write(key_t thr, int64_t need, uint32_t bin) {
    std::vector<int64_t> quota(chunks_);
    int64_t before = 0;
    for (int64_t c = 0; c < chunks_; ++c) {
      const int64_t here = hist_[c * kBins + bin];
      quota[c] = tie_quota(need, before, here);
      before += here;
    }
    at::parallel_for(0, chunks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        int64_t rank = 0;
        const int64_t q = quota[c];
        for_each_part(c, [&](const Target& t, int64_t b, int64_t e) {
          scan<true>(t, b, e, [&rank, thr, q](int, key_t key, auto live) -> bool {
            if (C10_UNLIKELY(key == thr)) return live && rank++ < q;  // a live tie: the first q of the chunk go
            return static_cast<bool>(live & (key < thr));
          });
        });
      }
    });
  }

  std::vector<Target> targets_;
  int64_t numel_ = 0;
  int64_t chunks_ = 1;
  std::vector<int64_t> bounds_;  // chunk c is [bounds_[c], bounds_[c + 1])
  std::vector<int64_t> hist_;    // per chunk, the last pass's counts
  std::vector<int64_t> total_;
};

void prune_in_place_cpu(
    at::TensorList values, at::TensorList scores, at::TensorList masks, int64_t count, bool largest) {
  std::vector<Target> targets = make_targets(values, scores, masks);
  if (targets.empty()) {
    TORCH_CHECK_VALUE(count == 0, "prune_in_place_: cannot prune ", count, " entries out of 0 live ones");
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, scores[0].scalar_type(), "prune_in_place_", [&] {
        if (largest) {
          InPlaceSelect<scalar_t, true>(std::move(targets)).run(count);
        } else {
          InPlaceSelect<scalar_t, false>(std::move(targets)).run(count);
        }
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("prune_in_place_", &prune_in_place_cpu);
}

}  // namespace fastprune
