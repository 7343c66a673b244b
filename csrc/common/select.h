// Device-agnostic core of the magnitude select, shared by the CPU and CUDA
// kernels so that the two cannot drift: the key transform, the radix digits,
// the bucket search and the radix descent, and the tie rule.
//
// Ordering. Every score maps to an unsigned key of its own width whose order
// is the order of |score|, with NaN above +inf (as torch.topk orders NaN);
// -0.0 and +0.0 share a key, and so do all NaNs. In `largest` mode the key is mirrored so that the
// largest |score| gets the smallest key. The select always prunes the k
// smallest keys.
//
// Tie rule. All keys below the threshold key are pruned; of the keys equal to
// it, the ones with the lowest row-major flat index are pruned first (for
// several tensors: lower tensor position first, then lower flat index). The
// separable passes generalize this to a window: the ties numbered (in that
// order, from 0) in [skip, skip + take) are pruned, so that a caller who
// knows how many ties come before a piece of the ranking (on other ranks)
// can prune its share.
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace fastprune {

template <typename scalar_t>
struct KeyOf;
template <>
struct KeyOf<c10::Half> { using type = uint16_t; static constexpr type kInf = 0x7C00; };
template <>
struct KeyOf<c10::BFloat16> { using type = uint16_t; static constexpr type kInf = 0x7F80; };
template <>
struct KeyOf<float> { using type = uint32_t; static constexpr type kInf = 0x7F800000u; };
template <>
struct KeyOf<double> { using type = uint64_t; static constexpr type kInf = 0x7FF0000000000000ull; };

// The constants of magnitude_key: the bits of |v| (all but the sign), and
// the one key every NaN gets, whatever its payload: just above +inf.
template <typename scalar_t>
struct MagnitudeBits {
  using key_t = typename KeyOf<scalar_t>::type;
  // (cast before shifting: ~ promotes 16-bit keys to int)
  static constexpr key_t kAbs = static_cast<key_t>(static_cast<key_t>(~key_t{0}) >> 1);
  static constexpr key_t kNan = KeyOf<scalar_t>::kInf + 1;
};

// The order-preserving key of |v| (mirrored when `largest`).
template <typename scalar_t>
C10_HOST_DEVICE inline typename KeyOf<scalar_t>::type magnitude_key(
    scalar_t v, bool largest) {
  using B = MagnitudeBits<scalar_t>;
  typename B::key_t bits;
  memcpy(&bits, &v, sizeof(bits));
  bits &= B::kAbs;
  bits = bits < B::kNan ? bits : B::kNan;
  return largest ? static_cast<typename B::key_t>(B::kAbs - bits) : bits;
}

// The radix digits of a key, `Bits` wide, counted from the most significant;
// the last one is narrower when `Bits` does not divide the key width. The
// CPU's single-process select uses 16-bit digits (one pass for 16-bit keys,
// a 65536-bin histogram fits its L2), the CUDA select 11-bit ones (a 2048-bin
// histogram fits shared memory), and the separable passes (radix_histogram,
// on every device) kPassDigitBits.
template <typename key_t, int Bits>
struct Radix {
  using key_type = key_t;
  static constexpr int kBits = Bits;
  static constexpr int64_t kBins = int64_t{1} << Bits;
  static constexpr int kKeyBits = static_cast<int>(sizeof(key_t) * 8);
  static constexpr int kDigits = (kKeyBits + Bits - 1) / Bits;

  // The lowest key bit of digit d.
  C10_HOST_DEVICE static constexpr int shift(int d) {
    const int s = kKeyBits - Bits * (d + 1);
    return s > 0 ? s : 0;
  }

  C10_HOST_DEVICE static uint32_t digit(key_t key, int d) {
    const int width = kKeyBits - Bits * d - shift(d);
    return static_cast<uint32_t>(key >> shift(d)) & ((1u << width) - 1);
  }

  // The bits of a key above digit d (those the earlier digits fixed).
  C10_HOST_DEVICE static key_t prefix_mask(int d) {
    return d == 0 ? key_t{0}
                  : static_cast<key_t>(static_cast<key_t>(~key_t{0}) << (kKeyBits - Bits * d));
  }
};

// Digit width of the separable passes: 2048 bins (16 KiB of int64 counts per
// histogram, what a distributed select sends per pass); 2 passes for 16-bit
// keys, 3 for 32-bit, 6 for 64-bit.
constexpr int kPassDigitBits = 11;

// Where the rank-th smallest key (1-based) falls in a histogram: its bin, and
// how many counted keys lie in lower bins.
struct Bucket {
  uint32_t bin;
  int64_t below;
};

C10_HOST_DEVICE inline Bucket find_bucket(const int64_t* hist, int64_t rank) {
  int64_t below = 0;
  uint32_t bin = 0;
  while (below + hist[bin] < rank) {
    below += hist[bin];
    ++bin;
  }
  return {bin, below};
}

// One step of the radix descent: from the histogram of digit d over the
// candidates whose higher digits are those of `prefix`, where the rank-th
// smallest of them (1-based) falls. `prefix` gains digit d (its bin), and the
// rank becomes the rank among the candidates that share the longer prefix.
template <typename key_t>
struct RadixStep {
  key_t prefix;   // the digits found so far; lower bits 0
  int64_t rank;   // 1-based, among the candidates whose key starts with them
  uint32_t bin;   // digit d: the histogram's bin that holds the rank-th key
  int64_t count;  // candidates in that bin (those sharing the new prefix)
  bool last;      // d is the last digit: `prefix` is the whole key
};

template <typename Digits>
C10_HOST_DEVICE inline RadixStep<typename Digits::key_type> radix_step(
    const int64_t* hist, int d, typename Digits::key_type prefix, int64_t rank) {
  using key_t = typename Digits::key_type;
  const Bucket b = find_bucket(hist, rank);
  return {static_cast<key_t>(prefix | static_cast<key_t>(static_cast<key_t>(b.bin) << Digits::shift(d))),
          rank - b.below, b.bin, hist[b.bin], d + 1 == Digits::kDigits};
}

// Never stops a radix descent early.
struct NoEarlyStop {
  template <typename Step>
  bool operator()(int, const Step&) const { return false; }
};

// The radix descent, digit by digit from the most significant, to the rank-th
// smallest key (1-based; at most the candidates counted in `hist`): for each
// digit, the histogram of the candidates that share the digits found so far,
// then radix_step. `hist` is digit 0's histogram (the caller has it already:
// its total gives the rank); histogram(d, prefix) returns digit d's as a host
// pointer to Digits::kBins counts, valid until the next call. Returns the last
// step: after the last digit, or the first step for which stop(d, step) is
// true. Used by the CPU and CUDA selects (the CUDA one copies each histogram
// to the host), and through the radix_step op by the cross-rank select
// (python/fastprune/_crossrank.py), whose histograms are summed over ranks.
template <typename Digits, typename Histogram, typename Stop = NoEarlyStop>
RadixStep<typename Digits::key_type> radix_descent(
    const int64_t* hist, int64_t rank, const Histogram& histogram, const Stop& stop = Stop{}) {
  RadixStep<typename Digits::key_type> step{0, rank, 0, 0, false};
  for (int d = 0;; ++d) {
    if (d > 0) hist = histogram(d, step.prefix);
    step = radix_step<Digits>(hist, d, step.prefix, step.rank);
    if (step.last || stop(d, step)) return step;
  }
}

// round(fraction * n) with ties to even, as Python's round() does; the product
// is the same float64 product Python computes.
C10_HOST_DEVICE inline int64_t round_half_even(double fraction, int64_t n) {
  const double x = fraction * static_cast<double>(n);
  const double f = floor(x);
  const double diff = x - f;
  int64_t r = static_cast<int64_t>(f);
  if (diff > 0.5 || (diff == 0.5 && (r & 1))) {
    ++r;
  }
  return r;
}

// Tie rule for one parallel chunk: of the `need` threshold-equal keys still to
// prune, how many fall to a chunk that has `ties_here` of them after
// `ties_before` in earlier chunks.
C10_HOST_DEVICE inline int64_t tie_quota(
    int64_t need, int64_t ties_before, int64_t ties_here) {
  const int64_t left = need - ties_before;
  return left <= 0 ? 0 : (left < ties_here ? left : ties_here);
}

// The end of the tie window [skip, skip + take), saturating at INT64_MAX.
C10_HOST_DEVICE inline int64_t tie_window_end(int64_t skip, int64_t take) {
  constexpr int64_t kMax = 0x7FFFFFFFFFFFFFFFll;
  return take > kMax - skip ? kMax : skip + take;
}

// The unsigned integer of T's size: T's raw bits.
template <typename T>
using BitsOf = std::conditional_t<
    sizeof(T) == 1, uint8_t,
    std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>>;

// `v` if keep, else an exact +0 of its type; branch-free (a bit mask on the
// raw representation), so unpredictable keep/prune patterns cost nothing.
template <typename T>
C10_HOST_DEVICE inline T keep_or_zero(T v, bool keep) {
  using U = BitsOf<T>;
  static_assert(sizeof(T) == sizeof(U), "keep_or_zero: unsupported mask type");
  U bits;
  memcpy(&bits, &v, sizeof(bits));
  bits &= static_cast<U>(U{0} - static_cast<U>(keep));
  memcpy(&v, &bits, sizeof(bits));
  return v;
}

}  // namespace fastprune
