// The sampled bracket of the CPU selects (select_cpu.cpp, in_place_cpu.cpp):
// from the keys of the candidates among s entries sampled evenly over n, the
// keys [lo, hi) that hold the threshold (the k-th smallest candidate key)
// with a wide margin. A bet, not a proof: the caller counts what its pass
// finds below and inside, and takes its exact path when the bracket missed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace fastprune {

template <typename key_t>
struct KeyBracket {
  key_t lo;       // 0: no lower bound
  key_t hi;       // ~0 (no key has it): no upper bound; > lo
  int64_t ranks;  // sample ranks inside
};

// Half-width of the bracket, in standard deviations of the threshold's
// sample rank.
constexpr double kBracketZ = 5.0;

// The bracket for k = count or, when count < 0, k = round(fraction *
// candidates). `sample` (the candidates' sampled keys, m of them) is
// reordered.
template <typename key_t>
KeyBracket<key_t> sampled_bracket(std::vector<key_t>& sample, int64_t s, int64_t n, int64_t count,
                                  double fraction) {
  const auto m = static_cast<int64_t>(sample.size());
  const double q = static_cast<double>(m) / s;  // share of candidates
  const double p = std::clamp(count >= 0 ? count / (q * n) : fraction, 0.0, 1.0);
  // Rank spread: of the sample's quantile, and (a count, not a fraction) of
  // the candidate total estimated from the sample.
  double spread = std::sqrt(m * p * (1 - p));
  if (count >= 0) spread += m * p * std::sqrt((1 - q) / (q * s));
  const double rank = p * m, margin = kBracketZ * spread + 1;
  const auto lo_rank = static_cast<int64_t>(std::floor(rank - margin));
  const auto hi_rank = static_cast<int64_t>(std::ceil(rank + margin));
  KeyBracket<key_t> b{0, static_cast<key_t>(~key_t{0}), std::min(hi_rank, m) - std::max<int64_t>(lo_rank, 0) + 1};
  if (lo_rank > 0) {
    std::nth_element(sample.begin(), sample.begin() + lo_rank, sample.end());
    b.lo = sample[lo_rank];
  }
  if (hi_rank < m) {
    std::nth_element(sample.begin() + std::max<int64_t>(lo_rank, 0), sample.begin() + hi_rank, sample.end());
    b.hi = std::max<key_t>(sample[hi_rank], b.lo + 1);
  }
  return b;
}

}  // namespace fastprune
