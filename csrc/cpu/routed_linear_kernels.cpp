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

#include "tile_kernels.h"

#include <omp.h>

#include <algorithm>
#include <vector>

namespace rtl_cpu {
namespace {

using namespace tile;

struct Tile {
  int64_t ticket;
  int64_t first;  // position in perm of the tile's first row
  int nrows;
  int width;  // nrows rounded up to 8
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
    const int64_t t = row / n_out;  // only tickets with rows here: the glue checked their index, no other
    if (!r.ticket_sparse[t] || r.offsets[t] == r.offsets[t + 1]) continue;
    const float* w_o = w + (row % n_out) * w_out_stride;
    for (int64_t e = ptr[row]; e < ptr[row + 1]; ++e) vals[e] = w_o[static_cast<int64_t>(idx[e]) * w_in_stride];
  }
}

// out rows (of length n_out) of the sparse tickets = tiles of src (transposed, inputs n_in) times kept weights.
void spmm_all(const RoutedRows& r, int64_t n_out, const float* w, int64_t w_out_stride, int64_t w_in_stride,
              const int64_t* ptr, const int64_t* chunk_ptr, int64_t n_chunks, const int32_t* idx, const float* src,
              int64_t n_in, const float* bias, float* out) {
  std::vector<Tile> tiles = make_tiles(r);
  if (tiles.empty()) return;
  std::vector<int64_t> off = tile_offsets(tiles, n_in);
  float* buf = scratch_of<float>(kSlotA, static_cast<size_t>(off.back()));
  float* vals = scratch_of<float>(kSlotB, static_cast<size_t>(ptr[r.num_tickets * n_out]) + 1);
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
      a.out_o_stride = 0;
      a.prefetch = true;
      a.bias = bias;
      a.o_begin = blk * kOutBlock;
      a.o_end = std::min(n_out, a.o_begin + kOutBlock);
      kernels.spmm_tile(a);
    }
  }
}

}  // namespace

void routed_linear_forward(const RoutedRows& rows, int64_t n_out, int64_t k_in, const float* x, const float* w,
                           const float* bias, const int64_t* csr_ptr, const int64_t* chunk_ptr, int64_t n_chunks,
                           const int32_t* csr_idx, float* y) {
  // A ticket keeping fewer weights than half a row of x (a narrow layer: the INR's 3 outputs over 128 inputs)
  // reads each of its rows where it is: copying the rows into tiles would cost more than the few products.
  std::vector<uint8_t> tiled(rows.ticket_sparse, rows.ticket_sparse + rows.num_tickets);
  bool any_direct = false;
  for (int64_t t = 0; t < rows.num_tickets; ++t) {
    const int64_t kept = csr_ptr[(t + 1) * n_out] - csr_ptr[t * n_out];
    if (tiled[t] && 2 * kept <= k_in) {
      tiled[t] = 0;
      any_direct = true;
    }
  }
  if (any_direct) {
    // rows in batch order (x read front to back), each with its ticket, -1 for rows of other paths
    std::vector<int64_t> ticket_of_row(rows.batch, -1);
    for (int64_t t = 0; t < rows.num_tickets; ++t)
      if (rows.ticket_sparse[t] && !tiled[t])
        for (int64_t p = rows.offsets[t]; p < rows.offsets[t + 1]; ++p) ticket_of_row[rows.perm[p]] = t;
#pragma omp parallel for num_threads(rows.num_threads) schedule(static)
    for (int64_t r = 0; r < rows.batch; ++r) {
      const int64_t t = ticket_of_row[r];
      if (t < 0) continue;
      const float* x_r = x + r * k_in;
      float* y_r = y + r * n_out;
      const int64_t* ptr = csr_ptr + t * n_out;
      for (int64_t o = 0; o < n_out; ++o) {
        const float* w_o = w + o * k_in;
        float acc = bias ? bias[o] : 0.f;
        for (int64_t e = ptr[o]; e < ptr[o + 1]; ++e) acc += w_o[csr_idx[e]] * x_r[csr_idx[e]];
        y_r[o] = acc;
      }
    }
  }
  RoutedRows rest = rows;
  rest.ticket_sparse = tiled.data();
  spmm_all(rest, n_out, w, /*w_out_stride=*/k_in, /*w_in_stride=*/1, csr_ptr, chunk_ptr, n_chunks, csr_idx, x, k_in,
           bias, y);
}

void routed_linear_grad_input(const RoutedRows& rows, int64_t n_out, int64_t k_in, const float* dy, const float* w,
                              const int64_t* csc_ptr, const int64_t* chunk_ptr, int64_t n_chunks,
                              const int32_t* csc_idx, float* dx) {
  // Roles swap: outputs are the K inputs, reached through the transposed (CSC) index; w[n, k] = w[k + n * K].
  spmm_all(rows, k_in, w, /*w_out_stride=*/1, /*w_in_stride=*/k_in, csc_ptr, chunk_ptr, n_chunks, csc_idx, dy, n_out,
           nullptr, dx);
}

void routed_linear_grad_weight(const RoutedRows& rows, int64_t n_out, int64_t k_in, const float* dy, const float* x,
                               const int64_t* csr_ptr, const int32_t* csr_idx, float* dw) {
  std::vector<Tile> tiles = make_tiles(rows);
  if (tiles.empty()) return;
  std::vector<int64_t> x_off = tile_offsets(tiles, k_in);
  std::vector<int64_t> dy_off = tile_offsets(tiles, n_out);
  const int64_t nnz = csr_ptr[rows.num_tickets * n_out];
  float* xt = scratch_of<float>(kSlotA, static_cast<size_t>(x_off.back()));
  float* dyt = scratch_of<float>(kSlotB, static_cast<size_t>(dy_off.back()));
  float* acc = scratch_of<float>(kSlotC, static_cast<size_t>(nnz) + 1);
  gather_transposed(rows, tiles, x_off, x, k_in, xt);
  gather_transposed(rows, tiles, dy_off, dy, n_out, dyt);

  weight_gradient(tiles, rows.num_tickets, n_out, k_in, csr_ptr, csr_idx, csr_idx, acc, dw, rows.num_threads,
                  [&](int64_t b, int64_t o, SddmmRow& a) {
                    const Tile& tile = tiles[b];
                    a.dyt_row = dyt + dy_off[b] + o * tile.width;
                    a.dyt_next = tile.width;
                    a.xt = xt + x_off[b];
                    a.xt_stride = tile.width;
                  });
}

const char* kernel_isa() { return isa().name; }

}  // namespace rtl_cpu
