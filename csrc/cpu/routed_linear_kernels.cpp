// Routed sparse linear kernels for the CPU. See routed_linear_kernels.h for the contract.
//
// Each op runs in phases, each parallel over independent work:
//   1. gather the rows of every sparse ticket into transposed tiles of up to 64 rows (xt[i][j], j = row),
//   2. gather the kept weights of the call into one contiguous array in index order (W is read through the index
//      once per call, not once per tile: reading it scattered per tile made the kernel bound by cache misses),
//   3. multiply each tile by the ticket's kept weights, vectorised over the tile's rows, writing the result
//      rows in place (bias in the epilogue), or for dW, dot the dy and x tiles at each kept position.
// The tiled transposed copy is what makes unstructured sparsity fast: a kept weight is loaded once and applied
// to up to 64 rows from a contiguous stretch of memory, instead of gathering x at random columns per row.
#include "routed_linear_kernels.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

namespace rtl_cpu {
namespace {

constexpr int kTileRows = 64;      // 8 AVX2 accumulators: enough independent FMA chains to hide FMA latency
constexpr int64_t kPrefetch = 16;  // entries ahead; 4/8/16 measured, 16 best by a few %
constexpr int64_t kOutBlock = 64;  // outputs per work item: many items per tile for load balance on few cores
// Chunk only when a (output, chunk) holds >= 12 entries on average (density >= ~20 % at 64 inputs a chunk):
// at 50 % density chunking ran 1.3x faster, at 10 % it broke even and at 5 % it lost (2-core EPYC, 1024x1024).
constexpr int64_t kMinChunkEntries = 12;

struct SpmmTile {
  const float* vals;     // kept weights in index order (entry e of idx)
  const int64_t* ptr;    // this ticket's row pointer: kept inputs of output o at idx[ptr[o] .. ptr[o + 1])
  const int64_t* chunk_ptr;  // the same entries split by input chunk: (o, c) at chunk_ptr[o * n_chunks + c]
  int64_t n_chunks;      // 1: walk whole rows (ptr) instead
  const int32_t* idx;
  const float* xt;       // transposed tile: input i of tile row j at xt[i * xt_stride + j]
  int64_t xt_stride;
  int width;
  int nrows;
  const int64_t* out_rows;  // row-major output: (nrows) element offset of each tile row in out
  float* out;
  int64_t out_ch_stride; // 0: row-major output through out_rows; else output o of row j at out[o * stride + j]
  const float* bias;     // (outputs) or nullptr
  int64_t o_begin, o_end;
};

struct SddmmRow {
  const float* dyt_row;  // (width) dy of one output over the tile's rows
  int64_t dyt_next;      // the next output's dy row starts at dyt_row + dyt_next (prefetched)
  const float* xt;       // input i of tile row j at xt[i * xt_stride + j]
  int64_t xt_stride;
  int width;
  int nrows;             // lanes at or past nrows are ignored
  const int32_t* idx;
  int64_t e_begin, e_end;
  float* acc;            // per-entry accumulators, indexed like idx
};

namespace generic {
#include "routed_linear_tiles.inc"
}  // namespace generic

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "routed_linear_tiles.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#define RTL_TILE_LANES 16
namespace avx512 {
#include "routed_linear_tiles.inc"
}  // namespace avx512
#undef RTL_TILE_LANES
#pragma GCC pop_options

struct Isa {
  void (*spmm_tile)(const SpmmTile&);
  void (*sddmm_row)(const SddmmRow&);
  void (*transpose_rows8)(const float* const*, int64_t, float*, int);
  const char* name;
};

const Isa& isa() {
  static const Isa chosen = [] {
    __builtin_cpu_init();
    // The widest ISA the CPU has. RTL_CPU_ISA=avx2 or =generic caps it (tests run every path the machine has;
    // a user can opt out of 512-bit vectors where they lower the clock); a cap above the CPU is ignored.
    const char* forced = std::getenv("RTL_CPU_ISA");
    const int cap = forced == nullptr                      ? 2
                    : std::strcmp(forced, "generic") == 0 ? 0
                    : std::strcmp(forced, "avx2") == 0    ? 1
                                                          : 2;
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (cap >= 2 && has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
      return Isa{avx512::spmm_tile, avx512::sddmm_row, avx512::transpose_rows8, "avx512"};
    if (cap >= 1 && has_avx2) return Isa{avx2::spmm_tile, avx2::sddmm_row, avx2::transpose_rows8, "avx2"};
    return Isa{generic::spmm_tile, generic::sddmm_row, generic::transpose_rows8, "generic"};
  }();
  return chosen;
}

// Scratch buffers reused across calls by the calling thread. Allocating tens of MB per call cost more than the
// arithmetic (fresh pages fault on first touch: 20 ms for 32 MB measured on the 2-core machine), so they grow
// and are kept; each calling thread has its own, so concurrent calls from several threads stay safe.
struct Workspace {
  std::vector<float> slot[3];
  // 64-byte aligned: an unaligned tile made half of the 32-byte loads straddle two cache lines.
  float* get(int i, size_t n) {
    const size_t pad = 64 / sizeof(float);
    if (slot[i].size() < n + pad) {
      slot[i].clear();
      slot[i].shrink_to_fit();
      slot[i].resize(n + pad);
    }
    const uintptr_t p = reinterpret_cast<uintptr_t>(slot[i].data());
    return reinterpret_cast<float*>((p + 63) & ~static_cast<uintptr_t>(63));
  }
};

Workspace& workspace() {
  thread_local Workspace ws;
  return ws;
}

struct Tile {
  int64_t ticket;
  int64_t first;   // position in perm of the tile's first row
  int nrows;
  int width;       // nrows rounded up to 8
};

std::vector<Tile> make_tiles(const RoutedRows& r) {
  std::vector<Tile> tiles;
  for (int64_t t = 0; t < r.num_tickets; ++t) {
    if (!r.ticket_sparse[t]) continue;
    for (int64_t p = r.offsets[t]; p < r.offsets[t + 1]; p += kTileRows) {
      int n = static_cast<int>(std::min<int64_t>(kTileRows, r.offsets[t + 1] - p));
      tiles.push_back(Tile{t, p, n, (n + 7) / 8 * 8});
    }
  }
  return tiles;
}

// Tile b's transposed copy of src starts at buf + tile_off[b] and holds (inner, width) floats.
std::vector<int64_t> tile_offsets(const std::vector<Tile>& tiles, int64_t inner) {
  std::vector<int64_t> off(tiles.size() + 1, 0);
  for (size_t b = 0; b < tiles.size(); ++b) off[b + 1] = off[b] + inner * tiles[b].width;
  return off;
}

// buf tile b = transpose of rows perm[first .. first + nrows) of src (rows of length inner), zero padded.
void gather_transposed(const RoutedRows& r, const std::vector<Tile>& tiles, const std::vector<int64_t>& off,
                       const float* src, int64_t inner, float* buf) {
  const int64_t n_items = static_cast<int64_t>(tiles.size());
  const Isa& kernels = isa();
#pragma omp parallel for num_threads(r.num_threads) schedule(dynamic, 1)
  for (int64_t b = 0; b < n_items; ++b) {
    const Tile& tile = tiles[b];
    float* dst = buf + off[b];
    for (int j0 = 0; j0 < tile.width; j0 += 8) {
      const float* rows[8];
      const int live = std::min(8, tile.nrows - j0);
      for (int j = 0; j < 8; ++j) rows[j] = j < live ? src + r.perm[tile.first + j0 + j] * inner : nullptr;
      if (live == 8) {
        kernels.transpose_rows8(rows, inner, dst + j0, tile.width);
      } else {
        for (int64_t i = 0; i < inner; ++i) {
          float* d = dst + i * tile.width + j0;
          for (int j = 0; j < 8; ++j) d[j] = j < live ? rows[j][i] : 0.f;
        }
      }
    }
  }
}

// vals[e] = w[o * w_out_stride + idx[e] * w_in_stride] for every kept entry e of the sparse tickets.
void gather_values(const RoutedRows& r, int64_t n_out, const float* w, int64_t w_out_stride, int64_t w_in_stride,
                   const int64_t* ptr, const int32_t* idx, float* vals) {
  const int64_t n_rows = r.num_tickets * n_out;
#pragma omp parallel for num_threads(r.num_threads) schedule(static)
  for (int64_t row = 0; row < n_rows; ++row) {
    if (!r.ticket_sparse[row / n_out]) continue;
    const float* w_o = w + (row % n_out) * w_out_stride;
    for (int64_t e = ptr[row]; e < ptr[row + 1]; ++e) vals[e] = w_o[static_cast<int64_t>(idx[e]) * w_in_stride];
  }
}

// out rows (of length n_out) of the sparse tickets = tiles of src (transposed, inputs n_in) times kept weights.
void spmm_all(const RoutedRows& r, int64_t n_out, const float* w, int64_t w_out_stride, int64_t w_in_stride,
              const int64_t* ptr, const int64_t* chunk_ptr, int64_t n_chunks, const int32_t* idx,
              const float* src, int64_t n_in, const float* bias, float* out) {
  std::vector<Tile> tiles = make_tiles(r);
  if (tiles.empty()) return;
  std::vector<int64_t> off = tile_offsets(tiles, n_in);
  float* buf = workspace().get(0, static_cast<size_t>(off.back()));
  float* vals = workspace().get(1, static_cast<size_t>(ptr[r.num_tickets * n_out]) + 1);
  gather_transposed(r, tiles, off, src, n_in, buf);
  gather_values(r, n_out, w, w_out_stride, w_in_stride, ptr, idx, vals);

  const int64_t n_blocks = (n_out + kOutBlock - 1) / kOutBlock;
  const int64_t n_items = static_cast<int64_t>(tiles.size()) * n_blocks;
  const Isa& kernels = isa();
#pragma omp parallel num_threads(r.num_threads)
  {
    int64_t out_rows[kTileRows];
#pragma omp for schedule(dynamic, 1)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t b = item / n_blocks, blk = item % n_blocks;
      const Tile& tile = tiles[b];
      for (int j = 0; j < tile.nrows; ++j) out_rows[j] = r.perm[tile.first + j] * n_out;
      SpmmTile a;
      a.vals = vals;
      a.ptr = ptr + tile.ticket * n_out;
      a.chunk_ptr = chunk_ptr + tile.ticket * n_out * n_chunks;
      // Chunking costs one accumulator load/store per (output, chunk): worth it only when a chunk holds
      // several entries per output on average (kMinChunkEntries, measured).
      const int64_t ticket_nnz = ptr[(tile.ticket + 1) * n_out] - ptr[tile.ticket * n_out];
      a.n_chunks = ticket_nnz >= kMinChunkEntries * n_out * n_chunks ? n_chunks : 1;
      a.idx = idx;
      a.xt = buf + off[b];
      a.xt_stride = tile.width;
      a.width = tile.width;
      a.nrows = tile.nrows;
      a.out_rows = out_rows;
      a.out = out;
      a.out_ch_stride = 0;
      a.bias = bias;
      a.o_begin = blk * kOutBlock;
      a.o_end = std::min(n_out, a.o_begin + kOutBlock);
      kernels.spmm_tile(a);
    }
  }
}

// Tiles of one ticket are consecutive: ticket t owns tiles [result[t], result[t + 1]).
template <typename TileT>
std::vector<int64_t> tiles_by_ticket(const std::vector<TileT>& tiles, int64_t num_tickets) {
  std::vector<int64_t> begin(num_tickets + 1, 0);
  for (const TileT& tile : tiles) begin[tile.ticket + 1]++;
  for (int64_t t = 0; t < num_tickets; ++t) begin[t + 1] += begin[t];
  return begin;
}

// Last phase of the weight gradients: each dw row is owned by one thread and adds its tickets' per-entry
// accumulators in ticket order: deterministic, no atomics, nothing written outside the kept entries.
void add_accumulators(const std::vector<int64_t>& tile_begin, int64_t n_out, int64_t k_in, const int64_t* csr_ptr,
                      const int32_t* csr_idx, const float* acc, float* dw, int num_threads) {
  const int64_t num_tickets = static_cast<int64_t>(tile_begin.size()) - 1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
  for (int64_t o = 0; o < n_out; ++o) {
    float* dw_o = dw + o * k_in;
    for (int64_t t = 0; t < num_tickets; ++t) {
      if (tile_begin[t] == tile_begin[t + 1]) continue;
      const int64_t row = t * n_out + o;
      for (int64_t e = csr_ptr[row]; e < csr_ptr[row + 1]; ++e) dw_o[csr_idx[e]] += acc[e];
    }
  }
}

// Weight gradient over tiles grouped by ticket. Phase 1, per (ticket, output block): sum each kept entry's tile
// dot products into one accumulator per entry (contiguous, in index order; scattered writes into dw per tile were
// cache-miss bound). Phase 2: add_accumulators. locate(b, o, row) fills row's dyt_row, xt and xt_stride for
// output o of tile b.
template <typename TileT, typename Locate>
void weight_gradient(const std::vector<TileT>& tiles, int64_t num_tickets, int64_t n_out, int64_t k_in,
                     const int64_t* csr_ptr, const int32_t* csr_idx, float* acc, float* dw, int num_threads,
                     Locate locate) {
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
        a.idx = csr_idx;
        a.e_begin = ptr[o];
        a.e_end = ptr[o + 1];
        a.acc = acc;
        kernels.sddmm_row(a);
      }
    }
  }
  add_accumulators(tile_begin, n_out, k_in, csr_ptr, csr_idx, acc, dw, num_threads);
}

}  // namespace

void routed_linear_forward(const RoutedRows& rows, int64_t n_out, int64_t k_in, const float* x, const float* w,
                           const float* bias, const int64_t* csr_ptr, const int64_t* chunk_ptr, int64_t n_chunks,
                           const int32_t* csr_idx, float* y) {
  spmm_all(rows, n_out, w, /*w_out_stride=*/k_in, /*w_in_stride=*/1, csr_ptr, chunk_ptr, n_chunks, csr_idx, x,
           k_in, bias, y);
}

void routed_linear_grad_input(const RoutedRows& rows, int64_t n_out, int64_t k_in, const float* dy,
                              const float* w, const int64_t* csc_ptr, const int64_t* chunk_ptr, int64_t n_chunks,
                              const int32_t* csc_idx, float* dx) {
  // Roles swap: outputs are the K inputs, reached through the transposed (CSC) index; w[n, k] = w[k + n * K].
  spmm_all(rows, k_in, w, /*w_out_stride=*/1, /*w_in_stride=*/k_in, csc_ptr, chunk_ptr, n_chunks, csc_idx, dy,
           n_out, nullptr, dx);
}

void routed_linear_grad_weight(const RoutedRows& rows, int64_t n_out, int64_t k_in, const float* dy,
                               const float* x, const int64_t* csr_ptr, const int32_t* csr_idx, float* dw) {
  std::vector<Tile> tiles = make_tiles(rows);
  if (tiles.empty()) return;
  std::vector<int64_t> x_off = tile_offsets(tiles, k_in);
  std::vector<int64_t> dy_off = tile_offsets(tiles, n_out);
  const int64_t nnz = csr_ptr[rows.num_tickets * n_out];
  float* xt = workspace().get(0, static_cast<size_t>(x_off.back()));
  float* dyt = workspace().get(1, static_cast<size_t>(dy_off.back()));
  float* acc = workspace().get(2, static_cast<size_t>(nnz) + 1);
  gather_transposed(rows, tiles, x_off, x, k_in, xt);
  gather_transposed(rows, tiles, dy_off, dy, n_out, dyt);

  weight_gradient(tiles, rows.num_tickets, n_out, k_in, csr_ptr, csr_idx, acc, dw, rows.num_threads,
                  [&](int64_t b, int64_t o, SddmmRow& a) {
                    const Tile& tile = tiles[b];
                    a.dyt_row = dyt + dy_off[b] + o * tile.width;
                    a.dyt_next = tile.width;
                    a.xt = xt + x_off[b];
                    a.xt_stride = tile.width;
                  });
}

// ---- convolutions over unfolded columns -------------------------------------------------------------------
// The unfolded columns of an image, (C * kh * kw, pixels), are already the transposed tile layout the kernels
// read (input i of pixel j at i * pixels + j), and NCHW outputs take the kernels' (outputs, rows) block as it
// stands: no gather or transpose pass at all, tiles are stretches of up to 64 pixels of one image.
namespace {

struct ConvTile {
  int64_t ticket;
  int64_t image;   // position in the chunk
  int64_t first;   // first pixel
  int nrows;
  int width;
};

std::vector<ConvTile> conv_tiles(const ConvChunk& c) {
  std::vector<ConvTile> tiles;
  for (int64_t t = 0; t < c.num_tickets; ++t) {
    if (!c.ticket_sparse[t]) continue;
    for (int64_t i = c.img_offsets[t]; i < c.img_offsets[t + 1]; ++i)
      for (int64_t p = 0; p < c.pixels; p += kTileRows) {
        const int n = static_cast<int>(std::min<int64_t>(kTileRows, c.pixels - p));
        tiles.push_back(ConvTile{t, i, p, n, (n + 7) / 8 * 8});
      }
  }
  return tiles;
}

RoutedRows rows_view(const ConvChunk& c) {
  RoutedRows r;
  r.batch = 0;
  r.num_tickets = c.num_tickets;
  r.perm = nullptr;
  r.offsets = nullptr;
  r.ticket_sparse = c.ticket_sparse;
  r.num_threads = c.num_threads;
  return r;
}

}  // namespace

void routed_conv_spmm(const ConvChunk& c, int64_t n_out, int64_t n_in, const float* w, int64_t w_out_stride,
                      int64_t w_in_stride, const int64_t* ptr, const int64_t* chunk_ptr, int64_t n_chunks,
                      const int32_t* idx, const float* src, const int64_t* src_index, const float* bias,
                      float* out, const int64_t* out_index) {
  std::vector<ConvTile> tiles = conv_tiles(c);
  if (tiles.empty()) return;
  const RoutedRows r = rows_view(c);
  float* vals = workspace().get(1, static_cast<size_t>(ptr[c.num_tickets * n_out]) + 1);
  gather_values(r, n_out, w, w_out_stride, w_in_stride, ptr, idx, vals);
  const int64_t n_blocks = (n_out + kOutBlock - 1) / kOutBlock;
  const int64_t n_items = static_cast<int64_t>(tiles.size()) * n_blocks;
  const Isa& kernels = isa();
#pragma omp parallel for num_threads(c.num_threads) schedule(dynamic, 1)
  for (int64_t item = 0; item < n_items; ++item) {
    const ConvTile& tile = tiles[item / n_blocks];
    const int64_t blk = item % n_blocks;
    SpmmTile a;
    a.vals = vals;
    a.ptr = ptr + tile.ticket * n_out;
    a.chunk_ptr = chunk_ptr + tile.ticket * n_out * n_chunks;
    const int64_t ticket_nnz = ptr[(tile.ticket + 1) * n_out] - ptr[tile.ticket * n_out];
    a.n_chunks = ticket_nnz >= kMinChunkEntries * n_out * n_chunks ? n_chunks : 1;
    a.idx = idx;
    a.xt = src + src_index[tile.image] * n_in * c.pixels + tile.first;
    a.xt_stride = c.pixels;
    a.width = tile.width;
    a.nrows = tile.nrows;
    a.out_rows = nullptr;
    a.out = out + out_index[tile.image] * n_out * c.pixels + tile.first;
    a.out_ch_stride = c.pixels;
    a.bias = bias;
    a.o_begin = blk * kOutBlock;
    a.o_end = std::min(n_out, a.o_begin + kOutBlock);
    kernels.spmm_tile(a);
  }
}

void routed_conv_grad_weight(const ConvChunk& c, int64_t n_out, int64_t k_in, const float* dy,
                             const int64_t* dy_index, const float* cols, const int64_t* csr_ptr,
                             const int32_t* csr_idx, float* dw) {
  std::vector<ConvTile> tiles = conv_tiles(c);
  if (tiles.empty()) return;
  const int64_t nnz = csr_ptr[c.num_tickets * n_out];
  float* acc = workspace().get(2, static_cast<size_t>(nnz) + 1);
  weight_gradient(tiles, c.num_tickets, n_out, k_in, csr_ptr, csr_idx, acc, dw, c.num_threads,
                  [&](int64_t b, int64_t o, SddmmRow& a) {
                    const ConvTile& tile = tiles[b];
                    a.dyt_row = dy + (dy_index[tile.image] * n_out + o) * c.pixels + tile.first;
                    a.dyt_next = c.pixels;
                    a.xt = cols + tile.image * k_in * c.pixels + tile.first;
                    a.xt_stride = c.pixels;
                  });
}

const char* kernel_isa() { return isa().name; }

}  // namespace rtl_cpu
