// CPU kernels of the separable passes of the magnitude select: the steps of
// an exact radix select, exposed one by one so that a caller can combine
// them across processes (python/fastprune/_crossrank.py sums the histograms
// and tie counts of every rank). Digits of kPassDigitBits (csrc/common/
// select.h), as on CUDA, so every device counts the same bins. Also
// radix_step, the descent's arithmetic on a summed histogram (for every
// device: it reads 2048 counts on the host).
//
// No sampling, no shortcuts: each pass reads every entry once. Work is split
// into one fixed contiguous chunk per thread and tensor; the tie window is
// split across chunks by per-chunk tie counts (tie_quota), so the result does
// not depend on the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <type_traits>
#include <vector>

#include "../common/operand.h"
#include "../common/select.h"
#include "../common/select_operands.h"
#include "cache_cpu.h"

namespace fastprune {
namespace {

// Chunks of a tensor of n entries: one per thread, one for small tensors.
int64_t chunks_of(int64_t n) {
  return n < (int64_t{1} << 15) ? 1 : at::get_num_threads();
}

// Calls cut = f(i, cand, key) for entries [b, e) of `op`, the mask dtype
// dispatched once per call; when `op` has an output, writes the entry's new
// mask value there: the mask's, or 0 where f cut it (f cuts candidates only).
// A packed mask (op.packed_row > 0) is read, and its output written, a byte
// (8 entries of a row) at a time: [b, e) must start and end at byte bounds.
template <typename score_t, typename F>
void for_each_entry(const Operand& op, bool only_ones, bool largest, int64_t b, int64_t e, const F& f) {
  const auto* s = op.scores.const_data_ptr<score_t>();
  const bool broadcast = is_broadcast_scalar(op.mask);
  if (op.packed_row > 0) {
    const auto* m = op.mask.const_data_ptr<uint8_t>();
    auto* out = op.dst.defined() ? op.dst.mutable_data_ptr<uint8_t>() : nullptr;
    const int64_t n = op.packed_row, row_bytes = packed_row_bytes(n);
    int64_t row = b / n, col = b % n;
    uint32_t byte = 0;
    for (int64_t i = b; i < e; ++i) {
      const int64_t at = row * row_bytes + col / 8;
      const bool live = (m[broadcast ? 0 : at] >> (col % 8)) & 1;
      const bool cut = f(i, !only_ones || live, magnitude_key(s[i], largest));
      byte |= static_cast<uint32_t>(live & !cut) << (col % 8);
      if (col % 8 == 7 || col == n - 1) {
        if (out != nullptr) out[at] = static_cast<uint8_t>(byte);
        byte = 0;
      }
      if (++col == n) col = 0, ++row;
    }
    return;
  }
  AT_DISPATCH_ALL_TYPES_AND3(
      at::kHalf, at::kBFloat16, at::kBool, op.mask.scalar_type(), "fastprune_passes", [&] {
        const auto* m = static_cast<const scalar_t*>(op.mask.const_data_ptr());
        auto* out = op.dst.defined() ? static_cast<scalar_t*>(op.dst.mutable_data_ptr()) : nullptr;
        for (int64_t i = b; i < e; ++i) {
          const scalar_t v = m[broadcast ? 0 : i];
          const bool cut = f(i, !only_ones || v == scalar_t(1), magnitude_key(s[i], largest));
          if (out != nullptr) out[i] = keep_or_zero(v, !cut);
        }
      });
}

// The start of chunk c of C of an operand of n entries: n c / C, moved back
// to a byte bound of its row for a packed mask (one thread writes a byte).
int64_t chunk_start(const Operand& op, int64_t n, int64_t c, int64_t chunks) {
  const int64_t at = n * c / chunks;
  return op.packed_row > 0 ? at - at % op.packed_row % 8 : at;
}

// Calls f(op, chunk, begin, end) for every chunk of every non-empty operand,
// in parallel (see chunk_start).
template <typename F>
void for_each_chunk(const std::vector<Operand>& ops, const F& f) {
  // (chunks_of is read here: inside a parallel region the thread count is 1)
  struct Chunk { size_t op; int64_t chunk, begin, end; };
  std::vector<Chunk> work;
  for (size_t o = 0; o < ops.size(); ++o) {
    const int64_t n = ops[o].scores.numel(), chunks = chunks_of(n);
    if (n == 0) continue;
    for (int64_t c = 0; c < chunks; ++c) {
      work.push_back({o, c, chunk_start(ops[o], n, c, chunks), chunk_start(ops[o], n, c + 1, chunks)});
    }
  }
  at::parallel_for(0, static_cast<int64_t>(work.size()), 1, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) f(work[w].op, work[w].chunk, work[w].begin, work[w].end);
  });
}

// Per operand, per chunk: the candidates whose key is `thr`.
template <typename score_t>
std::vector<std::vector<int64_t>> chunk_ties(
    const std::vector<Operand>& ops, typename KeyOf<score_t>::type thr, bool only_ones,
    bool largest) {
  std::vector<std::vector<int64_t>> ties(ops.size());
  for (size_t o = 0; o < ops.size(); ++o) ties[o].assign(chunks_of(ops[o].scores.numel()), 0);
  for_each_chunk(ops, [&](size_t o, int64_t c, int64_t b, int64_t e) {
    int64_t n = 0;
    for_each_entry<score_t>(ops[o], only_ones, largest, b, e,
                            [&](int64_t, bool cand, auto key) { n += cand & (key == thr); return false; });
    ties[o][c] = n;
  });
  return ties;
}

at::Tensor radix_histogram_cpu(
    at::TensorList scores, at::TensorList masks, int64_t digit, int64_t prefix,
    bool only_ones, bool largest) {
  const std::vector<Operand> ops = make_pass_operands("radix_histogram", scores, masks, false);
  check_operands(ops, 0.0);
  constexpr int64_t kBins = int64_t{1} << kPassDigitBits;
  at::Tensor hist = at::zeros({kBins}, at::kLong);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, ops[0].scores.scalar_type(), "radix_histogram", [&] {
        using key_t = typename KeyOf<scalar_t>::type;
        using Digits = Radix<key_t, kPassDigitBits>;
        check_pass_digit("radix_histogram", digit, Digits::kDigits);
        const key_t pmask = Digits::prefix_mask(static_cast<int>(digit));
        const key_t pre = pass_key<key_t>("radix_histogram", prefix) & pmask;
        const int d = static_cast<int>(digit);
        std::vector<std::vector<int64_t>> parts;
        for (const Operand& op : ops) parts.resize(parts.size() + chunks_of(op.scores.numel()));
        std::vector<size_t> first(ops.size() + 1, 0);
        for (size_t o = 0; o < ops.size(); ++o) first[o + 1] = first[o] + chunks_of(ops[o].scores.numel());
        for_each_chunk(ops, [&](size_t o, int64_t c, int64_t b, int64_t e) {
          std::vector<int64_t>& h = parts[first[o] + c];
          h.assign(kBins, 0);
          for_each_entry<scalar_t>(ops[o], only_ones, largest, b, e,
                                   [&](int64_t, bool cand, key_t key) {
                                     if (cand && (key & pmask) == pre) ++h[Digits::digit(key, d)];
                                     return false;
                                   });
        });
        int64_t* total = hist.mutable_data_ptr<int64_t>();
        for (const auto& h : parts) {
          for (int64_t b = 0; b < static_cast<int64_t>(h.size()); ++b) total[b] += h[b];
        }
      });
  return hist.to(ops[0].scores.device());
}

at::Tensor count_at_key_cpu(
    at::TensorList scores, at::TensorList masks, int64_t key, bool only_ones, bool largest) {
  const std::vector<Operand> ops = make_pass_operands("count_at_key", scores, masks, false);
  check_operands(ops, 0.0);
  at::Tensor counts = at::zeros({static_cast<int64_t>(ops.size())}, at::kLong);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, ops[0].scores.scalar_type(), "count_at_key", [&] {
        using key_t = typename KeyOf<scalar_t>::type;
        const auto ties = chunk_ties<scalar_t>(ops, pass_key<key_t>("count_at_key", key), only_ones, largest);
        int64_t* out = counts.mutable_data_ptr<int64_t>();
        for (size_t o = 0; o < ops.size(); ++o) {
          for (int64_t n : ties[o]) out[o] += n;
        }
      });
  return counts;
}

std::vector<at::Tensor> masks_at_threshold_cpu(
    at::TensorList scores, at::TensorList masks, int64_t key, int64_t skip,
    int64_t take, bool only_ones, bool largest) {
  check_tie_window("masks_at_threshold", skip, take);
  std::vector<Operand> ops = make_pass_operands("masks_at_threshold", scores, masks, true, cached_empty_like);
  check_operands(ops, 0.0);
  if (ops.empty()) return {};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, ops[0].scores.scalar_type(), "masks_at_threshold", [&] {
        using key_t = typename KeyOf<scalar_t>::type;
        const key_t thr = pass_key<key_t>("masks_at_threshold", key);
        const int64_t end = tie_window_end(skip, take);
        // Ties in each chunk and before it, in concatenation order (counted
        // only when the window can prune some).
        std::vector<std::vector<int64_t>> ties(ops.size()), prior(ops.size());
        if (take > 0) {
          ties = chunk_ties<scalar_t>(ops, thr, only_ones, largest);
          int64_t seen = 0;
          for (size_t o = 0; o < ops.size(); ++o) {
            for (int64_t n : ties[o]) prior[o].push_back(seen), seen += n;
          }
        }
        for_each_chunk(ops, [&](size_t o, int64_t c, int64_t b, int64_t e) {
          int64_t first = 0, last = 0;  // this chunk's ties ranked [first, last) go
          if (take > 0) {
            first = tie_quota(skip, prior[o][c], ties[o][c]);
            last = tie_quota(end, prior[o][c], ties[o][c]);
          }
          int64_t rank = 0;
          for_each_entry<scalar_t>(ops[o], only_ones, largest, b, e,
                                   [&](int64_t, bool cand, key_t k) {
                                     const bool tie = cand & (k == thr);
                                     const bool cut = (cand & (k < thr)) |
                                         (tie & (rank >= first) & (rank < last));
                                     rank += tie;
                                     return cut;
                                   });
        });
      });
  return take_outputs(ops);
}

std::vector<int64_t> radix_step_op(
    const at::Tensor& hist, int64_t digit, int64_t prefix, int64_t rank, at::ScalarType dtype) {
  constexpr int64_t kBins = int64_t{1} << kPassDigitBits;
  TORCH_CHECK(
      hist.scalar_type() == at::kLong && hist.dim() == 1 && hist.size(0) == kBins,
      "radix_step: hist must hold ", kBins, " int64 counts, got ", hist.scalar_type(),
      " of shape ", hist.sizes());
  const at::Tensor counts = hist.cpu().contiguous();
  const int64_t* h = counts.const_data_ptr<int64_t>();
  int64_t total = 0;  // saturating: rank is checked against it
  for (int64_t b = 0; b < kBins; ++b) {
    TORCH_CHECK(h[b] >= 0, "radix_step: counts must be non-negative, got ", h[b], " in bin ", b);
    total = h[b] > std::numeric_limits<int64_t>::max() - total ? std::numeric_limits<int64_t>::max()
                                                                : total + h[b];
  }
  TORCH_CHECK(
      rank >= 1 && rank <= total, "radix_step: rank must lie in [1, ", total,
      "] (the candidates counted), got ", rank);
  std::vector<int64_t> out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "radix_step", [&] {
    using key_t = typename KeyOf<scalar_t>::type;
    using Digits = Radix<key_t, kPassDigitBits>;
    check_pass_digit("radix_step", digit, Digits::kDigits);
    const int d = static_cast<int>(digit);
    const key_t pre = pass_key<key_t>("radix_step", prefix) & Digits::prefix_mask(d);
    const RadixStep<key_t> step = radix_step<Digits>(h, d, pre, rank);
    TORCH_CHECK(
        (step.prefix >> (Digits::kKeyBits - 1)) == 0, "radix_step: the rank-th key falls in bin ",
        step.bin, " of digit ", digit, ", where no key lies (keys are below 2^", Digits::kKeyBits - 1, ")");
    out = {static_cast<int64_t>(step.prefix), step.rank, step.count, step.last ? 1 : 0};
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("radix_histogram", &radix_histogram_cpu);
  m.impl("count_at_key", &count_at_key_cpu);
  m.impl("masks_at_threshold", &masks_at_threshold_cpu);
}

// Host arithmetic, whatever the histogram's device.
TORCH_LIBRARY_IMPL(fastprune, CompositeExplicitAutograd, m) {
  m.impl("radix_step", &radix_step_op);
}

}  // namespace fastprune
