// CUDA kernels of the unstructured (magnitude / random-draw) select: the same
// results, bit for bit, as csrc/cpu/select_cpu.cpp, through the key, rounding,
// tie-quota and keep-or-zero logic of csrc/common/select.h.
//
// Radix select on the keys, never a sort, with 11-bit digits (2 histogram
// passes for 16-bit keys, 3 for fp32, 6 for fp64), through the kernels of the
// separable passes (csrc/cuda/passes_cuda.cu, launched as select_cuda.cuh
// declares): one histogram launch per digit over all the tensors' tiles, then
// one write launch. After each pass the histogram (16 KiB) is copied to the
// host, where the radix descent of csrc/common/select.h finds the threshold's
// bin: one host sync per digit pass (the first is needed anyway, to raise the
// ValueError when k exceeds the candidates).
//
// Tie rule. Candidates below the threshold key are pruned, and of those equal
// to it the first `need` in flat order: the write pass's tie window [0, need),
// with the ties counted per tile first only when the window may split them.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <numeric>
#include <utility>
#include <vector>

#include "../common/in_place_operands.h"
#include "../common/select.h"
#include "../common/select_operands.h"
#include "select_cuda.cuh"

namespace fastprune {
namespace {

template <typename score_t>
class UnstructuredSelect {
  using key_t = typename KeyOf<score_t>::type;
  using Digits = Radix<key_t, kRadixBits>;

 public:
  UnstructuredSelect(const PieceTable& table, bool only_ones, bool largest)
      : table_(table), only_ones_(only_ones), largest_(largest),
        hist_blocks_(histogram_blocks(table.ntiles, table.table.device())),
        hist_(at::empty({kRadixBins}, table.table.options().dtype(at::kLong))),
        total_(at::zeros({kRadixBins}, at::kLong)) {}

  // Prunes k = count (or round(fraction * candidates) when count < 0).
  void run(int64_t count, double fraction) {
    histogram(0, 0);
    const int64_t* total = total_.const_data_ptr<int64_t>();
    const int64_t n = std::accumulate(total, total + kRadixBins, int64_t{0});
    const int64_t k = prune_count(count, fraction, n);
    if (k == 0) {
      write(key_t{0}, 0, 0);  // nothing below key 0, no quota: a plain copy
      return;
    }
    // The k-th smallest key is the threshold: the descent runs on the host,
    // on each pass's histogram as histogram() copies it there.
    const RadixStep<key_t> step = radix_descent<Digits>(total, k, [&](int d, key_t prefix) {
      histogram(d, prefix);
      return total;
    });
    write(step.prefix, step.rank, step.count);
  }

 private:
  // Histogram of digit d over the candidates whose higher digits equal
  // `prefix`, into total_ on the host.
  void histogram(int d, key_t prefix) {
    if (table_.ntiles == 0) return;  // total_ stays all zero
    histogram_into<score_t>(table_, d, prefix, only_ones_, largest_, hist_blocks_, hist_);
    total_.copy_(hist_);  // the pass's one host sync
  }

  // Candidates with key < thr are pruned, and of the `ties_at_thr` with key
  // == thr the first `need` in flat order.
  void write(key_t thr, int64_t need, int64_t ties_at_thr) {
    std::pair<at::Tensor, at::Tensor> ties;
    if (need > 0 && need < ties_at_thr) {
      ties = tile_ties<score_t>(table_, thr, only_ones_, largest_, hist_.options());
    }
    write_masks<score_t>(table_, thr, 0, need, ties, only_ones_, largest_);
  }

  const PieceTable& table_;
  bool only_ones_;
  bool largest_;
  int64_t hist_blocks_;
  at::Tensor hist_;   // device, kRadixBins
  at::Tensor total_;  // host copy of the last histogram
};

std::vector<at::Tensor> select_masks(
    std::vector<Operand> ops, int64_t count, double fraction, bool only_ones,
    bool largest) {
  check_operands(ops, fraction);
  if (!ops.empty()) {
    c10::cuda::CUDAGuard guard(ops[0].scores.device());
    const PieceTable table = piece_table(ops);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, ops[0].scores.scalar_type(), "fastprune_select", [&] {
          UnstructuredSelect<scalar_t>(table, only_ones, largest).run(count, fraction);
        });
  }
  return take_outputs(ops);
}

at::Tensor unstructured_mask_cuda(
    const at::Tensor& scores, const at::Tensor& mask, int64_t count,
    double fraction, bool only_ones, bool largest) {
  return select_masks({make_operand(scores, mask)}, count, fraction, only_ones, largest)[0];
}

std::vector<at::Tensor> global_unstructured_masks_cuda(
    at::TensorList scores, at::TensorList masks, int64_t count,
    double fraction, bool only_ones, bool largest) {
  return select_masks(make_operands(scores, masks), count, fraction, only_ones, largest);
}

// prune_in_place_ on CUDA: the same select (the passes read the packed or
// bool masks as the live set and answer in that format, in a buffer the size
// of the masks), copied back into the masks; then the values are zeroed where
// the masks are clear.
void prune_in_place_cuda(
    at::TensorList values, at::TensorList scores, at::TensorList masks, int64_t count, bool largest) {
  make_targets(values, scores, masks);  // the checks
  std::vector<Operand> ops;
  for (size_t i = 0; i < values.size(); ++i) ops.push_back(make_pass_operand(scores[i], masks[i], true));
  const std::vector<at::Tensor> out = select_masks(std::move(ops), count, 0.0, true, largest);
  static const auto mask_packed = c10::Dispatcher::singleton()
      .findSchemaOrThrow("fastprune::mask_packed_", "")
      .typed<void(const at::Tensor&, const at::Tensor&)>();
  for (size_t i = 0; i < values.size(); ++i) {
    masks[i].copy_(out[i]);
    if (masks[i].scalar_type() == at::kByte) {
      mask_packed.call(values[i], masks[i]);
    } else {
      values[i].masked_fill_(masks[i].logical_not(), 0);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("unstructured_mask", &unstructured_mask_cuda);
  m.impl("global_unstructured_masks", &global_unstructured_masks_cuda);
  m.impl("prune_in_place_", &prune_in_place_cuda);
}

}  // namespace fastprune
