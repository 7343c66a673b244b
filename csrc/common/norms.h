// Device-agnostic core of the per-channel norms, shared by the CPU and CUDA
// kernels: which reduction a p selects, the per-element term, how partial
// results combine, and the final root. Accumulation is in float64.
//
// The norms are those of torch.linalg.vector_norm: p = inf is max |x|, -inf is
// min |x|, 0 counts the non-zeros, any other p is (sum |x|^p)^(1/p); NaN
// propagates through every kind but the count (NaN is a non-zero there).
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

namespace fastprune {

enum class NormKind { kMax, kMin, kCount, kSum, kSumSquares, kSumPow };

inline NormKind norm_kind(double p) {
  if (p == std::numeric_limits<double>::infinity()) return NormKind::kMax;
  if (p == -std::numeric_limits<double>::infinity()) return NormKind::kMin;
  if (p == 0) return NormKind::kCount;
  if (p == 1) return NormKind::kSum;
  if (p == 2) return NormKind::kSumSquares;
  return NormKind::kSumPow;
}

// The accumulator's start: the neutral element of combine().
template <NormKind K>
C10_HOST_DEVICE inline double norm_identity() {
  return K == NormKind::kMin ? std::numeric_limits<double>::infinity() : 0.0;
}

// What one entry contributes. A general power of a float16/bfloat16/float32
// entry is taken in float (as torch does; several times faster than in
// double), and only summed in double.
template <NormKind K, typename scalar_t>
C10_HOST_DEVICE inline double norm_term(scalar_t v, double p) {
  if (K == NormKind::kSumPow && !std::is_same<scalar_t, double>::value) {
    return powf(fabsf(static_cast<float>(v)), static_cast<float>(p));
  }
  const double x = static_cast<double>(v);
  switch (K) {
    case NormKind::kCount: return x != 0 ? 1.0 : 0.0;
    case NormKind::kSumSquares: return x * x;
    case NormKind::kSumPow: return pow(fabs(x), p);
    default: return fabs(x);  // kMax, kMin, kSum
  }
}

// Two partial results in one (associative; max and min keep NaN).
template <NormKind K>
C10_HOST_DEVICE inline double norm_combine(double a, double b) {
  if (K == NormKind::kMax || K == NormKind::kMin) {
    if (a != a || b != b) return a + b;  // NaN
    return K == NormKind::kMax ? (a > b ? a : b) : (a < b ? a : b);
  }
  return a + b;
}

// The norm from the combined accumulator.
template <NormKind K>
C10_HOST_DEVICE inline double norm_finish(double acc, double p) {
  switch (K) {
    case NormKind::kSumSquares: return sqrt(acc);
    case NormKind::kSumPow: return pow(acc, 1.0 / p);
    default: return acc;
  }
}

template <NormKind K>
using NormTag = std::integral_constant<NormKind, K>;

// Calls f(NormTag<K>{}) with the kind as a compile-time constant, so that each
// kind gets its own loop (`constexpr NormKind K = decltype(tag)::value;`).
template <typename F>
inline void dispatch_norm_kind(NormKind kind, F&& f) {
  switch (kind) {
    case NormKind::kMax: f(NormTag<NormKind::kMax>{}); break;
    case NormKind::kMin: f(NormTag<NormKind::kMin>{}); break;
    case NormKind::kCount: f(NormTag<NormKind::kCount>{}); break;
    case NormKind::kSum: f(NormTag<NormKind::kSum>{}); break;
    case NormKind::kSumSquares: f(NormTag<NormKind::kSumSquares>{}); break;
    case NormKind::kSumPow: f(NormTag<NormKind::kSumPow>{}); break;
  }
}

}  // namespace fastprune
