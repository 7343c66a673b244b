// CPU kernel of prune_in_place_: the global magnitude select of the in-place
// layout. It ranks the live entries of several tensors as one concatenation,
// as global_unstructured_masks does with only_ones, but reads each mask in
// its stored format (packed bits, csrc/common/bits.h, or bool) and writes the
// result into it and into the values, in place: in the last pass a pruned
// entry's mask bit is cleared and its value set to 0. Nothing the size of a
// tensor is allocated.
//
// Passes, each over eight entries at a time (one mask byte; lanes.h):
// a histogram of the keys' first 16-bit digit, then one more per further
// digit (float32: two in all, float64: four), then the write pass. For
// large inputs a sample brackets the threshold (bracket_cpu.h), so the first
// histogram counts the entries below the bracket with vector compares and
// bins only the few inside it one by one; should the bracket miss, the
// histogram is taken again over every bin. Work is split into one contiguous
// chunk of the concatenation per thread, its bounds moved back to a byte of a
// packed row so that every byte has one writer; each chunk keeps its own
// histogram, so the last pass's count at the threshold gives each chunk its
// share of the ties (lower position first).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/bits.h"
#include "../common/in_place_operands.h"
#include "../common/operand.h"
#include "../common/select.h"
#include "bracket_cpu.h"
#include "lanes.h"

namespace fastprune {
namespace {

template <typename score_t, bool kLargest>
class InPlaceSelect {
  using key_t = typename KeyOf<score_t>::type;
  using skey_t = std::make_signed_t<key_t>;  // lanes compare keys signed (lanes.h)
  using Keys = Lanes<skey_t>;
  using Digits = Radix<key_t, 16>;
  static constexpr int64_t kBins = Digits::kBins;
  static constexpr int64_t kMinSampled = int64_t{1} << 16;  // fewer entries: no sample
  static constexpr int64_t kMaxSample = int64_t{1} << 18;
  static constexpr int64_t kFold = int64_t{1} << 15;  // groups per lane counter (< 2^16 each)

  // The first digit's bins [lo, hi] are counted one by one; the entries
  // below lo are counted in bin lo - 1, those above hi not at all.
  struct Bracket {
    uint32_t lo = 0, hi = kBins - 1;
  };

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
    const Bracket bracket = sampled(count);
    first_histogram(bracket);
    if (!holds(bracket, count)) first_histogram(Bracket{});
    int64_t n = 0;
    for (int64_t b = 0; b < kBins; ++b) n += total_[b];
    TORCH_CHECK_VALUE(count <= n, "prune_in_place_: cannot prune ", count, " entries out of ", n, " live ones");
    const RadixStep<key_t> step = radix_descent<Digits>(total_.data(), count, [&](int d, key_t prefix) {
      next_histogram(d, prefix);
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

  // Whether entry i of t is live.
  static bool is_live(const Target& t, int64_t i) {
    if (t.row == 0) return static_cast<const bool*>(t.mask)[i];
    const int64_t col = i % t.row;
    const auto* m = static_cast<const uint8_t*>(t.mask);
    return (m[(i / t.row) * packed_row_bytes(t.row) + col / 8] >> (col % 8)) & 1;
  }

  // The bracket of the first digit from a sample of the live entries (every
  // bin for small inputs).
  Bracket sampled(int64_t count) const {
    if (numel_ < kMinSampled) return {};
    const int64_t s = std::min(kMaxSample, numel_ / 16), step = numel_ / s;
    std::vector<key_t> keys;
    keys.reserve(s);
    int64_t begin = 0;
    size_t t = 0;
    for (int64_t j = 0; j < s; ++j) {
      const int64_t at = j * step + step / 2;
      while (at >= begin + targets_[t].numel) begin += targets_[t++].numel;
      if (is_live(targets_[t], at - begin)) {
        keys.push_back(magnitude_key(static_cast<const score_t*>(targets_[t].scores)[at - begin], kLargest));
      }
    }
    if (keys.empty()) return {};
    const KeyBracket<key_t> b = sampled_bracket(keys, s, numel_, count, -1.0);
    return {Digits::digit(b.lo, 0), Digits::digit(static_cast<key_t>(b.hi - 1), 0)};
  }

  // Whether the first digit's threshold bin is inside the bracket, so that
  // its histogram holds what the descent needs.
  bool holds(Bracket b, int64_t count) const {
    const int64_t below = b.lo > 0 ? total_[b.lo - 1] : 0;
    int64_t inside = 0;
    for (uint32_t bin = b.lo; bin <= b.hi; ++bin) inside += total_[bin];
    return below < count && count <= below + inside;
  }

  // Calls kept = group(s, v, live) for the entries of [b, e) of `t`, eight
  // at a time: s and v their scores and values, live the bits of those of
  // them that are live (bit j: entry j), kept the bits to keep live; with
  // `write` the mask takes `kept` (the group zeroes the values it cuts). A
  // packed byte of a row's end, or a bool mask's last entries, come as a
  // padded copy with their lanes past the end dead. Groups with no live entry
  // are skipped. The group is taken and returned by value, so that its state
  // stays in registers.
  template <bool write, typename G>
  G scan(const Target& t, int64_t b, int64_t e, G group) const {
    dispatch_bits("prune_in_place_", t.value_size, [&](auto zero) {
      using bits_t = decltype(zero);
      G g = group;
      const auto* const s = static_cast<const score_t*>(t.scores);
      auto* const v = static_cast<bits_t*>(t.values);
      auto* const m = static_cast<uint8_t*>(t.mask);
      auto ahead = [&](int64_t i) FASTPRUNE_INLINE {
        prefetch_ahead(s + i);
        if constexpr (write) prefetch_ahead<true>(v + i);
      };
      auto padded = [&](int64_t i, int width, uint32_t live) FASTPRUNE_INLINE {
        score_t ps[8] = {};
        bits_t pv[8] = {};
        std::copy(s + i, s + i + width, ps);
        std::copy(v + i, v + i + width, pv);
        const uint32_t kept = g(ps, pv, live & ((1u << width) - 1));
        if constexpr (write) std::copy(pv, pv + width, v + i);
        return kept;
      };
      if (t.row == 0) {  // bool: any eight entries in a row
        int64_t i = b;
        for (; i + 8 <= e; i += 8) {
          ahead(i);
          const uint32_t live = bits_of<uint8_t>(lane_mask<uint8_t>(load_lanes<uint8_t>(m + i) != 0));
          if (live == 0) continue;
          const uint32_t kept = g(s + i, v + i, live);
          if constexpr (write) store_lanes<uint8_t>(m + i, lanes_of<uint8_t>(kept) & 1);
        }
        const auto width = static_cast<int>(e - i);
        uint32_t live = 0;
        for (int j = 0; j < width; ++j) live |= static_cast<uint32_t>(m[i + j] != 0) << j;
        if (live != 0) {
          const uint32_t kept = padded(i, width, live);
          if constexpr (write) {
            for (int j = 0; j < width; ++j) m[i + j] = (kept >> j) & 1;
          }
        }
      } else {  // packed, row by row: the whole bytes, then a last byte of fewer entries
        const int64_t n = t.row, bytes = packed_row_bytes(n);
        for (int64_t row = b / n, col = b % n, i = b; i < e; ++row, col = 0) {
          uint8_t* const mr = m + row * bytes;
          const int64_t stop = std::min(n, col + (e - i)), whole = stop / 8 * 8;
          for (; col < whole; col += 8, i += 8) {
            ahead(i);
            if (const uint32_t live = mr[col / 8]) {
              const uint32_t kept = g(s + i, v + i, live);
              if constexpr (write) mr[col / 8] = static_cast<uint8_t>(kept);
            }
          }
          if (col < stop) {
            if (const uint32_t live = mr[col / 8]) {
              const uint32_t kept = padded(i, static_cast<int>(stop - col), live);
              if constexpr (write) mr[col / 8] = static_cast<uint8_t>(kept);
            }
            i += stop - col;
          }
        }
      }
      group = g;
    });
    return group;
  }

  // The first digit's histogram over the live entries, per chunk (kept for
  // the tie split), summed into total_, the bins outside `bracket` lumped as
  // the Bracket says. Counts below it are kept per lane (a vector add per
  // group); entries inside are binned one by one.
  void first_histogram(Bracket bracket) {
    constexpr int kShift = Digits::shift(0);
    // (every digit fits its signed lane: a key's sign bit is 0)
    const Keys lo = splat(static_cast<skey_t>(bracket.lo));
    const Keys hi = splat(static_cast<skey_t>(std::min<int64_t>(bracket.hi, std::numeric_limits<skey_t>::max())));
    histogram([lo, hi](int64_t* h, Keys& below, const score_t* s, uint32_t live) FASTPRUNE_INLINE {
      const Keys digit = magnitude_keys(s, kLargest) >> kShift;
      const Keys lanes = lanes_of<skey_t>(live);
      const Keys under = lanes & lane_mask<skey_t>(digit < lo);
      below -= under;  // + 1 in each lane under
      for (uint32_t m = bits_of<skey_t>(lanes & ~under & lane_mask<skey_t>(digit <= hi)); m; m &= m - 1) {
        ++h[digit[__builtin_ctz(m)]];
      }
    }, std::max<int64_t>(bracket.lo, 1) - 1);  // (below a bracket from 0: none)
  }

  // Digit d's histogram (d > 0) over the live entries whose higher digits
  // equal `prefix`, per chunk, summed into total_.
  void next_histogram(int d, key_t prefix) {
    const Keys pmask = splat(static_cast<skey_t>(Digits::prefix_mask(d))), want = splat(static_cast<skey_t>(prefix));
    const int shift = Digits::shift(d);
    histogram([pmask, want, shift](int64_t* h, Keys&, const score_t* s, uint32_t live) FASTPRUNE_INLINE {
      const Keys key = magnitude_keys(s, kLargest);
      const Keys digit = (key >> shift) & static_cast<skey_t>(kBins - 1);
      for (uint32_t m = bits_of<skey_t>(lanes_of<skey_t>(live) & lane_mask<skey_t>((key & pmask) == want)); m;
           m &= m - 1) {
        ++h[digit[__builtin_ctz(m)]];
      }
    }, 0);  // (no lane counts)
  }

  // The group of a histogram pass: bin(h, below, s, live), h the chunk's
  // counts and `below` lane counters, folded into h[lump] before they could
  // overflow.
  template <typename Bin>
  struct Counting {
    const Bin* bin;  // (a pointer: a lambda cannot be assigned)
    int64_t* h;
    int64_t lump;
    Keys below{};
    int64_t groups = 0;

    template <typename V>
    FASTPRUNE_INLINE uint32_t operator()(const score_t* s, V*, uint32_t live) {
      (*bin)(h, below, s, live);
      if (++groups == kFold) fold();
      return live;
    }
    void fold() {
      for (int j = 0; j < 8; ++j) h[lump] += below[j];
      below = Keys{};
      groups = 0;
    }
  };

  // Runs the Counting group of `bin` over each chunk, then total_ sums the
  // chunks.
  template <typename Bin>
  void histogram(const Bin& bin, int64_t lump) {
    at::parallel_for(0, chunks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        int64_t* h = hist_.data() + c * kBins;
        std::fill(h, h + kBins, 0);
        Counting<Bin> counting{&bin, h, lump};
        for_each_part(c, [&](const Target& t, int64_t b, int64_t e) { counting = scan<false>(t, b, e, counting); });
        counting.fold();
      }
    });
    total_.assign(kBins, 0);
    for (int64_t c = 0; c < chunks_; ++c) {
      for (int64_t bin = 0; bin < kBins; ++bin) total_[bin] += hist_[c * kBins + bin];
    }
  }

  // The group of the write pass: cuts the live entries with key <
  // `threshold` and the first q live ties (lower lanes first), zeroing their
  // values.
  struct Cutting {
    Keys threshold;
    int64_t q;
    int64_t rank = 0;  // the ties met so far

    template <typename bits_t>
    FASTPRUNE_INLINE uint32_t operator()(const score_t* s, bits_t* v, uint32_t live) {
      const Keys key = magnitude_keys(s, kLargest);
      const Keys lanes = lanes_of<skey_t>(live);
      uint32_t cut = bits_of<skey_t>(lanes & lane_mask<skey_t>(key < threshold));
      uint32_t ties = bits_of<skey_t>(lanes & lane_mask<skey_t>(key == threshold));
      for (; C10_UNLIKELY(ties != 0) && rank < q; ties &= ties - 1, ++rank) cut |= ties & (0u - ties);
      if (cut != 0) store_lanes<bits_t>(v, load_lanes<bits_t>(v) & ~lanes_of<bits_t>(cut));
      return live & ~cut;
    }
  };

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
    const Keys threshold = splat(static_cast<skey_t>(thr));
    at::parallel_for(0, chunks_, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        Cutting cutting{threshold, quota[c]};
        for_each_part(c, [&](const Target& t, int64_t b, int64_t e) { cutting = scan<true>(t, b, e, cutting); });
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
