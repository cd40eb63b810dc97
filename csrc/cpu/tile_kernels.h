// The vectorised tile loops shared by the routed linear and convolution kernels (tile_loops.inc, compiled once per
// instruction set in tile_kernels.cpp and chosen at run time), the per-thread scratch buffers, and the two-phase
// weight-gradient reduction both op families use. Raw pointers only: no torch headers.
#pragma once
#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace rtl_cpu::tile {

constexpr int kTileRows = 64;      // 8 AVX2 accumulators: enough independent FMA chains to hide FMA latency
constexpr int64_t kPrefetch = 16;  // entries ahead; 4/8/16 measured, 16 best by a few %
constexpr int64_t kOutBlock = 64;  // outputs per work item: many items per tile for load balance on few cores
// Chunk only when a (output, chunk) holds >= 12 entries on average (density >= ~20 % at 64 inputs a chunk):
// at 50 % density chunking ran 1.3x faster, at 10 % it broke even and at 5 % it lost (2-core EPYC, 1024x1024).
constexpr int64_t kMinChunkEntries = 12;

// A stretch of a tile's rows whose outputs are consecutive floats: rows first .. first + length - 1 go to
// dest .. dest + length - 1 (plus the output's channel offset).
struct OutRun {
  int64_t dest;
  int first;
  int length;
};

// One (tile, block of outputs) of a sparse matrix product: out rows of the tile = kept weights times xt.
struct SpmmTile {
  const float* vals;         // kept weights in index order (entry e of idx)
  const int64_t* ptr;        // this ticket's row pointer: kept inputs of output o at idx[ptr[o] .. ptr[o + 1])
  const int64_t* chunk_ptr;  // the same entries split by input chunk: (o, c) at chunk_ptr[o * n_chunks + c]
  int64_t n_chunks;          // 1: walk whole rows (ptr) instead
  const int32_t* idx;
  const float* xt;  // transposed tile: input i of tile row j at xt[i * xt_stride + j]
  int64_t xt_stride;
  int width;
  int nrows;
  const int64_t* out_rows;  // (nrows) element offset of each tile row in out (-1: dropped, scattered mode only)
  float* out;
  // 0: row-major output, outputs of row j contiguous at out + out_rows[j];
  // else scattered: output o of row j at out[out_rows[j] + o * out_o_stride].
  int64_t out_o_stride;
  const OutRun* runs = nullptr;  // scattered: the tile's rows as runs of consecutive outputs (out_rows unused)
  int n_runs = 0;
  const float* bias;  // (outputs) or nullptr
  int64_t o_begin, o_end;
  // Table mode (lut not null): idx holds weight positions k; entry k of output o weighs w[o * w_stride + k] and reads
  // tile row xt + (o / rows_per_group) * group_stride + lut[k] (vals and xt_stride unused).
  const float* w = nullptr;
  int64_t w_stride = 0;
  const int64_t* lut = nullptr;
  int64_t rows_per_group = 1, group_stride = 0;
  // Prefetch the rows of entries a few ahead. The linear tiles (256 KB for a 1024-wide layer, streamed from L2)
  // gain; the conv's operand rows, re-read by every output of a tile, lose: 1.3x slower with it (3x3, C = 256,
  // 14x14, 10 % density, 2-core EPYC).
  bool prefetch;
};

// One output row of a weight gradient over one tile: acc[e] += dot(dy row, the tile's row idx[e]).
struct SddmmRow {
  const float* dyt_row;  // (width) dy of one output over the tile's rows
  int64_t dyt_next;      // the next output's dy row starts at dyt_row + dyt_next (prefetched)
  const float* xt;       // input i of tile row j at xt[i * xt_stride + j]
  int64_t xt_stride;
  int width;
  int nrows;  // lanes at or past nrows are ignored
  const int32_t* idx;
  int64_t e_begin, e_end;
  float* acc;                    // per-entry accumulators, indexed like idx
  const int64_t* lut = nullptr;  // not null: entry e's tile row is xt + lut[idx[e]] (xt_stride unused)
};

// One (image, channel) plane of a depthwise conv: the kept taps of its ticket (weights, offsets in the bordered
// buffer buf of wp columns) over the plane x (strides x_h, x_w), written to y (strides y_h, y_w). The input
// gradient reads dy through x and accumulates into buf; the weight gradient reads x through x.
struct DepthwisePlane {
  const float* x;
  int64_t x_h, x_w;
  float* y;
  int64_t y_h, y_w;
  int64_t h, w, ho, wo;
  int64_t stride_h, stride_w, pad_h, pad_w;
  int64_t wp;  // columns of buf; its rows hold the bordered plane, then 8 floats of slack
  float* buf;
  const float* wts;     // (count) weights of the kept taps
  const int64_t* offs;  // (count) kh * dil_h * wp + kw * dil_w
  int count;
  float bias;
};

// One image of a depthwise conv with one output channel per input channel, channels as the vector lanes: x and y
// point at the image (channel, row and column strides), wmask (taps, c8) holds the image's ticket's masked weights,
// buf (hp * wp * c8) the bordered image with channels innermost (border and lanes past `channels` zero).
struct DepthwiseLanes {
  const float* x;
  int64_t x_c, x_h, x_w;
  float* y;
  int64_t y_c, y_h, y_w;
  int64_t channels, c8, h, w, ho, wo;
  int64_t stride_h, stride_w, pad_h, pad_w, wp;
  const float* wmask;
  const float* bias8;         // (c8) or nullptr
  const int64_t* tap_offset;  // (taps) (kh * dil_h * wp + kw * dil_w) * c8
  int64_t taps;
  float* buf;
};

struct Isa {
  void (*spmm_tile)(const SpmmTile&);
  void (*sddmm_row)(const SddmmRow&);
  void (*transpose_rows8)(const float* const*, int64_t, float*, int);
  void (*depthwise_forward_plane)(const DepthwisePlane&);
  void (*depthwise_grad_input_plane)(const DepthwisePlane&);
  void (*depthwise_grad_weight_plane)(const DepthwisePlane&, const float*, int64_t, int64_t, float*);
  void (*depthwise_lanes_image)(const DepthwiseLanes&);
  const char* name;
};

// The widest instruction set the CPU has, capped by RTL_CPU_ISA=avx2|generic.
const Isa& isa();

// Named scratch buffers, reused across calls by the calling thread (slots of one call must differ).
enum Slot : int { kSlotA = 0, kSlotB, kSlotC, kSlotD, kSlotE, kSlotF, kNumSlots };

// A 64-byte aligned buffer of at least `bytes` in slot `slot` of the calling thread, kept for the next call.
void* scratch(int slot, size_t bytes);

template <typename T>
T* scratch_of(int slot, size_t count) {
  return static_cast<T*>(scratch(slot, count * sizeof(T)));
}

// Tiles of one ticket are consecutive: ticket t owns tiles [result[t], result[t + 1]).
template <typename TileT>
std::vector<int64_t> tiles_by_ticket(const std::vector<TileT>& tiles, int64_t num_tickets) {
  std::vector<int64_t> begin(num_tickets + 1, 0);
  for (const TileT& tile : tiles) begin[tile.ticket + 1]++;
  for (int64_t t = 0; t < num_tickets; ++t) begin[t + 1] += begin[t];
  return begin;
}

// Weight gradient over tiles grouped by ticket. Phase 1, per (ticket, output block): sum each kept entry's tile
// dot products into one accumulator per entry (contiguous, in index order; scattered writes into dw per tile were
// cache-miss bound). Phase 2: each dw row is owned by one thread and adds its tickets' accumulators in ticket
// order: deterministic, no atomics, nothing written outside the kept entries.
// dot_idx[e] locates entry e's row in a tile (the sddmm's index); add_idx[e] is its column in dw (k_in wide).
// locate(b, o, row) fills row's dyt_row, dyt_next, xt and xt_stride for output o of tile b.
template <typename TileT, typename Locate>
void weight_gradient(const std::vector<TileT>& tiles, int64_t num_tickets, int64_t n_out, int64_t k_in,
                     const int64_t* csr_ptr, const int32_t* dot_idx, const int32_t* add_idx, float* acc, float* dw,
                     int num_threads, Locate locate) {
  const std::vector<int64_t> tile_begin = tiles_by_ticket(tiles, num_tickets);
  const Isa& kernels = isa();
  const int64_t n_blocks = (n_out + kOutBlock - 1) / kOutBlock;
  const int64_t n_items = num_tickets * n_blocks;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int64_t item = 0; item < n_items; ++item) {
    const int64_t t = item / n_blocks, blk = item % n_blocks;
    if (tile_begin[t] == tile_begin[t + 1]) continue;
    const int64_t o_begin = blk * kOutBlock, o_end = std::min(n_out, o_begin + kOutBlock);
    const int64_t* ptr = csr_ptr + t * n_out;
    std::fill(acc + ptr[o_begin], acc + ptr[o_end], 0.f);
    for (int64_t b = tile_begin[t]; b < tile_begin[t + 1]; ++b) {
      for (int64_t o = o_begin; o < o_end; ++o) {
        SddmmRow a;
        locate(b, o, a);
        a.width = tiles[b].width;
        a.nrows = tiles[b].nrows;
        a.idx = dot_idx;
        a.e_begin = ptr[o];
        a.e_end = ptr[o + 1];
        a.acc = acc;
        kernels.sddmm_row(a);
      }
    }
  }
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t o = 0; o < n_out; ++o) {
    float* dw_o = dw + o * k_in;
    for (int64_t t = 0; t < num_tickets; ++t) {
      if (tile_begin[t] == tile_begin[t + 1]) continue;
      const int64_t row = t * n_out + o;
      for (int64_t e = csr_ptr[row]; e < csr_ptr[row + 1]; ++e) dw_o[add_idx[e]] += acc[e];
    }
  }
}

}  // namespace rtl_cpu::tile
