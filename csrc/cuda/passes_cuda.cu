// CUDA kernels of the separable passes of the magnitude select
// (radix_histogram, count_at_key, masks_at_threshold): the same results, bit
// for bit, as csrc/cpu/passes_cpu.cpp, with the digits of kPassDigitBits. The
// CUDA select (select_cuda.cu) chains the same kernels through the launches
// declared in select_cuda.cuh.
//
// Each block counts its elements in a 2048-bin shared-memory histogram (fast
// shared atomics; a 65536-bin one would not fit in shared memory, and global
// atomics on the few hot bins of weight-like data serialize) and adds it into
// one 64-bit global histogram. The restriction to mask == 1 and the filter by
// the digits found so far are read inside the histogram kernel; nothing is
// gathered.
//
// Several tensors go through the same launches: each is cut into tiles of
// kTile elements that never straddle two tensors, numbered in concatenation
// order, and a device table of piece descriptors (pointers, length, first
// tile) lets each block find its tensor.
//
// Tie window. Candidates below the threshold key are pruned, and of those
// equal to it the ones whose tie number (in flat order) lies in the window.
// When that is none or all of them (always so on tie-free data) each element
// is decided on its own. Otherwise one more pass counts the ties of every
// tile, a cumsum over tiles gives each tile its quota (tie_quota), and a tile
// whose quota is partial ranks its ties in flat order with a block scan.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <cstring>
#include <limits>
#include <utility>
#include <vector>

#include "../common/bits.h"
#include "../common/operand.h"
#include "../common/select.h"
#include "../common/select_operands.h"
#include "select_cuda.cuh"

namespace fastprune {
namespace {

constexpr int kThreads = 256;
constexpr int kItems = 16;  // elements per thread and tile
constexpr int64_t kTile = kThreads * kItems;

// The elements [lo, hi) of piece `piece` that form one tile.
struct Tile {
  const Piece* piece;
  int64_t lo;
  int64_t hi;
};

__device__ Tile tile_at(const Piece* pieces, int npieces, int64_t t) {
  int a = 0, b = npieces - 1;  // the last piece whose first tile is <= t
  while (a < b) {
    const int mid = (a + b + 1) / 2;
    if (pieces[mid].first_tile <= t) {
      a = mid;
    } else {
      b = mid - 1;
    }
  }
  const int64_t lo = (t - pieces[a].first_tile) * kTile;
  return {pieces + a, lo, lo + kTile < pieces[a].numel ? lo + kTile : pieces[a].numel};
}

// The byte of a packed piece's mask (or output) that holds entry i, and the
// entry's bit in it.
__device__ int64_t packed_byte(const Piece& piece, int64_t i, int* bit) {
  const int64_t row = i / piece.packed_row, col = i - row * piece.packed_row;
  *bit = static_cast<int>(col % 8);
  return row * packed_row_bytes(piece.packed_row) + col / 8;
}

// Entry i's mask value: its bits, or for a packed mask its bit (0 or 1).
template <typename bits_t>
__device__ bits_t mask_value(const Piece& piece, int64_t i) {
  if (piece.packed_row > 0) {
    int bit = 0;
    const int64_t at = packed_byte(piece, i, &bit);
    return static_cast<bits_t>((static_cast<const uint8_t*>(piece.mask)[piece.broadcast ? 0 : at] >> bit) & 1);
  }
  return static_cast<const bits_t*>(piece.mask)[piece.broadcast ? 0 : i];
}

// Writes entry i's new mask value: the old one v, or 0 where cut. A packed
// output starts zeroed and gets its set bits by 32-bit atomic ORs (neighbours
// in a byte belong to other threads; the buffer is padded to whole words).
template <typename bits_t>
__device__ void write_value(const Piece& piece, int64_t i, bits_t v, bool cut) {
  if (piece.packed_row > 0) {
    int bit = 0;
    const int64_t at = packed_byte(piece, i, &bit);
    if (v != 0 && !cut) atomicOr(static_cast<unsigned*>(piece.out) + at / 4, 1u << (8 * (at % 4) + bit));
    return;
  }
  static_cast<bits_t*>(piece.out)[i] = keep_or_zero(v, !cut);
}

// Calls f(valid, i, cand, key, v) for this thread's kItems elements of
// the tile, i = lo + r * kThreads + threadIdx.x for r = 0, 1, ... (so the calls
// of a block, round by round and thread by thread, go in flat order). The mask
// is read as raw bits (v) of its size, and out typed alike: an entry is a
// candidate when not only_ones or when its bits are those of 1 (the same test
// as mask == 1 in every mask dtype: only 0 has two encodings). Threads past
// the tile's end are called too (valid false, not a candidate), so that f may
// hold block-wide steps. A packed mask is read through mask_value (v is the
// entry's bit, one is 1). The mask is read only when read_mask (which
// only_ones needs; else v is 0). All loads are issued before the first call,
// to keep many in flight.
template <typename bits_t, typename score_t, typename F>
__device__ void for_each_element_as(
    const Tile& tile, bool only_ones, bool largest, bool read_mask, const F& f) {
  using key_t = typename KeyOf<score_t>::type;
  const Piece& piece = *tile.piece;
  const auto* scores = static_cast<const score_t*>(piece.scores);
  const auto one = static_cast<bits_t>(piece.one);
  const int64_t first = tile.lo + threadIdx.x;
  bits_t v[kItems];
  score_t s[kItems];
#pragma unroll
  for (int r = 0; r < kItems; ++r) {
    const int64_t i = first + r * kThreads;
    v[r] = 0;
    if (i < tile.hi) {
      if (read_mask) v[r] = mask_value<bits_t>(piece, i);
      s[r] = scores[i];
    }
  }
#pragma unroll
  for (int r = 0; r < kItems; ++r) {
    const int64_t i = first + r * kThreads;
    const bool valid = i < tile.hi;
    const bool cand = valid && (!only_ones || v[r] == one);
    const key_t key = valid ? magnitude_key(s[r], largest) : key_t{0};
    f(valid, i, cand, key, v[r]);
  }
}

template <typename score_t, typename F>
__device__ void for_each_element(
    const Tile& tile, bool only_ones, bool largest, bool read_mask, const F& f) {
  switch (tile.piece->mask_size) {
    case 1:
      return for_each_element_as<uint8_t, score_t>(tile, only_ones, largest, read_mask, f);
    case 2:
      return for_each_element_as<uint16_t, score_t>(tile, only_ones, largest, read_mask, f);
    case 4:
      return for_each_element_as<uint32_t, score_t>(tile, only_ones, largest, read_mask, f);
    default:
      return for_each_element_as<uint64_t, score_t>(tile, only_ones, largest, read_mask, f);
  }
}

// Adds to hist (kRadixBins 64-bit counts) the histogram of digit `pass` over
// the candidates whose earlier digits equal `prefix`. Blocks stride over the
// tiles; the host keeps each block under 2^32 elements, so the shared 32-bit
// counts cannot overflow.
template <typename score_t>
__global__ void histogram_kernel(
    const Piece* pieces, int npieces, int64_t ntiles, int pass,
    typename KeyOf<score_t>::type prefix, bool only_ones, bool largest,
    int64_t* hist) {
  using key_t = typename KeyOf<score_t>::type;
  __shared__ uint32_t bins[kRadixBins];
  for (int b = threadIdx.x; b < kRadixBins; b += kThreads) bins[b] = 0;
  __syncthreads();
  const key_t pmask = Radix<key_t, kRadixBits>::prefix_mask(pass);
  for (int64_t t = blockIdx.x; t < ntiles; t += gridDim.x) {
    for_each_element<score_t>(
        tile_at(pieces, npieces, t), only_ones, largest, /*read_mask=*/only_ones,
        [&](bool, int64_t, bool cand, key_t key, auto) {
          if (cand && (key & pmask) == prefix) {
            atomicAdd(&bins[Radix<key_t, kRadixBits>::digit(key, pass)], 1u);
          }
        });
  }
  __syncthreads();
  for (int b = threadIdx.x; b < kRadixBins; b += kThreads) {
    if (bins[b] != 0) {
      atomicAdd(
          reinterpret_cast<unsigned long long*>(hist) + b,
          static_cast<unsigned long long>(bins[b]));
    }
  }
}

// ties[t] = the candidates of tile t (one block each) whose key is thr.
template <typename score_t>
__global__ void count_ties_kernel(
    const Piece* pieces, int npieces, typename KeyOf<score_t>::type thr,
    bool only_ones, bool largest, int64_t* ties) {
  using key_t = typename KeyOf<score_t>::type;
  using BlockReduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename BlockReduce::TempStorage temp;
  int n = 0;
  for_each_element<score_t>(
      tile_at(pieces, npieces, blockIdx.x), only_ones, largest, /*read_mask=*/only_ones,
      [&](bool, int64_t, bool cand, key_t key, auto) { n += cand && key == thr; });
  const int total = BlockReduce(temp).Sum(n);
  if (threadIdx.x == 0) ties[blockIdx.x] = total;
}

// The write pass, one block per tile: out = mask, except candidates with key <
// thr and the candidates with key == thr whose tie rank (their place among
// all ties in flat order, from 0) lies in [lo, hi), which get 0. `ties` and
// its inclusive cumsum `ties_end` are the per-tile tie counts; null when the
// window holds none or all of the ties.
template <typename score_t>
__global__ void write_kernel(
    const Piece* pieces, int npieces, typename KeyOf<score_t>::type thr,
    int64_t lo, int64_t hi, const int64_t* ties, const int64_t* ties_end,
    bool only_ones, bool largest) {
  using key_t = typename KeyOf<score_t>::type;
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage temp;
  const int64_t t = blockIdx.x;
  // This tile's ties ranked [first, last) (tile-local ranks) are pruned.
  int64_t first = 0, last = hi - lo;
  bool ranked = false;  // a part of the tile's ties only: rank them
  if (ties != nullptr) {
    const int64_t before = ties_end[t] - ties[t];
    first = tie_quota(lo, before, ties[t]);
    last = tie_quota(hi, before, ties[t]);
    ranked = last > first && (first > 0 || last < ties[t]);
  }
  int64_t seen = 0;  // ties in the earlier rounds of a ranked tile
  const Tile tile = tile_at(pieces, npieces, t);
  for_each_element<score_t>(
      tile, only_ones, largest, /*read_mask=*/true,
      [&](bool valid, int64_t i, bool cand, key_t key, auto v) {
        const bool tie = cand && key == thr;
        bool cut = cand && key < thr;
        if (ranked) {  // block-uniform, so every thread joins the scan
          int before = 0, round_ties = 0;
          BlockScan(temp).ExclusiveSum(static_cast<int>(tie), before, round_ties);
          __syncthreads();  // temp is reused by the next round
          cut = cut || (tie && seen + before >= first && seen + before < last);
          seen += round_ties;
        } else {
          cut = cut || (tie && last > first);
        }
        if (valid) write_value(*tile.piece, i, v, cut);
      });
}

}  // namespace

// The launches of select_cuda.cuh.

PieceTable piece_table(const std::vector<Operand>& ops) {
  PieceTable t;
  for (const Operand& op : ops) {
    if (op.scores.numel() == 0) continue;
    t.pieces.push_back(Piece{
        op.scores.const_data_ptr(), op.mask.const_data_ptr(),
        op.dst.defined() ? op.dst.mutable_data_ptr() : nullptr, op.scores.numel(), t.ntiles,
        one_bits(op.mask.scalar_type()),
        static_cast<int>(op.mask.element_size()), is_broadcast_scalar(op.mask), op.packed_row});
    t.ntiles += (op.scores.numel() + kTile - 1) / kTile;
  }
  TORCH_CHECK(
      t.ntiles <= std::numeric_limits<int32_t>::max(),
      "fastprune: too many elements for one select, got ", t.ntiles * kTile);
  at::Tensor host = at::empty(
      {static_cast<int64_t>(t.pieces.size() * sizeof(Piece))},
      at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  if (!t.pieces.empty()) std::memcpy(host.mutable_data_ptr(), t.pieces.data(), host.numel());
  t.table = host.to(ops[0].scores.device(), /*non_blocking=*/true);
  return t;
}

int64_t histogram_blocks(int64_t ntiles, const at::Device& device) {
  constexpr int64_t kMaxTilesPerBlock = (int64_t{1} << 31) / kTile;
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device.index()));
  return std::max(
      std::min<int64_t>(ntiles, int64_t{8} * sms),
      (ntiles + kMaxTilesPerBlock - 1) / kMaxTilesPerBlock);
}

template <typename score_t>
void histogram_into(
    const PieceTable& table, int d, typename KeyOf<score_t>::type prefix, bool only_ones,
    bool largest, int64_t blocks, at::Tensor& hist) {
  hist.zero_();
  if (table.ntiles == 0) return;
  histogram_kernel<score_t><<<static_cast<unsigned>(blocks), kThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(
      table.data(), table.size(), table.ntiles, d, prefix, only_ones, largest,
      hist.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename score_t>
std::pair<at::Tensor, at::Tensor> tile_ties(
    const PieceTable& table, typename KeyOf<score_t>::type thr, bool only_ones,
    bool largest, const at::TensorOptions& options) {
  at::Tensor ties = at::empty({table.ntiles}, options.dtype(at::kLong));
  count_ties_kernel<score_t><<<static_cast<unsigned>(table.ntiles), kThreads, 0,
                               c10::cuda::getCurrentCUDAStream()>>>(
      table.data(), table.size(), thr, only_ones, largest, ties.mutable_data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {ties, ties.cumsum(0)};
}

template <typename score_t>
void write_masks(
    const PieceTable& table, typename KeyOf<score_t>::type thr, int64_t lo, int64_t hi,
    const std::pair<at::Tensor, at::Tensor>& ties, bool only_ones, bool largest) {
  if (table.ntiles == 0) return;
  const bool ranked = ties.first.defined();
  write_kernel<score_t><<<static_cast<unsigned>(table.ntiles), kThreads, 0,
                          c10::cuda::getCurrentCUDAStream()>>>(
      table.data(), table.size(), thr, lo, hi,
      ranked ? ties.first.const_data_ptr<int64_t>() : nullptr,
      ranked ? ties.second.const_data_ptr<int64_t>() : nullptr, only_ones, largest);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define FASTPRUNE_INSTANTIATE_LAUNCHES(score_t)                                          \
  template void histogram_into<score_t>(                                                 \
      const PieceTable&, int, KeyOf<score_t>::type, bool, bool, int64_t, at::Tensor&);  \
  template std::pair<at::Tensor, at::Tensor> tile_ties<score_t>(                        \
      const PieceTable&, KeyOf<score_t>::type, bool, bool, const at::TensorOptions&);   \
  template void write_masks<score_t>(                                                    \
      const PieceTable&, KeyOf<score_t>::type, int64_t, int64_t,                         \
      const std::pair<at::Tensor, at::Tensor>&, bool, bool);
FASTPRUNE_INSTANTIATE_LAUNCHES(c10::Half)
FASTPRUNE_INSTANTIATE_LAUNCHES(c10::BFloat16)
FASTPRUNE_INSTANTIATE_LAUNCHES(float)
FASTPRUNE_INSTANTIATE_LAUNCHES(double)
#undef FASTPRUNE_INSTANTIATE_LAUNCHES

namespace {

at::Tensor radix_histogram_cuda(
    at::TensorList scores, at::TensorList masks, int64_t digit, int64_t prefix,
    bool only_ones, bool largest) {
  const std::vector<Operand> ops = make_pass_operands("radix_histogram", scores, masks, false);
  c10::cuda::CUDAGuard guard(ops[0].scores.device());
  const PieceTable table = piece_table(ops);
  at::Tensor hist = at::empty({kRadixBins}, ops[0].scores.options().dtype(at::kLong));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, ops[0].scores.scalar_type(), "radix_histogram", [&] {
        using key_t = typename KeyOf<scalar_t>::type;
        using Digits = Radix<key_t, kPassDigitBits>;
        check_pass_digit("radix_histogram", digit, Digits::kDigits);
        const key_t pre = pass_key<key_t>("radix_histogram", prefix) & Digits::prefix_mask(digit);
        histogram_into<scalar_t>(
            table, static_cast<int>(digit), pre, only_ones, largest,
            histogram_blocks(table.ntiles, hist.device()), hist);
      });
  return hist;
}

at::Tensor count_at_key_cuda(
    at::TensorList scores, at::TensorList masks, int64_t key, bool only_ones, bool largest) {
  const std::vector<Operand> ops = make_pass_operands("count_at_key", scores, masks, false);
  c10::cuda::CUDAGuard guard(ops[0].scores.device());
  const PieceTable table = piece_table(ops);
  std::vector<int64_t> counts(ops.size(), 0);
  if (table.ntiles > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, ops[0].scores.scalar_type(), "count_at_key", [&] {
          using key_t = typename KeyOf<scalar_t>::type;
          const auto ties = tile_ties<scalar_t>(
              table, pass_key<key_t>("count_at_key", key), only_ones, largest,
              ops[0].scores.options());
          const at::Tensor ends = ties.second.cpu();  // one host sync
          const int64_t* end = ends.const_data_ptr<int64_t>();
          size_t s = 0;
          for (size_t i = 0; i < ops.size(); ++i) {
            if (ops[i].scores.numel() == 0) continue;
            const Piece& piece = table.pieces[s++];
            const int64_t last = piece.first_tile + (piece.numel + kTile - 1) / kTile - 1;
            counts[i] = end[last] - (piece.first_tile > 0 ? end[piece.first_tile - 1] : 0);
          }
        });
  }
  return at::tensor(counts, at::kLong).to(ops[0].scores.device());
}

std::vector<at::Tensor> masks_at_threshold_cuda(
    at::TensorList scores, at::TensorList masks, int64_t key, int64_t skip,
    int64_t take, bool only_ones, bool largest) {
  check_tie_window("masks_at_threshold", skip, take);
  std::vector<Operand> ops = make_pass_operands("masks_at_threshold", scores, masks, true);
  check_operands(ops, 0.0);
  if (!ops.empty()) {
    c10::cuda::CUDAGuard guard(ops[0].scores.device());
    const PieceTable table = piece_table(ops);
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, ops[0].scores.scalar_type(), "masks_at_threshold", [&] {
          using key_t = typename KeyOf<scalar_t>::type;
          const key_t thr = pass_key<key_t>("masks_at_threshold", key);
          std::pair<at::Tensor, at::Tensor> ties;
          if (take > 0 && table.ntiles > 0) {
            ties = tile_ties<scalar_t>(table, thr, only_ones, largest, ops[0].scores.options());
          }
          write_masks<scalar_t>(
              table, thr, skip, tie_window_end(skip, take), ties, only_ones, largest);
        });
  }
  return take_outputs(ops);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("radix_histogram", &radix_histogram_cuda);
  m.impl("count_at_key", &count_at_key_cuda);
  m.impl("masks_at_threshold", &masks_at_threshold_cuda);
}

}  // namespace fastprune
