// Eight entries at a time, one lane per bit of a packed mask byte
// (csrc/common/bits.h), as GCC/Clang vector types: the compiler maps them to
// the target's baseline SIMD (SSE2 on x86-64, NEON on AArch64), so there is
// no runtime dispatch; one intrinsic (bits_of on SSE2) where the portable
// form is slow. A lane mask is a vector whose lanes are all ones or all
// zeros, as vector comparisons give; bits_of and lanes_of convert between it
// and the byte. Also here: the software prefetch of the CPU's streaming
// passes.
#pragma once

// GCC notes that passing these vectors by value changes the ABI without
// AVX; they never cross a library boundary (inline functions, and values
// inside one translation unit), so the note is silenced for its includers.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "../common/select.h"

namespace fastprune {

// Prefetches the entry kPrefetchAhead on from p (for a write: `write`).
// The streaming passes over weights and masks call it once per step: on the
// 2-core Xeon VM we measure on, the hardware prefetcher leaves a pass that
// reads 16 bytes per step waiting on memory, twice as slow.
constexpr int64_t kPrefetchAhead = 1024;

template <bool write = false, typename T>
inline void prefetch_ahead(const T* p) {
  __builtin_prefetch(p + kPrefetchAhead, write ? 1 : 0);
}

// On a lambda called once per group of eight: inlined into its loop.
#define FASTPRUNE_INLINE __attribute__((always_inline))

template <typename T>
struct LanesOf {
  typedef T type __attribute__((vector_size(8 * sizeof(T))));
};

// Eight T.
template <typename T>
using Lanes = typename LanesOf<T>::type;

template <typename T>
inline Lanes<T> load_lanes(const void* p) {
  Lanes<T> v;
  memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store_lanes(void* p, Lanes<T> v) {
  memcpy(p, &v, sizeof(v));
}

// Every lane x.
template <typename T>
inline Lanes<T> splat(T x) {
  return Lanes<T>{} + x;
}

// A comparison's result (signed lanes) as a lane mask of T.
template <typename T, typename Compared>
inline Lanes<T> lane_mask(Compared c) {
  return (Lanes<T>)c;
}

// Lane j has the value 2^j.
template <typename T>
inline Lanes<T> lane_bits() {
  return Lanes<T>{1, 2, 4, 8, 16, 32, 64, 128};
}

// The lane mask of the bits set in `byte` (all eight, as in a first prune,
// without the compare).
template <typename T>
inline Lanes<T> lanes_of(uint32_t byte) {
  if (byte == 0xFF) return splat(static_cast<T>(~T{0}));
  return lane_mask<T>((lane_bits<T>() & static_cast<T>(byte)) != 0);
}

// The byte of a lane mask: bit j set where lane j is. With SSE2 (every
// x86-64), lanes of up to 32 bits are packed to bytes whose sign bits
// pmovmskb gathers; otherwise each lane keeps only its 2^j and, the lanes'
// bits being disjoint, OR folds them: the vector's 64-bit words first, then
// the lanes inside one word.
template <typename T>
inline uint32_t bits_of(Lanes<T> m) {
#if defined(__SSE2__)
  if constexpr (sizeof(T) == 1) {
    return static_cast<uint32_t>(_mm_movemask_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(&m)))) & 0xFF;
  } else if constexpr (sizeof(T) == 2) {
    __m128i v;
    memcpy(&v, &m, sizeof(v));
    return static_cast<uint32_t>(_mm_movemask_epi8(_mm_packs_epi16(v, v))) & 0xFF;
  } else if constexpr (sizeof(T) == 4) {
    __m128i v[2];
    memcpy(v, &m, sizeof(v));
    const __m128i words = _mm_packs_epi32(v[0], v[1]);
    return static_cast<uint32_t>(_mm_movemask_epi8(_mm_packs_epi16(words, words))) & 0xFF;
  }
#endif
  const Lanes<T> weighted = m & lane_bits<T>();
  uint64_t words[sizeof(T)];  // 8 lanes of sizeof(T) bytes
  memcpy(words, &weighted, sizeof(words));
  uint64_t x = 0;
  for (uint64_t w : words) x |= w;
  for (int shift = 32; shift >= 8 * static_cast<int>(sizeof(T)); shift /= 2) x |= x >> shift;
  return static_cast<uint32_t>(x & 0xFF);
}

// The keys of magnitude_key (csrc/common/select.h) of the eight scores from
// s, as signed lanes: every key lies in [0, kAbs], so signed compares order
// them (SSE2 has no unsigned ones).
template <typename score_t>
using KeyLanes = Lanes<std::make_signed_t<typename KeyOf<score_t>::type>>;

template <typename score_t>
inline KeyLanes<score_t> magnitude_keys(const score_t* s, bool largest) {
  using B = MagnitudeBits<score_t>;
  using skey_t = std::make_signed_t<typename B::key_t>;
  const auto abs = static_cast<skey_t>(B::kAbs), nan = static_cast<skey_t>(B::kNan);
  const Lanes<skey_t> bits = load_lanes<skey_t>(s) & abs;
  const Lanes<skey_t> key = bits < nan ? bits : splat(nan);
  return largest ? splat(abs) - key : key;
}

}  // namespace fastprune
