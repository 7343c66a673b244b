// Tests of the magnitude select: the device-agnostic helpers of
// csrc/common/select.h (and segments.h) directly, and fastprune::unstructured_mask and
// fastprune::global_unstructured_masks end to end through the dispatcher
// against a brute-force reference (a stable sort of the candidates by
// magnitude, so that equal magnitudes keep flat order).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "common/segments.h"
#include "common/select.h"
#include "cpu/lanes.h"

namespace fastprune {
namespace {

// ---------------------------------------------------------------------------
// csrc/common/select.h
// ---------------------------------------------------------------------------

template <typename T>
using Key = typename KeyOf<T>::type;

template <typename T>
Key<T> bits_of(T v) {
  Key<T> b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}

template <typename T>
T from_bits(Key<T> b) {
  T v;
  std::memcpy(&v, &b, sizeof(b));
  return v;
}

template <typename T>
constexpr Key<T> sign_bit() {
  return static_cast<Key<T>>(Key<T>{1} << (sizeof(Key<T>) * 8 - 1));
}

// -v by flipping the sign bit, exact for NaN payloads too.
template <typename T>
T negate(T v) {
  return from_bits<T>(static_cast<Key<T>>(bits_of(v) ^ sign_bit<T>()));
}

template <typename T>
class MagnitudeKeyTest : public ::testing::Test {};
using ScoreTypes = ::testing::Types<float, double, c10::Half, c10::BFloat16>;
TYPED_TEST_SUITE(MagnitudeKeyTest, ScoreTypes);

TYPED_TEST(MagnitudeKeyTest, OrdersByMagnitudeWithNanOnTop) {
  using T = TypeParam;
  using L = std::numeric_limits<T>;
  // Strictly increasing magnitudes.
  const std::vector<T> mags = {
      T(0),        L::denorm_min(), T(2 * static_cast<double>(L::denorm_min())),
      L::min(),    T(0.5),          T(1),
      T(1 + static_cast<double>(L::epsilon())), T(2), L::max(),
      L::infinity(), L::quiet_NaN()};
  for (size_t i = 0; i < mags.size(); ++i) {
    SCOPED_TRACE("magnitude #" + std::to_string(i));
    const T v = mags[i];
    for (bool largest : {false, true}) {
      EXPECT_EQ(magnitude_key(v, largest), magnitude_key(negate(v), largest));
    }
    for (size_t j = i + 1; j < mags.size(); ++j) {
      for (T a : {v, negate(v)}) {
        for (T b : {mags[j], negate(mags[j])}) {
          EXPECT_LT(magnitude_key(a, false), magnitude_key(b, false));
          EXPECT_GT(magnitude_key(a, true), magnitude_key(b, true));
        }
      }
    }
  }
  // -0.0 and +0.0 share a key; every NaN sits above +inf, in both signs.
  EXPECT_EQ(magnitude_key(T(-0.0), false), magnitude_key(T(0.0), false));
  EXPECT_EQ(magnitude_key(T(-0.0), false), Key<T>{0});
  // (Not L::signaling_NaN(): c10's BFloat16 one is +inf.)
  const T inf = L::infinity();
  const T lowest_payload_nan = from_bits<T>(static_cast<Key<T>>(bits_of(inf) + 1));
  for (T nan : {L::quiet_NaN(), lowest_payload_nan, negate(L::quiet_NaN())}) {
    EXPECT_GT(magnitude_key(nan, false), magnitude_key(inf, false));
    EXPECT_LT(magnitude_key(nan, true), magnitude_key(inf, true));
  }
}

// NaNs of every payload and sign, lowest payload first.
template <typename T>
std::vector<T> nans_of_all_payloads() {
  const Key<T> inf = bits_of(std::numeric_limits<T>::infinity());
  const Key<T> top = static_cast<Key<T>>(static_cast<Key<T>>(~Key<T>{0}) >> 1);
  std::vector<T> nans;
  for (Key<T> b : {static_cast<Key<T>>(inf + 1), bits_of(std::numeric_limits<T>::quiet_NaN()),
                   static_cast<Key<T>>(inf + (top - inf) / 3), top}) {
    nans.push_back(from_bits<T>(b));
    nans.push_back(negate(from_bits<T>(b)));
  }
  return nans;
}

// NaNs tie whatever their payload, so the tie rule orders them by position.
TYPED_TEST(MagnitudeKeyTest, NanPayloadsTie) {
  using T = TypeParam;
  const std::vector<T> nans = nans_of_all_payloads<T>();
  for (const T nan : nans) {
    ASSERT_TRUE(std::isnan(static_cast<double>(nan)));
    for (bool largest : {false, true}) {
      EXPECT_EQ(magnitude_key(nan, largest), magnitude_key(nans[0], largest))
          << "NaN bits " << std::hex << +bits_of(nan) << " vs " << +bits_of(nans[0]);
    }
  }
}

TYPED_TEST(MagnitudeKeyTest, RandomPairsMatchAbsOrder) {
  using T = TypeParam;
  std::mt19937_64 rng(7);
  std::normal_distribution<double> normal;
  std::uniform_int_distribution<int> exponent(-40, 40);
  auto draw = [&] {
    // Few distinct values so that equal magnitudes come up often.
    return T(std::ldexp(std::round(normal(rng) * 4) / 4, exponent(rng) / 8));
  };
  for (int t = 0; t < 20000; ++t) {
    const T a = draw(), b = draw();
    const double x = std::fabs(static_cast<double>(a));
    const double y = std::fabs(static_cast<double>(b));
    for (bool largest : {false, true}) {
      const auto ka = magnitude_key(a, largest), kb = magnitude_key(b, largest);
      EXPECT_EQ(ka == kb, x == y) << x << " vs " << y;
      EXPECT_EQ(ka < kb, largest ? x > y : x < y) << x << " vs " << y;
    }
  }
}

template <typename key_t>
using R16 = Radix<key_t, 16>;
template <typename key_t>
using R11 = Radix<key_t, kPassDigitBits>;

TEST(KeyDigit, SplitsKeysIntoSixteenBitDigits) {
  EXPECT_EQ(R16<uint16_t>::kDigits, 1);
  EXPECT_EQ(R16<uint32_t>::kDigits, 2);
  EXPECT_EQ(R16<uint64_t>::kDigits, 4);
  EXPECT_EQ(R16<uint16_t>::digit(0xBEEF, 0), 0xBEEFu);
  EXPECT_EQ(R16<uint32_t>::digit(0x12345678u, 0), 0x1234u);
  EXPECT_EQ(R16<uint32_t>::digit(0x12345678u, 1), 0x5678u);
  const uint64_t k64 = 0x0123456789ABCDEFull;
  EXPECT_EQ(R16<uint64_t>::digit(k64, 0), 0x0123u);
  EXPECT_EQ(R16<uint64_t>::digit(k64, 1), 0x4567u);
  EXPECT_EQ(R16<uint64_t>::digit(k64, 2), 0x89ABu);
  EXPECT_EQ(R16<uint64_t>::digit(k64, 3), 0xCDEFu);

  EXPECT_EQ(R16<uint16_t>::prefix_mask(0), 0u);
  EXPECT_EQ(R16<uint32_t>::prefix_mask(0), 0u);
  EXPECT_EQ(R16<uint32_t>::prefix_mask(1), 0xFFFF0000u);
  EXPECT_EQ(R16<uint64_t>::prefix_mask(0), 0ull);
  EXPECT_EQ(R16<uint64_t>::prefix_mask(1), 0xFFFF000000000000ull);
  EXPECT_EQ(R16<uint64_t>::prefix_mask(2), 0xFFFFFFFF00000000ull);
  EXPECT_EQ(R16<uint64_t>::prefix_mask(3), 0xFFFFFFFFFFFF0000ull);
}

TEST(KeyDigit, ElevenBitDigitsEndWithANarrowerOne) {
  EXPECT_EQ(R11<uint16_t>::kDigits, 2);
  EXPECT_EQ(R11<uint32_t>::kDigits, 3);
  EXPECT_EQ(R11<uint64_t>::kDigits, 6);
  // 0xBEEF = 10111 01110 111 1 -> top 11 bits 0x5F7, last 5 bits 0x0F.
  EXPECT_EQ(R11<uint16_t>::digit(0xBEEF, 0), 0xBEEFu >> 5);
  EXPECT_EQ(R11<uint16_t>::digit(0xBEEF, 1), 0xBEEFu & 0x1F);
  EXPECT_EQ(R11<uint32_t>::digit(0x12345678u, 2), 0x12345678u & 0x3FF);
  EXPECT_EQ(R11<uint32_t>::prefix_mask(1), 0xFFE00000u);
  EXPECT_EQ(R11<uint32_t>::prefix_mask(2), 0xFFFFFC00u);
  EXPECT_EQ(R11<uint64_t>::prefix_mask(5), ~uint64_t{0} << 9);
}

template <typename key_t, int Bits>
void expect_digits_rebuild_keys(std::mt19937_64& rng) {
  using D = Radix<key_t, Bits>;
  for (int t = 0; t < 10000; ++t) {
    const auto a = static_cast<key_t>(rng());
    // b shares a random number of leading digits with a.
    const int shared = static_cast<int>(rng() % (D::kDigits + 1));
    const key_t keep = D::prefix_mask(shared == D::kDigits ? 0 : shared) |
        (shared == D::kDigits ? static_cast<key_t>(~key_t{0}) : key_t{0});
    const auto b = static_cast<key_t>((a & keep) | (static_cast<key_t>(rng()) & ~keep));
    key_t rebuilt = 0;
    for (int d = 0; d < D::kDigits; ++d) rebuilt |= static_cast<key_t>(static_cast<key_t>(D::digit(a, d)) << D::shift(d));
    EXPECT_EQ(rebuilt, a);
    for (int d = 0; d < D::kDigits; ++d) {
      bool leading_equal = true;
      for (int e = 0; e < d; ++e) leading_equal &= D::digit(a, e) == D::digit(b, e);
      EXPECT_EQ((a & D::prefix_mask(d)) == (b & D::prefix_mask(d)), leading_equal);
    }
  }
}

TEST(KeyDigit, DigitsRebuildTheKeyAndPrefixesCompareLeadingDigits) {
  std::mt19937_64 rng(11);
  expect_digits_rebuild_keys<uint64_t, 16>(rng);
  expect_digits_rebuild_keys<uint64_t, kPassDigitBits>(rng);
  expect_digits_rebuild_keys<uint32_t, kPassDigitBits>(rng);
  expect_digits_rebuild_keys<uint16_t, kPassDigitBits>(rng);
}

TEST(FindBucket, FindsTheBinOfTheRankThKey) {
  constexpr int64_t kBins = R16<uint32_t>::kBins;
  std::vector<int64_t> hist(kBins, 0);
  hist[3] = 2;
  hist[7] = 5;
  hist[kBins - 1] = 1;
  struct Case { int64_t rank; uint32_t bin; int64_t below; };
  for (const Case& c : {Case{1, 3, 0}, Case{2, 3, 0}, Case{3, 7, 2}, Case{7, 7, 2},
                        Case{8, 65535, 7}}) {
    const Bucket b = find_bucket(hist.data(), c.rank);
    EXPECT_EQ(b.bin, c.bin) << "rank " << c.rank;
    EXPECT_EQ(b.below, c.below) << "rank " << c.rank;
  }
  // Random histograms: the bin is the first whose running sum reaches rank.
  std::mt19937_64 rng(3);
  for (int t = 0; t < 20; ++t) {
    std::fill(hist.begin(), hist.end(), 0);
    for (int i = 0; i < 1000; ++i) hist[rng() % (rng() % 2 ? 64 : kBins)] += 1 + rng() % 3;
    std::vector<int64_t> cum(kBins);
    std::partial_sum(hist.begin(), hist.end(), cum.begin());
    for (int i = 0; i < 200; ++i) {
      const int64_t rank = 1 + static_cast<int64_t>(rng() % cum.back());
      const auto bin = static_cast<uint32_t>(
          std::lower_bound(cum.begin(), cum.end(), rank) - cum.begin());
      const Bucket b = find_bucket(hist.data(), rank);
      EXPECT_EQ(b.bin, bin);
      EXPECT_EQ(b.below, cum[bin] - hist[bin]);
    }
  }
}

// The descent over the histograms of a key list finds the rank-th smallest
// key, its rank among its ties and their number; an early stop returns the
// step it stopped at.
template <typename key_t, int Bits>
void expect_descent_finds_the_rank_th_key(std::mt19937_64& rng) {
  using D = Radix<key_t, Bits>;
  for (int t = 0; t < 50; ++t) {
    std::vector<key_t> keys(1 + rng() % 3000);
    const key_t base = static_cast<key_t>(rng());
    for (key_t& k : keys) {  // clustered, with ties: many keys share digits
      k = static_cast<key_t>(rng() % 4 == 0 ? rng() : base + rng() % 64);
    }
    std::vector<key_t> sorted = keys;
    std::sort(sorted.begin(), sorted.end());
    std::vector<int64_t> hist(D::kBins);
    int calls = 0;
    auto histogram = [&](int d, key_t prefix) {
      ++calls;
      std::fill(hist.begin(), hist.end(), 0);
      for (key_t k : keys) {
        if ((k & D::prefix_mask(d)) == (prefix & D::prefix_mask(d))) ++hist[D::digit(k, d)];
      }
      return hist.data();
    };
    const auto rank = static_cast<int64_t>(1 + rng() % keys.size());
    calls = -1;  // digit 0's histogram is the caller's
    const RadixStep<key_t> step = radix_descent<D>(histogram(0, 0), rank, histogram);
    const key_t want = sorted[rank - 1];
    const auto first = std::lower_bound(sorted.begin(), sorted.end(), want) - sorted.begin();
    const auto ties = std::upper_bound(sorted.begin(), sorted.end(), want) - sorted.begin() - first;
    EXPECT_TRUE(step.last);
    EXPECT_EQ(calls, D::kDigits - 1);
    EXPECT_EQ(step.prefix, want);
    EXPECT_EQ(step.rank, rank - first);
    EXPECT_EQ(step.count, ties);
    EXPECT_EQ(step.bin, D::digit(want, D::kDigits - 1));

    const RadixStep<key_t> first_digit = radix_descent<D>(
        histogram(0, 0), rank, histogram, [](int d, const RadixStep<key_t>&) { return d == 0; });
    EXPECT_EQ(first_digit.last, D::kDigits == 1);
    EXPECT_EQ(first_digit.prefix, static_cast<key_t>(want & D::prefix_mask(1)));
    EXPECT_EQ(first_digit.bin, D::digit(want, 0));
  }
}

TEST(RadixDescent, FindsTheRankThKeyItsRankAmongTiesAndTheirCount) {
  std::mt19937_64 rng(5);
  expect_descent_finds_the_rank_th_key<uint16_t, 16>(rng);
  expect_descent_finds_the_rank_th_key<uint32_t, 16>(rng);
  expect_descent_finds_the_rank_th_key<uint64_t, 16>(rng);
  expect_descent_finds_the_rank_th_key<uint16_t, kPassDigitBits>(rng);
  expect_descent_finds_the_rank_th_key<uint32_t, kPassDigitBits>(rng);
  expect_descent_finds_the_rank_th_key<uint64_t, kPassDigitBits>(rng);
}

TEST(RoundHalfEven, MatchesPythonRound) {
  // Expected values are Python's round(fraction * n).
  struct Case { double fraction; int64_t n; int64_t expected; };
  const Case cases[] = {
      {0.5, 5, 2},   {0.5, 3, 2},   {0.5, 1, 0},   {0.25, 2, 0},  {0.75, 2, 2},
      {0.45, 10, 4}, {0.35, 10, 4}, {0.15, 10, 2}, {0.5, 7, 4},   {0.4, 17, 7},
      {0.7, 5, 4},   {0.1, 25, 2},  {0.3, 5, 2},   {0.05, 10, 0}, {0.55, 10, 6},
      {0.65, 10, 6}, {0.85, 10, 8}, {0.95, 10, 10}, {0.125, 4, 0}, {0.375, 4, 2},
      {1.0 / 3, 3, 1}, {0.0, 0, 0}, {1.0, 0, 0},   {0.0, 7, 0},   {1.0, 7, 7},
      {0.2, 2147483653LL, 429496731LL},
      {1.0, 9007199254740993LL, 9007199254740992LL},
  };
  for (const Case& c : cases) {
    EXPECT_EQ(round_half_even(c.fraction, c.n), c.expected)
        << "round(" << c.fraction << " * " << c.n << ")";
  }
  // In the default rounding mode nearbyint rounds half to even too.
  std::mt19937_64 rng(5);
  for (int t = 0; t < 100000; ++t) {
    const int64_t n = static_cast<int64_t>(rng() % (t % 2 ? 64 : 100000000));
    const double fraction = t % 3 ? static_cast<double>(rng() % 41) / 40
                                  : std::uniform_real_distribution<double>()(rng);
    EXPECT_EQ(round_half_even(fraction, n),
              static_cast<int64_t>(std::nearbyint(fraction * static_cast<double>(n))))
        << fraction << " * " << n;
  }
}

TEST(TieQuota, SharesTheTiesInChunkOrder) {
  EXPECT_EQ(tie_quota(5, 0, 3), 3);
  EXPECT_EQ(tie_quota(5, 3, 3), 2);
  EXPECT_EQ(tie_quota(5, 5, 3), 0);
  EXPECT_EQ(tie_quota(5, 7, 3), 0);
  EXPECT_EQ(tie_quota(5, 2, 0), 0);
  EXPECT_EQ(tie_quota(0, 0, 4), 0);
  // Random chunkings: the quotas prune exactly the `need` first ties.
  std::mt19937_64 rng(9);
  for (int t = 0; t < 1000; ++t) {
    std::vector<int64_t> ties(1 + rng() % 8);
    for (int64_t& x : ties) x = static_cast<int64_t>(rng() % 5);
    const int64_t total = std::accumulate(ties.begin(), ties.end(), int64_t{0});
    const int64_t need = static_cast<int64_t>(rng() % (total + 1));
    int64_t before = 0, pruned = 0;
    for (int64_t here : ties) {
      const int64_t q = tie_quota(need, before, here);
      EXPECT_EQ(q, std::clamp<int64_t>(need - before, 0, here));
      before += here;
      pruned += q;
    }
    EXPECT_EQ(pruned, need);
  }
}

template <typename T>
void expect_keep_or_zero(T v) {
  const T kept = keep_or_zero(v, true);
  const T pruned = keep_or_zero(v, false);
  const T zero = T(0);
  EXPECT_EQ(std::memcmp(&kept, &v, sizeof(T)), 0);
  EXPECT_EQ(std::memcmp(&pruned, &zero, sizeof(T)), 0);
}

TEST(KeepOrZero, KeepsTheBitsOrGivesAnExactPositiveZero) {
  for (double v : {1.0, -1.0, 0.5, -0.0, 0.0, 3e-310,
                   std::numeric_limits<double>::infinity(),
                   std::numeric_limits<double>::quiet_NaN()}) {
    expect_keep_or_zero<double>(v);
    expect_keep_or_zero<float>(static_cast<float>(v));
    expect_keep_or_zero<c10::Half>(c10::Half(static_cast<float>(v)));
    expect_keep_or_zero<c10::BFloat16>(c10::BFloat16(static_cast<float>(v)));
  }
  for (int64_t v : {int64_t{1}, int64_t{-1}, int64_t{7}, int64_t{0},
                    std::numeric_limits<int64_t>::min()}) {
    expect_keep_or_zero<int64_t>(v);
    expect_keep_or_zero<int32_t>(static_cast<int32_t>(v));
    expect_keep_or_zero<int16_t>(static_cast<int16_t>(v));
    expect_keep_or_zero<int8_t>(static_cast<int8_t>(v));
    expect_keep_or_zero<uint8_t>(static_cast<uint8_t>(v));
  }
  expect_keep_or_zero<bool>(true);
  expect_keep_or_zero<bool>(false);
}

// ---------------------------------------------------------------------------
// csrc/cpu/lanes.h
// ---------------------------------------------------------------------------

template <typename T>
void expect_lane_bytes() {
  for (uint32_t byte = 0; byte < 256; ++byte) {
    const Lanes<T> m = lanes_of<T>(byte);
    for (int j = 0; j < 8; ++j) {
      EXPECT_EQ(m[j], ((byte >> j) & 1) ? static_cast<T>(~T{0}) : T{0}) << "byte " << byte << " lane " << j;
    }
    EXPECT_EQ(fastprune::bits_of<T>(m), byte);  // (this file has a bits_of of its own)
  }
}

TEST(Lanes, BytesAndLaneMasksRoundTrip) {
  expect_lane_bytes<uint8_t>();
  expect_lane_bytes<int16_t>();
  expect_lane_bytes<uint16_t>();
  expect_lane_bytes<int32_t>();
  expect_lane_bytes<uint32_t>();
  expect_lane_bytes<int64_t>();
  expect_lane_bytes<uint64_t>();
}

// Random bit patterns: every sign, zeros, subnormals, infinities, NaN payloads.
template <typename T>
void expect_magnitude_keys(std::mt19937_64& rng) {
  for (int round = 0; round < 2000; ++round) {
    Key<T> raw[8];
    for (Key<T>& r : raw) r = static_cast<Key<T>>(rng());
    if (round == 0) raw[0] = 0, raw[1] = sign_bit<T>(), raw[2] = KeyOf<T>::kInf;
    T s[8];
    std::memcpy(s, raw, sizeof(s));
    for (bool largest : {false, true}) {
      const auto keys = magnitude_keys(s, largest);
      for (int j = 0; j < 8; ++j) {
        EXPECT_EQ(static_cast<Key<T>>(keys[j]), magnitude_key(s[j], largest)) << "bits " << raw[j];
      }
    }
  }
}

TEST(Lanes, MagnitudeKeysAreMagnitudeKeyPerLane) {
  std::mt19937_64 rng(11);
  expect_magnitude_keys<c10::Half>(rng);
  expect_magnitude_keys<c10::BFloat16>(rng);
  expect_magnitude_keys<float>(rng);
  expect_magnitude_keys<double>(rng);
}

// ---------------------------------------------------------------------------
// fastprune::unstructured_mask through the dispatcher
// ---------------------------------------------------------------------------

at::Tensor unstructured_mask(
    const at::Tensor& scores, const at::Tensor& mask, int64_t count,
    double fraction, bool only_ones, bool largest) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastprune::unstructured_mask", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, double,
                            bool, bool)>();
  return op.call(scores, mask, count, fraction, only_ones, largest);
}

std::vector<at::Tensor> global_unstructured_masks(
    at::TensorList scores, at::TensorList masks, int64_t count, double fraction,
    bool only_ones, bool largest) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastprune::global_unstructured_masks", "")
          .typed<std::vector<at::Tensor>(at::TensorList, at::TensorList, int64_t,
                                         double, bool, bool)>();
  return op.call(scores, masks, count, fraction, only_ones, largest);
}

// The candidates in the order the contract prunes them: by |score| (NaN above
// +inf; reversed when `largest`), equal magnitudes in increasing flat index.
std::vector<int64_t> reference_order(
    const at::Tensor& scores, const at::Tensor& mask, bool only_ones, bool largest) {
  const at::Tensor s = scores.to(at::kDouble).contiguous();  // exact for all four
  const at::Tensor m = mask.to(at::kDouble).contiguous();
  const double* sp = s.const_data_ptr<double>();
  const double* mp = m.const_data_ptr<double>();
  std::vector<int64_t> order;
  for (int64_t i = 0; i < s.numel(); ++i) {
    if (!only_ones || mp[i] == 1.0) order.push_back(i);
  }
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    const double x = sp[a], y = sp[b];
    const bool xn = std::isnan(x), yn = std::isnan(y);
    if (xn || yn) return largest ? (xn && !yn) : (yn && !xn);
    return largest ? std::fabs(x) > std::fabs(y) : std::fabs(x) < std::fabs(y);
  });
  return order;
}

// The masks with the first k of `order` set to 0; positions in `order` count
// through the masks as if they were flattened and concatenated.
std::vector<at::Tensor> reference_masks(
    at::TensorList masks, const std::vector<int64_t>& order, int64_t k) {
  int64_t total = 0;
  for (const at::Tensor& m : masks) total += m.numel();
  at::Tensor prune = at::zeros({total}, at::kBool);
  bool* p = prune.mutable_data_ptr<bool>();
  for (int64_t j = 0; j < k; ++j) p[order[j]] = true;
  std::vector<at::Tensor> out;
  int64_t begin = 0;
  for (const at::Tensor& m : masks) {
    const at::Tensor here = prune.slice(0, begin, begin + m.numel());
    out.push_back(m.contiguous().clone().view({-1}).masked_fill_(here, 0).view(m.sizes()));
    begin += m.numel();
  }
  return out;
}

at::Tensor reference_mask(const at::Tensor& mask, const std::vector<int64_t>& order, int64_t k) {
  return reference_masks({mask}, order, k)[0];
}

// All tensors flattened and concatenated, as float64.
at::Tensor flat_cat(at::TensorList ts) {
  std::vector<at::Tensor> flat;
  for (const at::Tensor& t : ts) flat.push_back(t.to(at::kDouble).reshape({-1}));
  return flat.empty() ? at::empty({0}, at::kDouble) : at::cat(flat);
}

// Bitwise equality (NaN and -0.0 in kept mask entries must survive as they are).
void expect_same_bits(const at::Tensor& out, const at::Tensor& expected) {
  ASSERT_EQ(out.scalar_type(), expected.scalar_type());
  ASSERT_EQ(out.sizes(), expected.sizes());
  const at::Tensor a = out.contiguous(), b = expected.contiguous();
  const auto* pa = static_cast<const char*>(a.const_data_ptr());
  const auto* pb = static_cast<const char*>(b.const_data_ptr());
  const int64_t size = a.element_size();
  int64_t wrong = 0, first = -1;
  for (int64_t i = 0; i < a.numel(); ++i) {
    if (std::memcmp(pa + i * size, pb + i * size, size) != 0) {
      if (wrong++ == 0) first = i;
    }
  }
  EXPECT_EQ(wrong, 0) << "entries differ; the first at flat index " << first << ": got "
                      << (first >= 0 ? a.view({-1})[first].item<double>() : 0.0)
                      << ", expected "
                      << (first >= 0 ? b.view({-1})[first].item<double>() : 0.0);
}

enum class Dist { kNormal, kUniform, kDuplicates, kAllEqual, kAllNan, kZeros, kInfNan,
                  kDenormal, kUlpCluster, kWideRange };
const Dist kDists[] = {Dist::kNormal, Dist::kUniform, Dist::kDuplicates, Dist::kAllEqual,
                       Dist::kAllNan, Dist::kZeros, Dist::kInfNan, Dist::kDenormal,
                       Dist::kUlpCluster, Dist::kWideRange};
const char* name(Dist d) {
  const char* names[] = {"normal", "uniform", "duplicates", "all-equal", "all-nan",
                         "+-0", "inf-nan", "denormal", "ulp-cluster", "wide-range"};
  return names[static_cast<int>(d)];
}
const at::ScalarType kScoreTypes[] = {at::kHalf, at::kBFloat16, at::kFloat, at::kDouble};
const at::ScalarType kMaskTypes[] = {at::kFloat, at::kBool, at::kLong};

// Random scores of `dtype`, drawn as doubles and rounded once to dtype.
at::Tensor make_scores(Dist dist, int64_t n, at::ScalarType dtype, std::mt19937_64& rng) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  double denorm = 0, eps = 0;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "make_scores", [&] {
    denorm = static_cast<double>(std::numeric_limits<scalar_t>::denorm_min());
    eps = static_cast<double>(std::numeric_limits<scalar_t>::epsilon());
  });
  std::normal_distribution<double> normal;
  std::uniform_real_distribution<double> uniform(-1, 1);
  auto pick = [&](int64_t m) { return static_cast<int64_t>(rng() % m); };
  auto sign = [&] { return rng() % 2 ? 1.0 : -1.0; };
  const double constant = normal(rng);
  std::vector<double> v(n);
  for (double& x : v) {
    switch (dist) {
      case Dist::kNormal: x = normal(rng); break;
      case Dist::kUniform: x = uniform(rng); break;
      case Dist::kDuplicates: x = static_cast<double>(pick(17) - 8); break;
      case Dist::kAllEqual: x = constant; break;
      case Dist::kAllNan: x = sign() * nan; break;
      case Dist::kZeros: x = sign() * 0.0; break;
      case Dist::kInfNan: {
        const int64_t r = pick(10);
        x = r == 0 ? sign() * inf : r == 1 ? sign() * nan : r == 2 ? sign() * 0.0 : normal(rng);
        break;
      }
      case Dist::kDenormal: x = sign() * denorm * static_cast<double>(pick(100)); break;
      case Dist::kUlpCluster: x = sign() * (1 + eps * static_cast<double>(pick(1000))); break;
      case Dist::kWideRange: x = sign() * std::exp(normal(rng) * 20); break;
    }
  }
  at::Tensor scores = at::from_blob(v.data(), {n}, at::kDouble).to(dtype, false, /*copy=*/true);
  // Converted NaNs can differ in payload (double to bfloat16 gives 0x7fc0 or
  // 0x7fff, by code path): keep each sign but use one payload, so that only
  // the NanPayloadsTie tests depend on how payloads rank.
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "make_scores", [&] {
    const scalar_t nan = std::numeric_limits<scalar_t>::quiet_NaN();
    scalar_t* p = scores.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < n; ++i) {
      if (std::isnan(static_cast<double>(p[i]))) {
        p[i] = (bits_of(p[i]) & sign_bit<scalar_t>()) ? negate(nan) : nan;
      }
    }
  });
  return scores;
}

// A random mask of `dtype`: ones, zeros, and (if `others`) other values.
at::Tensor make_mask(int64_t n, at::ScalarType dtype, bool others, std::mt19937_64& rng) {
  std::vector<double> pool = {1, 1, 1, 0};
  if (others && dtype == at::kFloat) {
    pool.insert(pool.end(), {0.5, -1, 2, -0.0, std::numeric_limits<double>::quiet_NaN()});
  } else if (others && dtype == at::kLong) {
    pool.insert(pool.end(), {2, -1, 7});
  }
  std::vector<double> v(n);
  for (double& x : v) x = pool[rng() % pool.size()];
  return at::from_blob(v.data(), {n}, at::kDouble).to(dtype, false, /*copy=*/true);
}

struct Case {
  at::Tensor scores, mask;
  bool only_ones = false, largest = false;
  std::string describe() const {
    std::ostringstream os;
    os << "scores " << scores.scalar_type() << scores.sizes() << " mask "
       << mask.scalar_type() << " only_ones " << only_ones << " largest " << largest;
    return os.str();
  }
};

// Python's round(fraction * n): in the default rounding mode nearbyint
// rounds half to even.
int64_t python_round(double fraction, int64_t n) {
  return static_cast<int64_t>(std::nearbyint(fraction * static_cast<double>(n)));
}

int64_t candidates(at::TensorList masks, bool only_ones) {
  const at::Tensor flat = flat_cat(masks);
  return only_ones ? (flat == 1).sum().item<int64_t>() : flat.numel();
}

// Checks k = count for each count, and k = round(fraction * candidates) for
// each fraction, against the reference.
void check(const Case& c, const std::vector<int64_t>& counts,
           const std::vector<double>& fractions) {
  SCOPED_TRACE(c.describe());
  const std::vector<int64_t> order = reference_order(c.scores, c.mask, c.only_ones, c.largest);
  const auto n = static_cast<int64_t>(order.size());
  for (int64_t count : counts) {
    SCOPED_TRACE("count " + std::to_string(count) + " of " + std::to_string(n));
    const at::Tensor out =
        unstructured_mask(c.scores, c.mask, count, 0.0, c.only_ones, c.largest);
    expect_same_bits(out, reference_mask(c.mask, order, count));
  }
  for (double fraction : fractions) {
    SCOPED_TRACE("fraction " + std::to_string(fraction) + " of " + std::to_string(n));
    const at::Tensor out =
        unstructured_mask(c.scores, c.mask, -1, fraction, c.only_ones, c.largest);
    expect_same_bits(out, reference_mask(c.mask, order, python_round(fraction, n)));
  }
}

// Restores the intra-op thread count on scope exit.
struct ThreadsGuard {
  int saved = at::get_num_threads();
  ~ThreadsGuard() { at::set_num_threads(saved); }
};

TEST(UnstructuredMask, EveryCountOnTinyInputs) {
  std::mt19937_64 rng(1);
  for (at::ScalarType dtype : kScoreTypes) {
    for (Dist dist : kDists) {
      SCOPED_TRACE(name(dist));
      for (int64_t size : {1, 2, 3, 6, 13}) {
        for (int flags = 0; flags < 4; ++flags) {
          Case c{make_scores(dist, size, dtype, rng),
                 make_mask(size, kMaskTypes[(size + flags) % 3], true, rng),
                 (flags & 1) != 0, (flags & 2) != 0};
          std::vector<int64_t> counts(candidates({c.mask}, c.only_ones) + 1);
          std::iota(counts.begin(), counts.end(), 0);
          check(c, counts, {0.5});
        }
      }
    }
  }
}

TEST(UnstructuredMask, RandomMediumInputs) {
  // Sizes on both sides of the kernel's single-chunk limit (2^15) and of its
  // histogram bin count (2^16).
  const int64_t sizes[] = {0, 1, 100, 1000, 32767, 32768, 40000, 70001};
  std::mt19937_64 rng(2);
  int round = 0;
  for (at::ScalarType dtype : kScoreTypes) {
    for (Dist dist : kDists) {
      SCOPED_TRACE(name(dist));
      for (int flags = 0; flags < 4; ++flags, ++round) {
        const int64_t size = sizes[round % 8];
        Case c{make_scores(dist, size, dtype, rng),
               make_mask(size, kMaskTypes[round % 3], round % 2 == 0, rng),
               (flags & 1) != 0, (flags & 2) != 0};
        const int64_t n = candidates({c.mask}, c.only_ones);
        check(c, {0, n, n / 2, static_cast<int64_t>(rng() % (n + 1))},
              {std::uniform_real_distribution<double>()(rng)});
      }
    }
  }
}

TEST(UnstructuredMask, LargeInputsAnyThreadCount) {
  // > 1e6 entries: every thread takes a chunk, and the threshold ties of the
  // duplicate-heavy inputs span chunks.
  const int64_t size = (int64_t{1} << 20) + 12345;
  const Dist dists[] = {Dist::kNormal, Dist::kDuplicates, Dist::kUlpCluster,
                        Dist::kAllEqual, Dist::kInfNan, Dist::kDenormal};
  ThreadsGuard guard;
  std::mt19937_64 rng(3);
  int round = 0;
  for (at::ScalarType dtype : kScoreTypes) {
    for (Dist dist : dists) {
      SCOPED_TRACE(name(dist));
      ++round;
      Case c{make_scores(dist, size, dtype, rng),
             make_mask(size, kMaskTypes[round % 3], round % 2 == 0, rng),
             round % 2 == 1, round % 4 >= 2};
      const std::vector<int64_t> order = reference_order(c.scores, c.mask, c.only_ones, c.largest);
      const auto n = static_cast<int64_t>(order.size());
      const int64_t k = static_cast<int64_t>(rng() % (n + 1));
      const at::Tensor expected = reference_mask(c.mask, order, k);
      for (int threads : {1, 2, 3, 7}) {
        SCOPED_TRACE(c.describe() + ", " + std::to_string(threads) + " threads, k " +
                     std::to_string(k));
        at::set_num_threads(threads);
        expect_same_bits(unstructured_mask(c.scores, c.mask, k, 0.0, c.only_ones, c.largest),
                         expected);
      }
    }
  }
}

TEST(UnstructuredMask, LargeBracketsAreNarrowedExactly) {
  // 2^23 entries: the one-pass select's bracket holds > 2^16 entries, which
  // are narrowed by a histogram of their keys before the final select.
  const int64_t size = (int64_t{1} << 23) + 7;
  ThreadsGuard guard;
  at::set_num_threads(2);
  std::mt19937_64 rng(9);
  for (at::ScalarType dtype : {at::kFloat, at::kDouble, at::kHalf}) {
    const at::Tensor scores = make_scores(Dist::kNormal, size, dtype, rng);
    const at::Tensor mask = make_mask(size, at::kFloat, true, rng);
    for (bool only_ones : {false, true}) {
      const std::vector<int64_t> order = reference_order(scores, mask, only_ones, false);
      const auto n = static_cast<int64_t>(order.size());
      for (int64_t k : {n / 2, static_cast<int64_t>(rng() % (n + 1))}) {
        SCOPED_TRACE(std::string(c10::toString(dtype)) + (only_ones ? " only ones" : "") +
                     ", k " + std::to_string(k));
        expect_same_bits(unstructured_mask(scores, mask, k, 0.0, only_ones, false),
                         reference_mask(mask, order, k));
      }
    }
  }
}

TEST(UnstructuredMask, ExactWhenTheSampleMisleads) {
  // The one-pass select brackets the threshold from an evenly spaced sample.
  // Here every entry a sample could hit (one per 8 or more, wherever it
  // starts) is far above all the others, so the bracket misses; and with ties
  // at the threshold it overflows. Either way the exact passes must take over.
  const int64_t size = int64_t{1} << 20;
  ThreadsGuard guard;
  std::mt19937_64 rng(8);
  for (at::ScalarType dtype : kScoreTypes) {
    for (bool ties : {false, true}) {
      at::Tensor scores = make_scores(Dist::kUniform, size, at::kDouble, rng).abs_();
      if (ties) scores.masked_fill_(scores < 0.7, 0.25);
      scores.view({-1, 8}).select(1, 0).add_(1000.0);
      scores.view({-1, 8}).select(1, 4).add_(1000.0);
      scores = scores.to(dtype);
      const at::Tensor mask = at::ones({size}, at::kFloat);
      const std::vector<int64_t> order = reference_order(scores, mask, false, false);
      for (int64_t k : {size / 3, size / 2, size - 5}) {
        for (int threads : {1, 2}) {
          SCOPED_TRACE(std::string(c10::toString(dtype)) + (ties ? " ties" : "") + ", k " +
                       std::to_string(k) + ", " + std::to_string(threads) + " threads");
          at::set_num_threads(threads);
          expect_same_bits(unstructured_mask(scores, mask, k, 0.0, false, false),
                           reference_mask(mask, order, k));
        }
      }
    }
  }
}

TEST(UnstructuredMask, LayoutsAndShapes) {
  std::mt19937_64 rng(4);
  const at::Tensor scores = make_scores(Dist::kDuplicates, 6 * 50, at::kFloat, rng);
  const at::Tensor mask = make_mask(6 * 50, at::kFloat, true, rng);
  // Transposed scores and mask: flat order is the logical row-major order.
  Case t{scores.view({6, 50}).t(), mask.view({6, 50}).t(), true, false};
  check(t, {0, 7, candidates({t.mask}, t.only_ones)}, {0.3});
  const at::Tensor out = unstructured_mask(t.scores, t.mask, 7, 0.0, true, false);
  EXPECT_EQ(out.strides(), t.mask.strides());  // the mask's memory format
  // channels_last mask.
  const at::Tensor cl = mask.view({2, 3, 5, 10}).contiguous(at::MemoryFormat::ChannelsLast);
  Case l{scores.view({2, 3, 5, 10}), cl, false, true};
  check(l, {0, 100, 300}, {});
  EXPECT_EQ(unstructured_mask(l.scores, l.mask, 3, 0.0, false, true).strides(), cl.strides());
  // A broadcast mask (expand of one value) follows the scores' format.
  Case b{scores.view({6, 50}).t(), at::ones({}, at::kBool).expand({50, 6}), true, false};
  check(b, {0, 1, 299, 300}, {0.5});
  EXPECT_EQ(unstructured_mask(b.scores, b.mask, 1, 0.0, true, false).strides(),
            b.scores.strides());
  // 0-dim and empty tensors.
  check(Case{at::full({}, -2.0), at::ones({}), false, false}, {0, 1}, {0.5, 1.0});
  for (auto sizes : {std::vector<int64_t>{0}, std::vector<int64_t>{3, 0, 2}}) {
    const at::Tensor e = unstructured_mask(at::empty(sizes), at::ones(sizes, at::kLong), 0,
                                           0.0, false, false);
    EXPECT_EQ(e.sizes(), at::IntArrayRef(sizes));
    EXPECT_EQ(e.scalar_type(), at::kLong);
  }
}

TEST(UnstructuredMask, ReturnsAFreshTensor) {
  const at::Tensor mask = at::ones({10});
  for (int64_t count : {0, 3}) {
    const at::Tensor out = unstructured_mask(at::randn({10}), mask, count, 0.0, false, false);
    EXPECT_NE(out.data_ptr(), mask.data_ptr());
  }
  EXPECT_TRUE(at::equal(mask, at::ones({10})));  // the input is untouched
}

// The contract's NaN is one value above +inf: NaNs of different payloads tie
// and go by flat index.
TEST(UnstructuredMask, NanPayloadsTie) {
  auto scores_of = [](auto values) {
    using T = typename decltype(values)::value_type;
    values.insert(values.begin() + 3, {T(1), std::numeric_limits<T>::infinity(), T(-0.5)});
    return at::from_blob(values.data(), {static_cast<int64_t>(values.size())},
                         c10::CppTypeToScalarType<T>::value).clone();
  };
  for (const at::Tensor& scores :
       {scores_of(nans_of_all_payloads<float>()), scores_of(nans_of_all_payloads<double>()),
        scores_of(nans_of_all_payloads<c10::Half>()),
        scores_of(nans_of_all_payloads<c10::BFloat16>())}) {
    for (bool largest : {false, true}) {
      Case c{scores, at::ones(scores.sizes(), at::kFloat), false, largest};
      std::vector<int64_t> counts(scores.numel() + 1);
      std::iota(counts.begin(), counts.end(), 0);
      check(c, counts, {});
    }
  }
}

TEST(UnstructuredMask, RejectsBadArguments) {
  const at::Tensor s = at::randn({4, 5});
  const at::Tensor m = at::ones({4, 5});
  EXPECT_THROW(unstructured_mask(s, m, 21, 0.0, false, false), c10::ValueError);
  const at::Tensor holed = at::ones({4, 5}).index_put_({0, 0}, 0);  // 19 candidates
  EXPECT_THROW(unstructured_mask(s, holed, 20, 0.0, true, false), c10::ValueError);
  EXPECT_THROW(unstructured_mask(s, at::ones({5, 4}), 1, 0.0, false, false), c10::Error);
  EXPECT_THROW(unstructured_mask(s.to(at::kLong), m, 1, 0.0, false, false), c10::Error);
  EXPECT_THROW(unstructured_mask(s, m, -1, 1.5, false, false), c10::Error);
  EXPECT_THROW(unstructured_mask(s, m, -1, -0.1, false, false), c10::Error);
  EXPECT_THROW(unstructured_mask(s, m, -1, std::nan(""), false, false), c10::Error);
}

// A random list of tensors for the global select: sizes from empty to
// `max_size`, one score dtype, a random mask dtype each.
struct GlobalCase {
  std::vector<at::Tensor> scores, masks;
  bool only_ones = false, largest = false;
};

GlobalCase make_global_case(Dist dist, at::ScalarType dtype, int tensors, int64_t max_size,
                            bool others, std::mt19937_64& rng) {
  GlobalCase g;
  for (int t = 0; t < tensors; ++t) {
    const int64_t r = static_cast<int64_t>(rng() % 8);
    const int64_t size = r == 0 ? 0 : r == 1 ? 1 : 1 + static_cast<int64_t>(rng() % max_size);
    g.scores.push_back(make_scores(dist, size, dtype, rng).view({1, size}));
    g.masks.push_back(make_mask(size, kMaskTypes[rng() % 3], others, rng).view({1, size}));
  }
  return g;
}

// Checks each count and fraction, under each intra-op thread count (0: as
// set), against one reference.
void check_global(const GlobalCase& g, const std::vector<int64_t>& counts,
                  const std::vector<double>& fractions,
                  const std::vector<int>& threads = {0}) {
  std::ostringstream os;
  os << g.scores.size() << " " << g.scores[0].scalar_type() << " tensors of sizes";
  for (size_t i = 0; i < g.scores.size(); ++i) {
    os << " " << g.scores[i].numel() << ":" << g.masks[i].scalar_type();
  }
  os << " only_ones " << g.only_ones << " largest " << g.largest;
  SCOPED_TRACE(os.str());
  const std::vector<int64_t> order =
      reference_order(flat_cat(g.scores), flat_cat(g.masks), g.only_ones, g.largest);
  const auto n = static_cast<int64_t>(order.size());
  std::vector<std::pair<int64_t, double>> amounts;  // (count, fraction)
  for (int64_t count : counts) amounts.emplace_back(count, 0.0);
  for (double fraction : fractions) amounts.emplace_back(-1, fraction);
  for (const auto& [count, fraction] : amounts) {
    const int64_t k = count >= 0 ? count : python_round(fraction, n);
    const std::vector<at::Tensor> expected = reference_masks(g.masks, order, k);
    for (int t : threads) {
      if (t > 0) at::set_num_threads(t);
      SCOPED_TRACE("k " + std::to_string(k) + " of " + std::to_string(n) + ", threads " +
                   std::to_string(at::get_num_threads()));
      const std::vector<at::Tensor> outs =
          global_unstructured_masks(g.scores, g.masks, count, fraction, g.only_ones, g.largest);
      ASSERT_EQ(outs.size(), expected.size());
      for (size_t i = 0; i < outs.size(); ++i) {
        SCOPED_TRACE("tensor #" + std::to_string(i));
        expect_same_bits(outs[i], expected[i]);
      }
    }
  }
}

TEST(GlobalUnstructuredMasks, RanksTheTensorsAsOneConcatenation) {
  std::mt19937_64 rng(5);
  int round = 0;
  for (at::ScalarType dtype : kScoreTypes) {
    for (Dist dist : kDists) {
      SCOPED_TRACE(name(dist));
      for (int flags = 0; flags < 4; ++flags, ++round) {
        GlobalCase g = make_global_case(dist, dtype, 1 + round % 5, round % 3 ? 20 : 30000,
                                        round % 2 == 0, rng);
        g.only_ones = (flags & 1) != 0;
        g.largest = (flags & 2) != 0;
        const int64_t n = candidates(g.masks, g.only_ones);
        check_global(g, {0, n, static_cast<int64_t>(rng() % (n + 1))}, {0.5});
      }
    }
  }
}

TEST(GlobalUnstructuredMasks, LargeInputsAnyThreadCount) {
  // ~1.5e6 entries over a few tensors: the threads' chunks straddle tensor
  // boundaries, and the ties of duplicate-heavy inputs span tensors.
  ThreadsGuard guard;
  std::mt19937_64 rng(6);
  int round = 0;
  for (at::ScalarType dtype : {at::kFloat, at::kHalf}) {
    for (Dist dist : {Dist::kDuplicates, Dist::kNormal, Dist::kUlpCluster}) {
      ++round;
      GlobalCase g = make_global_case(dist, dtype, 5, 600000, round % 2 == 0, rng);
      g.only_ones = round % 2 == 1;
      g.largest = round % 3 == 0;
      SCOPED_TRACE(name(dist));
      check_global(g, {}, {0.3}, {1, 2, 3});
    }
  }
}

TEST(GlobalUnstructuredMasks, RejectsBadArguments) {
  const at::Tensor s = at::randn({4});
  const at::Tensor m = at::ones({4});
  EXPECT_THROW(global_unstructured_masks({s, s}, {m}, 1, 0.0, false, false), c10::Error);
  EXPECT_THROW(global_unstructured_masks({s, s.to(at::kDouble)}, {m, m}, 1, 0.0, false, false),
               c10::Error);
  EXPECT_THROW(global_unstructured_masks({s, s}, {m, m}, 9, 0.0, false, false),
               c10::ValueError);
}

// ---------------------------------------------------------------------------
// Randomized cases against the sorted reference
// ---------------------------------------------------------------------------

// Rounds of the fuzz test: FASTPRUNE_CPP_FUZZ_ROUNDS, default 200 (a long run
// sets thousands). Each round draws its own seed, printed on failure, so a
// failing round can be replayed with FASTPRUNE_CPP_FUZZ_SEED.
int64_t fuzz_rounds() {
  const char* env = std::getenv("FASTPRUNE_CPP_FUZZ_ROUNDS");
  return env ? std::atoll(env) : 200;
}

// Scores mixing every distribution entry by entry (NaN, inf, zeros, denormals
// and duplicates side by side), or one distribution throughout.
at::Tensor fuzz_scores(int64_t n, at::ScalarType dtype, std::mt19937_64& rng) {
  if (rng() % 3 != 0) return make_scores(kDists[rng() % std::size(kDists)], n, dtype, rng);
  std::vector<int64_t> which(n);
  for (int64_t& w : which) w = static_cast<int64_t>(rng() % std::size(kDists));
  const at::Tensor pick = at::from_blob(which.data(), {n}, at::kLong).clone();
  at::Tensor out = at::empty({n}, dtype);
  for (size_t d = 0; d < std::size(kDists); ++d) {
    const at::Tensor here = pick == static_cast<int64_t>(d);
    out.masked_scatter_(here, make_scores(kDists[d], n, dtype, rng).masked_select(here));
  }
  return out;
}

// `flat` (n entries) viewed with a random layout whose logical row-major
// order is `flat`'s: contiguous, transposed, channels_last or a strided slice.
at::Tensor fuzz_layout(const at::Tensor& flat, int layout) {
  const int64_t n = flat.numel();
  switch (layout) {
    case 1:  // transposed storage: logical (2, n/2) from a (n/2, 2) buffer
      if (n % 2 == 0) return flat.view({2, n / 2}).t().contiguous().t();
      break;
    case 2:  // channels_last 4-D
      if (n % 4 == 0) {
        return flat.view({1, 2, 2, n / 4}).contiguous(at::MemoryFormat::ChannelsLast);
      }
      break;
    case 3: {  // every other entry of a buffer twice the size
      at::Tensor wide = at::empty({n, 2}, flat.options());
      wide.select(1, 0).copy_(flat);
      return wide.select(1, 0);
    }
    default:
      break;
  }
  return flat;
}

TEST(Fuzz, RandomCasesMatchTheSortedReference) {
  const char* replay = std::getenv("FASTPRUNE_CPP_FUZZ_SEED");
  const int64_t rounds = replay ? 1 : fuzz_rounds();
  std::mt19937_64 seeds(7);
  ThreadsGuard guard;
  for (int64_t round = 0; round < rounds; ++round) {
    const uint64_t seed = replay ? std::strtoull(replay, nullptr, 10) : seeds();
    SCOPED_TRACE("FASTPRUNE_CPP_FUZZ_SEED=" + std::to_string(seed));
    std::mt19937_64 rng(seed);
    const at::ScalarType dtype = kScoreTypes[rng() % 4];
    const int tensors = 1 + static_cast<int>(rng() % 4);
    // Sizes log-uniform up to 2^17: both sides of the small-input path, the
    // histogram bin count and the single-chunk limit.
    GlobalCase g;
    for (int t = 0; t < tensors; ++t) {
      const int64_t size = static_cast<int64_t>(std::exp2(
          std::uniform_real_distribution<double>(0, 17)(rng))) - 1;
      const int layout = static_cast<int>(rng() % 4);
      g.scores.push_back(fuzz_layout(fuzz_scores(size, dtype, rng), layout));
      g.masks.push_back(
          fuzz_layout(make_mask(size, kMaskTypes[rng() % 3], rng() % 2 == 0, rng), layout));
    }
    g.only_ones = rng() % 2 == 0;
    g.largest = rng() % 2 == 0;
    at::set_num_threads(1 + static_cast<int>(rng() % 3));
    const int64_t n = candidates(g.masks, g.only_ones);
    const int64_t k = std::vector<int64_t>{0, n, n / 2, static_cast<int64_t>(rng() % (n + 1)),
                                           std::max<int64_t>(n - 1, 0)}[rng() % 5];
    const double fraction = std::uniform_real_distribution<double>()(rng);
    if (tensors > 1 || rng() % 2 == 0) {
      check_global(g, {k}, {fraction});
    } else {
      check(Case{g.scores[0], g.masks[0], g.only_ones, g.largest}, {k}, {fraction});
    }
    if (::testing::Test::HasFailure()) return;  // one failing seed is enough to replay
  }
}

// ---------------------------------------------------------------------------
// csrc/common/segments.h, and fastprune::segmented_mask through the dispatcher
// ---------------------------------------------------------------------------

TEST(SegmentPruneCount, KeepsAtMostCountOrPrunesExactly) {
  EXPECT_EQ(segment_prune_count(4, 2, 0.0, true), 2);  // 2:4 on a full group
  EXPECT_EQ(segment_prune_count(3, 2, 0.0, true), 1);
  EXPECT_EQ(segment_prune_count(2, 2, 0.0, true), 0);
  EXPECT_EQ(segment_prune_count(1, 2, 0.0, true), 0);  // never negative
  EXPECT_EQ(segment_prune_count(5, 3, 0.9, false), 3);  // an exact count ignores fraction
  EXPECT_EQ(segment_prune_count(5, 7, 0.0, false), 7);  // above live: the caller's error
  EXPECT_EQ(segment_prune_count(5, -1, 0.5, false), 2);  // 2.5 -> 2
  EXPECT_EQ(segment_prune_count(7, -1, 0.5, false), 4);  // 3.5 -> 4
}

TEST(PrunedByRank, SmallestLiveKeysGoFirstTiesToTheLowerPosition) {
  const uint32_t keys[5] = {5, 3, 5, 3, 1};
  const uint32_t live[5] = {1, 1, 1, 0, 1};
  // Live, in prune order: (1, 4), (3, 1), (5, 0), (5, 2); position 3 is dead.
  const bool expected[5][5] = {
      {false, false, false, false, false},  // k = 0
      {false, false, false, false, true},
      {false, true, false, false, true},
      {true, true, false, false, true},
      {true, true, true, false, true}};
  for (int k = 0; k < 5; ++k) {
    for (int j = 0; j < 5; ++j) {
      EXPECT_EQ(pruned_by_rank(keys, live, 5, j, k), expected[k][j]) << "k=" << k << " j=" << j;
    }
  }
}

at::Tensor segmented_mask(
    const at::Tensor& scores, const at::Tensor& mask, int64_t dim, int64_t group,
    int64_t count, double fraction, bool keep) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fastprune::segmented_mask", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, int64_t,
                            double, bool)>();
  return op.call(scores, mask, dim, group, count, fraction, keep);
}

// The contract by brute force on a 2-D tensor: segments are rows (group 0,
// dim 0) or groups of `group` along dim 1; a stable sort of each segment's
// live entries by |score| (NaN last), the first k pruned.
at::Tensor reference_segmented(
    const at::Tensor& scores, const at::Tensor& mask, int64_t group, int64_t count,
    double fraction, bool keep) {
  const at::Tensor s = scores.to(at::kDouble).contiguous();
  at::Tensor out = mask.to(at::kDouble).contiguous().clone();
  const int64_t rows = s.size(0), cols = s.size(1), len = group == 0 ? cols : group;
  const double* sp = s.const_data_ptr<double>();
  double* op = out.mutable_data_ptr<double>();
  for (int64_t base = 0; base < rows * cols; base += len) {
    std::vector<int64_t> live;
    for (int64_t i = base; i < base + len; ++i) {
      if (op[i] == 1.0) live.push_back(i);
    }
    std::stable_sort(live.begin(), live.end(), [&](int64_t a, int64_t b) {
      const bool na = std::isnan(sp[a]), nb = std::isnan(sp[b]);
      if (na || nb) return !na && nb;
      return std::abs(sp[a]) < std::abs(sp[b]);
    });
    const auto n = static_cast<int64_t>(live.size());
    const int64_t k = segment_prune_count(n, count, fraction, keep);
    for (int64_t j = 0; j < k && j < n; ++j) op[live[j]] = 0.0;
  }
  return out.to(mask.scalar_type());
}

TEST(SegmentedMask, MatchesStableSortsOnTiesForGroupsAndRows) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> small(-3, 3), coin(0, 3);
  for (at::ScalarType type : {at::kFloat, at::kHalf, at::kBFloat16, at::kDouble}) {
    for (int64_t cols : {8, 40, 296}) {  // multiples of every group size below
      at::Tensor scores = at::empty({7, cols}, at::kDouble);
      at::Tensor mask = at::empty({7, cols}, at::kFloat);
      for (int64_t i = 0; i < scores.numel(); ++i) {
        scores.data_ptr<double>()[i] = small(rng) * 0.5;  // heavy ties, +-0
        mask.data_ptr<float>()[i] = coin(rng) == 0 ? 0.0f : 1.0f;
      }
      scores = scores.to(type);
      struct Case { int64_t group, count; double fraction; bool keep; };
      for (const Case c : {Case{4, 2, 0.0, true}, Case{8, 1, 0.0, true}, Case{0, -1, 0.5, false},
                           Case{0, 3, 0.0, false}, Case{0, -1, 1.0, false}}) {
        const at::Tensor out = segmented_mask(scores, mask, c.group == 0 ? 0 : 1, c.group, c.count,
                                              c.fraction, c.keep);
        // (group 0 along dim 0: the slices are the rows)
        const at::Tensor expected =
            reference_segmented(scores, mask, c.group, c.count, c.fraction, c.keep);
        EXPECT_TRUE(at::equal(out, expected))
            << "dtype " << type << " cols " << cols << " group " << c.group;
      }
    }
  }
}

TEST(SegmentedMask, CountAboveLiveIsAValueErrorNamingTheSegment) {
  at::Tensor mask = at::ones({3, 50});
  mask[1].narrow(0, 0, 10).zero_();
  try {
    segmented_mask(at::randn({3, 50}), mask, 0, 0, 45, 0.0, false);
    FAIL() << "expected a ValueError";
  } catch (const c10::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("cannot prune 45 entries of segment 1, which has 40 live"),
              std::string::npos)
        << e.what();
  }
}

}  // namespace
}  // namespace fastprune
