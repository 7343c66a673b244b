// The CUDA select's piece table and its pass launches, shared by
// csrc/cuda/select_cuda.cu (the select) and csrc/cuda/passes_cuda.cu (the
// separable passes): the select chains the same histogram, tie-count and write
// kernels that the passes expose one by one. The kernels and these launches
// are defined in passes_cuda.cu (the templates instantiated there for the four
// score dtypes), so that the device code is compiled once.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "../common/operand.h"
#include "../common/select.h"

namespace fastprune {

constexpr int kRadixBits = kPassDigitBits;  // the select and the passes count alike
constexpr int kRadixBins = 1 << kRadixBits;

// One tensor of a select over one or several tensors (a piece, as in
// python/fastprune/_crossrank.py; not a segment, which is an N:M group or row
// of segmented_mask), flattened row-major; as stored in the device table.
struct Piece {
  const void* scores;  // contiguous score_t
  const void* mask;    // contiguous, or a single value when `broadcast`
  void* out;           // contiguous, the mask's dtype
  int64_t numel;
  int64_t first_tile;  // its tiles are first_tile, first_tile + 1, ...
  uint64_t one;        // the bits of the value 1 in the mask's dtype
  int mask_size;       // bytes per mask element: 1, 2, 4 or 8
  bool broadcast;
  int64_t packed_row;  // > 0: mask and out are packed bits (bits.h), rows of this many entries
};

// The pieces of a select, as a table on their device, and their tiles.
struct PieceTable {
  at::Tensor table;
  std::vector<Piece> pieces;
  int64_t ntiles = 0;
  const Piece* data() const { return static_cast<const Piece*>(table.const_data_ptr()); }
  int size() const { return static_cast<int>(pieces.size()); }
};

// The piece table of `ops` on their device (copied from pinned memory
// without a host sync), the count of pieces and of tiles; empty tensors
// are left out. Outputs are written where an operand has one (`dst`).
PieceTable piece_table(const std::vector<Operand>& ops);

// Number of histogram blocks for `ntiles` tiles: enough to fill the device,
// and each block counts at most 2^31 elements (its shared 32-bit counts
// cannot overflow).
int64_t histogram_blocks(int64_t ntiles, const at::Device& device);

// hist (kRadixBins int64 on the device) := the histogram of digit d over the
// candidates of `table` whose higher digits equal `prefix`.
template <typename score_t>
void histogram_into(
    const PieceTable& table, int d, typename KeyOf<score_t>::type prefix, bool only_ones,
    bool largest, int64_t blocks, at::Tensor& hist);

// Per-tile tie counts at `thr` (one block per tile) and their inclusive cumsum.
template <typename score_t>
std::pair<at::Tensor, at::Tensor> tile_ties(
    const PieceTable& table, typename KeyOf<score_t>::type thr, bool only_ones,
    bool largest, const at::TensorOptions& options);

// The write pass over `table` with tie window [lo, hi); `ties` from tile_ties
// when the window may split the ties of a tile, else undefined.
template <typename score_t>
void write_masks(
    const PieceTable& table, typename KeyOf<score_t>::type thr, int64_t lo, int64_t hi,
    const std::pair<at::Tensor, at::Tensor>& ties, bool only_ones, bool largest);

}  // namespace fastprune
