// Routed direct sparse convolution for the CPU. See routed_conv_kernels.h for the method and the contract.
#include "routed_conv_kernels.h"

#include "tile_kernels.h"

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <vector>

namespace rtl_cpu {
namespace {

using namespace tile;

// Rounding divisions for a possibly negative numerator and a positive divisor.
int64_t floor_div(int64_t a, int64_t b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
int64_t ceil_div(int64_t a, int64_t b) { return -floor_div(-a, b); }

int64_t images_of(const TicketImages& g, int64_t t) { return g.offsets[t + 1] - g.offsets[t]; }

const char* check_grouping(const TicketImages& g) {
  if (g.offsets[0] != 0 || g.offsets[g.num_tickets] != g.batch) return "ticket offsets must run from 0 to the batch";
  for (int64_t t = 0; t < g.num_tickets; ++t)
    if (g.offsets[t] > g.offsets[t + 1]) return "ticket offsets must be non-decreasing";
  for (int64_t i = 0; i < g.batch; ++i)
    if (g.perm[i] < 0 || g.perm[i] >= g.batch) return "ticket perm holds an image index outside the batch";
  return nullptr;
}

// ---- packed images ----------------------------------------------------------------------------------------------
// A packed copy of some images: dst[c][ph][j][hq][i][wq] = src[img_i][c][hq * sh + ph - top][wq * sw + delta_j - left],
// zero where that falls outside the source. Rows are split by stride phase ph; columns either by stride phase too
// (delta_j = j for j < sw: every tap then reads its plane at a shift of whole columns, and grid columns past the
// last output are computed and dropped), or by kernel column (delta_j = j * dilation for j < kw: one copy per kernel
// column, so the grid holds the outputs only). Row hq of every image in turn: the images of a ticket share each
// shifted run of the grid, and every row is one contiguous copy in (and, on the output side, out).
struct Packing {
  int64_t channels = 0, height = 0, width = 0;  // of the source
  int64_t sh = 1, sw = 1;                       // row phases; column step
  std::vector<int64_t> col_delta{0};            // source column offset of each column copy
  int64_t top = 0, left = 0;                    // zero border before the source
  int64_t hq = 0, wq = 0;                       // rows and columns of one plane
  int64_t copies() const { return static_cast<int64_t>(col_delta.size()); }
  int64_t phases() const { return sh * copies(); }  // planes per channel
  int64_t plane() const { return hq * wq; }
  int64_t per_image() const { return channels * phases() * plane(); }
};

// An unsplit copy with a zero border: channels planes of hq x wq, the source at (top, left).
Packing bordered(int64_t channels, int64_t height, int64_t width, int64_t top, int64_t left, int64_t hq, int64_t wq) {
  Packing p;
  p.channels = channels;
  p.height = height;
  p.width = width;
  p.top = top;
  p.left = left;
  p.hq = hq;
  p.wq = wq;
  return p;
}

// Eight floats as one value: two SSE registers in the baseline build (this file is not compiled per ISA).
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

// Packs channel c of the n images imgs[0 .. n) of src into dst (the ticket's packed block). Each packed row is
// either a border row (zeros) or one source row: zeros, then columns [lo, hi) of the copy read at a fixed step,
// then zeros. Rows of at most 8 columns read at step 1 (maps of 8x8 and smaller) are copied as one 8-float load,
// masked to [lo, hi), and one 8-float store that runs into the next rows, which are written after it; rows whose
// load would read outside the source, and the rows whose store would pass the end of this packed row block, take
// plain loops (library calls and per-element tables cost more than the copies on tiny maps).
// src_extent: one past the last float the source's shape and strides reach from src.
void pack_channel(const Packing& p, const float* src, Strides4 ss, int64_t src_extent, const int64_t* imgs, int64_t n,
                  int64_t c, float* dst) {
  const int64_t wq = p.wq, copies = p.copies(), step = p.sw * ss.w;
  float* d_c = dst + c * p.phases() * p.plane() * n;
  for (int64_t j = 0; j < copies; ++j) {
    // columns k of this copy inside the source: col = k * sw + delta_j - left in [0, width)
    const int64_t first = p.col_delta[j] - p.left;
    const int64_t lo = std::min(wq, std::max<int64_t>(0, ceil_div(-first, p.sw)));
    const int64_t hi = std::min(wq, std::max(lo, ceil_div(p.width - first, p.sw)));
    const int64_t col0 = (lo * p.sw + first) * ss.w;  // source offset of column lo
    const bool vector_rows = step == 1 && wq <= 8;
    v8i keep{};
    for (int k = 0; k < 8; ++k) keep[k] = k >= lo && k < hi ? -1 : 0;
    // images from this one on store their row with plain loops (8 floats from them would pass the block's end)
    const int64_t vector_end = n - (8 + wq - 1) / wq + 1;
    for (int64_t ph = 0; ph < p.sh; ++ph)
      for (int64_t hq = 0; hq < p.hq; ++hq) {
        float* d = d_c + ((ph * copies + j) * p.hq + hq) * n * wq;
        const int64_t r = hq * p.sh + ph - p.top;
        if (r < 0 || r >= p.height) {
          std::fill(d, d + n * wq, 0.f);
          continue;
        }
        for (int64_t i = 0; i < n; ++i, d += wq) {
          const int64_t offset = c * ss.c + imgs[i] * ss.n + r * ss.h + col0;
          const float* s = src + offset;
          if (vector_rows && i < vector_end && offset - lo >= 0 && offset - lo + 8 <= src_extent) {
            v8f v;
            std::memcpy(&v, src + (offset - lo), sizeof(v));
            v = reinterpret_cast<v8f>(reinterpret_cast<v8i>(v) & keep);
            std::memcpy(d, &v, sizeof(v));
            continue;
          }
          int64_t k = 0;
          for (; k < lo; ++k) d[k] = 0.f;
          if (step == 1) {
            for (; k < hi; ++k) d[k] = s[k - lo];
          } else {
            for (; k < hi; ++k) d[k] = s[(k - lo) * step];
          }
          for (; k < wq; ++k) d[k] = 0.f;
        }
      }
  }
}

// Where the tiles of a grid read their operand (x for the forward and weight gradient, dy for the input gradient).
// Packed: each run ticket's images copied into one block (tap offsets then depend on the ticket's image count n).
// In place: pointwise convs over dense row-major planes read the tensor itself, one image per grid (n = 1).
struct Operand {
  bool in_place = false;
  const float* data = nullptr;
  std::vector<int64_t> base;  // packed: (T + 1) float offset of each ticket's block (empty for tickets not run)
  Strides4 strides{};         // in place: the tensor's
};

// Tickets run here: computed ones with images.
std::vector<int64_t> run_tickets(const TicketImages& g) {
  std::vector<int64_t> run;
  for (int64_t t = 0; t < g.num_tickets; ++t)
    if (g.computed[t] && images_of(g, t) > 0) run.push_back(t);
  return run;
}

// Packs the images of every run ticket into scratch slot `slot`; `slack` zeros follow the last block, for reads
// of dropped grid positions and of partial tiles past it.
Operand pack(const Packing& p, const TicketImages& g, const std::vector<int64_t>& run, const float* src, Strides4 ss,
             int slot, int64_t slack) {
  Operand op;
  op.base.assign(g.num_tickets + 1, 0);
  for (int64_t t = 0; t < g.num_tickets; ++t)
    op.base[t + 1] = op.base[t] + (g.computed[t] ? p.per_image() * images_of(g, t) : 0);
  float* buf = scratch_of<float>(slot, static_cast<size_t>(op.base.back() + slack));
  std::fill(buf + op.base.back(), buf + op.base.back() + slack, 0.f);
  const int64_t n_items = static_cast<int64_t>(run.size()) * p.channels;
  const int64_t extent =
      (g.batch - 1) * ss.n + (p.channels - 1) * ss.c + (p.height - 1) * ss.h + (p.width - 1) * ss.w + 1;
#pragma omp parallel for num_threads(g.num_threads) schedule(dynamic, 1)
  for (int64_t item = 0; item < n_items; ++item) {
    const int64_t t = run[item / p.channels], c = item % p.channels;
    pack_channel(p, src, ss, extent, g.perm + g.offsets[t], images_of(g, t), c, buf + op.base[t]);
  }
  op.data = buf;
  return op;
}

Operand in_place(const float* data, Strides4 s) {
  Operand op;
  op.in_place = true;
  op.data = data;
  op.strides = s;
  return op;
}

// A pointwise conv (1x1, stride 1, no padding) over planes of h x w floats stored row after row, whose size is a
// whole number of 8-float vectors (a partial tile would read past the last plane), reads its operand in place.
bool reads_in_place(const ConvShape& s, Strides4 st, int64_t h, int64_t w) {
  return s.kernel_h == 1 && s.kernel_w == 1 && s.stride_h == 1 && s.stride_w == 1 && s.pad_h == 0 && s.pad_w == 0 &&
         st.w == 1 && st.h == w && (h * w) % 8 == 0;
}

// ---- grids and tiles --------------------------------------------------------------------------------------------
// A run of up to 64 consecutive positions of one grid: `rows` rows of `cols` columns for each of n images,
// position q = (row * n + i) * cols + col (n = 1 for an operand read in place: one grid per image).
struct GridTile {
  int64_t ticket;
  int64_t phase;
  const float* src;   // the operand at the tile's first position
  const float* src2;  // the weight gradient's dy grid at the tile's first position (output channel 0)
  int nrows;
  int width;
  int64_t first_run;  // the tile's runs of consecutive outputs: runs[first_run .. first_run + n_runs)
  int n_runs;
};

// Appends the runs of consecutive offsets in out_rows[0 .. nrows) (positions at -1 dropped) to runs.
int append_runs(const int64_t* out_rows, int nrows, std::vector<OutRun>& runs) {
  int count = 0;
  for (int j = 0; j < nrows;) {
    if (out_rows[j] < 0) {
      ++j;
      continue;
    }
    int len = 1;
    while (j + len < nrows && out_rows[j + len] == out_rows[j] + len) ++len;
    runs.push_back(OutRun{out_rows[j], j, len});
    ++count;
    j += len;
  }
  return count;
}

struct Grid {
  int64_t phase = 0;
  int64_t first_row = 0, rows = 0, cols = 0;
  int64_t operand_cols = 0;  // packed operand: columns of its rows (the grid starts first_row rows in)
};

// Appends the tiles of grid `gr` over every run ticket, and (with_dest) for each tile the output offset of each
// position: dest(first_row + row, col, image), or -1 for a position that is not an output. op2, when given, is
// laid out like the grid itself (packed with the grid's columns, or in place like op).
template <bool with_dest, typename Dest>
void grid_tiles(const TicketImages& g, const std::vector<int64_t>& run, const Operand& op, const Operand* op2,
                const Grid& gr, Dest dest, std::vector<GridTile>& tiles, std::vector<OutRun>& out_runs) {
  int64_t out_rows[kTileRows];
  auto emit = [&](int64_t t, const float* base, const float* base2, const int64_t* imgs, int64_t n) {
    const int64_t len = gr.rows * gr.cols * n;
    for (int64_t q0 = 0; q0 < len; q0 += kTileRows) {
      const int nrows = static_cast<int>(std::min<int64_t>(kTileRows, len - q0));
      tiles.push_back(GridTile{t, gr.phase, base + q0, base2 ? base2 + q0 : nullptr, nrows, (nrows + 7) / 8 * 8,
                               static_cast<int64_t>(out_runs.size()), 0});
      if (!with_dest) continue;
      int64_t col = q0 % gr.cols, i = (q0 / gr.cols) % n, row = gr.first_row + q0 / gr.cols / n;
      for (int j = 0; j < nrows; ++j) {
        out_rows[j] = dest(row, col, imgs[i]);
        if (++col == gr.cols) {
          col = 0;
          if (++i == n) {
            i = 0;
            ++row;
          }
        }
      }
      tiles.back().n_runs = append_runs(out_rows, nrows, out_runs);
    }
  };
  for (int64_t t : run) {
    const int64_t n = images_of(g, t);
    const int64_t* imgs = g.perm + g.offsets[t];
    if (op.in_place) {
      for (int64_t i = 0; i < n; ++i)
        emit(t, op.data + imgs[i] * op.strides.n, op2 ? op2->data + imgs[i] * op2->strides.n : nullptr, imgs + i, 1);
    } else {
      emit(t, op.data + op.base[t] + gr.first_row * n * gr.operand_cols, op2 ? op2->data + op2->base[t] : nullptr, imgs,
           n);
    }
  }
}

// ---- kept weights -------------------------------------------------------------------------------------------------
// Checks the rows (t * rows + r) of the run tickets in an index as the kernels will read them: pointers
// non-decreasing inside [0, nnz], at most limit entries a row, entries in [0, limit). Every call checks (a few percent of a call): a bad index
// must never make a kernel read outside its buffers.
const char* check_index(const TicketImages& g, const std::vector<int64_t>& run, int64_t rows, const int64_t* ptr,
                        const int32_t* idx, int64_t nnz, int64_t limit) {
  if (ptr[0] != 0 || ptr[g.num_tickets * rows] != nnz) return "the index's row pointer must run from 0 to nnz";
  int bad_ptr = 0, bad_entry = 0;
  const int64_t n_items = static_cast<int64_t>(run.size()) * rows;
#pragma omp parallel for num_threads(g.num_threads) schedule(static) reduction(| : bad_ptr, bad_entry)
  for (int64_t item = 0; item < n_items; ++item) {
    const int64_t row = run[item / rows] * rows + item % rows;
    const int64_t e0 = ptr[row], e1 = ptr[row + 1];
    // a row holds each position at most once, so never more than limit entries (depthwise rows fill
    // per-thread buffers of that size)
    if (e0 < 0 || e0 > e1 || e1 > nnz || e1 - e0 > limit) {
      bad_ptr = 1;
      continue;
    }
    int32_t lo = 0, hi = 0;
    for (int64_t e = e0; e < e1; ++e) {
      lo = std::min(lo, idx[e]);
      hi = std::max(hi, idx[e]);
    }
    bad_entry |= lo < 0 || hi >= limit;
  }
  if (bad_ptr) return "the index's row pointer must be non-decreasing, with at most one entry per position a row";
  if (bad_entry) return "the conv index holds a position outside the kernel";
  return nullptr;
}

// Runs every (tile, block of outputs) through the spmm kernel in table mode: out at the tiles' positions =
// w . operand. ptr_rows(t, phase) is the index row pointer of the ticket's outputs in that phase, lut(t) its table.
template <typename PtrRows, typename Lut>
void run_spmm(const std::vector<GridTile>& tiles, const std::vector<OutRun>& out_runs, int64_t n_out, PtrRows ptr_rows,
              const int32_t* idx, Lut lut, const float* w, int64_t w_stride, int64_t rows_per_group,
              const std::vector<int64_t>& group_stride, const float* bias, float* out, int64_t out_o_stride,
              int num_threads) {
  const int64_t n_blocks = (n_out + kOutBlock - 1) / kOutBlock;
  const int64_t n_items = static_cast<int64_t>(tiles.size()) * n_blocks;
  const Isa& kernels = isa();
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
  for (int64_t item = 0; item < n_items; ++item) {
    const int64_t b = item / n_blocks, blk = item % n_blocks;
    const GridTile& tile = tiles[b];
    SpmmTile a;
    a.vals = nullptr;
    a.ptr = ptr_rows(tile.ticket, tile.phase);
    a.chunk_ptr = nullptr;
    a.n_chunks = 1;
    a.idx = idx;
    a.xt = tile.src;
    a.xt_stride = 1;
    a.width = tile.width;
    a.nrows = tile.nrows;
    a.out_rows = nullptr;
    a.runs = out_runs.data() + tile.first_run;
    a.n_runs = tile.n_runs;
    a.out = out;
    a.out_o_stride = out_o_stride;
    a.bias = bias;
    a.o_begin = blk * kOutBlock;
    a.o_end = std::min(n_out, a.o_begin + kOutBlock);
    a.w = w;
    a.w_stride = w_stride;
    a.lut = lut(tile.ticket);
    a.rows_per_group = rows_per_group;
    a.group_stride = group_stride[tile.ticket];
    a.prefetch = false;
    kernels.spmm_tile(a);
  }
}

// ---- the forward's grid ---------------------------------------------------------------------------------------
// x packed with the conv's row phases and padding, its columns split by stride phase or, `shifted`, by kernel column
// (see Packing), and the plane, row and column shift of each tap within its channel.
struct ForwardLayout {
  Packing in;
  std::vector<int64_t> tap_plane, tap_row, tap_col;  // (kh * kw)
};

ForwardLayout forward_layout(const ConvShape& s, bool shifted) {
  ForwardLayout f;
  const int64_t dh_max = (s.kernel_h - 1) * s.dil_h / s.stride_h;
  const int64_t dw_max = (s.kernel_w - 1) * s.dil_w / s.stride_w;
  Packing& p = f.in;
  p.channels = s.channels;
  p.height = s.height;
  p.width = s.width;
  p.sh = s.stride_h;
  p.sw = s.stride_w;
  p.top = s.pad_h;
  p.left = s.pad_w;
  p.col_delta.clear();
  for (int64_t j = 0; j < (shifted ? s.kernel_w : s.stride_w); ++j) p.col_delta.push_back(shifted ? j * s.dil_w : j);
  // Every valid output reads inside its own row: wo + dw <= Wo - 1 + dw_max < wq; rows likewise.
  p.hq = std::max(ceil_div(s.height + 2 * s.pad_h, s.stride_h), s.out_height + dh_max);
  p.wq = shifted ? s.out_width : std::max(ceil_div(s.width + 2 * s.pad_w, s.stride_w), s.out_width + dw_max);
  for (int64_t i = 0; i < s.kernel_h; ++i)
    for (int64_t j = 0; j < s.kernel_w; ++j) {
      const int64_t rh = i * s.dil_h, rw = j * s.dil_w;
      f.tap_plane.push_back((rh % s.stride_h) * p.copies() + (shifted ? j : rw % s.stride_w));
      f.tap_row.push_back(rh / s.stride_h);
      f.tap_col.push_back(shifted ? 0 : rw / s.stride_w);
    }
  return f;
}

// Whether the forward packs x by kernel column: when more than a fifth of a stride-phase grid's columns would be
// computed and dropped (ResNet-18's 3x3 convs on 2x2 and 4x4 maps at 64x64 inputs: half and a third), kw copies
// of x cost less than the dropped FMAs (on the 2-core EPYC, AVX2: 8.3 against 12.1 ms for 512 -> 512 channels on 2x2
// maps at 10 % density; ResNet-18's 16x16 and 8x8 maps lost 1.4-1.5x to the copies, its 7x7 stem 1.35x) ...
bool forward_shifted(const ConvShape& s) {
  const int64_t dw_max = (s.kernel_w - 1) * s.dil_w / s.stride_w;
  const int64_t wq = std::max(ceil_div(s.width + 2 * s.pad_w, s.stride_w), s.out_width + dw_max);
  // ... or where x has so few channels that kw copies of it cost little (a stem: C * kw <= 16)
  return s.kernel_w > 1 && (5 * (wq - s.out_width) > wq || (s.channels / s.groups) * s.kernel_w <= 16);
}

// Operand offsets of the kept positions k = c_local * taps + tap of every run ticket, for output channel 0's group
// (others add group * (C / groups) channel strides): lut[t][k].
std::vector<std::vector<int64_t>> forward_luts(const ConvShape& s, const ForwardLayout& f, const TicketImages& g,
                                               const std::vector<int64_t>& run, const Operand& op) {
  const int64_t taps = s.kernel_h * s.kernel_w, in_per_group = s.channels / s.groups;
  std::vector<std::vector<int64_t>> lut(g.num_tickets);
  for (int64_t t : run) {
    const int64_t n = op.in_place ? 1 : images_of(g, t);
    lut[t].resize(in_per_group * taps);
    // 64-bit: a ticket's packed block passes 2^31 floats at realistic sizes (64 channels at 226x226, 657 images)
    for (int64_t cl = 0; cl < in_per_group; ++cl)
      for (int64_t tap = 0; tap < taps; ++tap)
        lut[t][cl * taps + tap] =
            op.in_place
                ? cl * op.strides.c
                : ((cl * f.in.phases() + f.tap_plane[tap]) * f.in.hq + f.tap_row[tap]) * n * f.in.wq + f.tap_col[tap];
  }
  return lut;
}

// Channel stride of the operand, in the units of the offsets of a ticket with n images.
int64_t channel_stride(const Operand& op, const Packing& p, int64_t n) {
  return op.in_place ? op.strides.c : p.phases() * p.plane() * n;
}

// ---- depthwise convs ------------------------------------------------------------------------------------------
// Convs with one input channel per group (depthwise, with any channel multiplier m = O / C): each output channel
// reads one input plane, so the work is one (image, channel) plane at a time, through the plane loops of
// tile_loops.inc: one read of x and one write of y, as a dense depthwise conv, whatever the density.

const char* check_taps(const TicketImages& g, const std::vector<int64_t>& run, const int64_t* ptr, const int32_t* idx,
                       int64_t nnz, int64_t out_channels, int64_t taps) {
  return check_index(g, run, out_channels, ptr, idx, nnz, taps);
}

// The ticket of each image of the run tickets (-1: not run here).
std::vector<int64_t> ticket_of_image(const TicketImages& g, const std::vector<int64_t>& run) {
  std::vector<int64_t> ticket(g.batch, -1);
  for (int64_t t : run)
    for (int64_t p = g.offsets[t]; p < g.offsets[t + 1]; ++p) ticket[g.perm[p]] = t;
  return ticket;
}

// A plane's geometry and its bordered buffer (the input plane for the forward and the weight gradient, the
// accumulated input gradient for the input gradient): pad rows and columns around it, 8 strides of slack after.
struct PlaneLayout {
  int64_t hp, wp, size;
  std::vector<int64_t> tap_offset;  // (kh * kw) tap (kh, kw) at kh * dil_h * wp + kw * dil_w
};

PlaneLayout plane_layout(const ConvShape& s) {
  PlaneLayout l;
  l.hp = std::max(s.height + 2 * s.pad_h, (s.out_height - 1) * s.stride_h + (s.kernel_h - 1) * s.dil_h + 1);
  l.wp = std::max(s.width + 2 * s.pad_w, (s.out_width - 1) * s.stride_w + (s.kernel_w - 1) * s.dil_w + 1);
  l.size = l.hp * l.wp + 8 * s.stride_w + 8;
  for (int64_t i = 0; i < s.kernel_h; ++i)
    for (int64_t j = 0; j < s.kernel_w; ++j) l.tap_offset.push_back(i * s.dil_h * l.wp + j * s.dil_w);
  return l;
}

// The plane geometry and buffer width both depthwise loops read (DepthwisePlane, DepthwiseLanes).
template <typename Args>
void set_plane_geometry(Args& a, const ConvShape& s, const PlaneLayout& l) {
  a.h = s.height;
  a.w = s.width;
  a.ho = s.out_height;
  a.wo = s.out_width;
  a.stride_h = s.stride_h;
  a.stride_w = s.stride_w;
  a.pad_h = s.pad_h;
  a.pad_w = s.pad_w;
  a.wp = l.wp;
}

// The arguments every plane of a call shares: geometry, the thread's buffers, and the strides of the plane read
// (x, or dy for the input gradient). wts may be null where the weights are not read.
DepthwisePlane plane_args(const ConvShape& s, const PlaneLayout& l, float* buf, const float* wts, const int64_t* offs,
                          Strides4 in) {
  DepthwisePlane a{};
  a.x_h = in.h;
  a.x_w = in.w;
  a.wts = wts;
  a.offs = offs;
  set_plane_geometry(a, s, l);
  a.buf = buf;
  return a;
}

// Gathers the kept taps of index row `row` into wts (their weights, from w_o: the output channel's kh * kw) and
// offs (their offsets in the plane buffer); returns how many.
int gather_taps(const int64_t* ptr, const int32_t* idx, int64_t row, const float* w_o, const PlaneLayout& l, float* wts,
                int64_t* offs) {
  const int count = static_cast<int>(ptr[row + 1] - ptr[row]);
  for (int e = 0; e < count; ++e) {
    const int32_t tap = idx[ptr[row] + e];
    wts[e] = w_o[tap];
    offs[e] = l.tap_offset[tap];
  }
  return count;
}

// Whether a depthwise forward runs an image at a time with the channels as vector lanes: one output channel per
// input channel, at most 9 taps, on maps of at most 16 output pixels (GhostNet's last stages: 4x4 and 2x2). There
// a plane at a time costs more in set-up than the taps it skips; with 25 taps (5x5) the lanes' dense taps cost
// more, and on 8x8 maps the planes win (2-core EPYC, 10 % density: 240 channels 4x4 -> 2x2 1.2 vs 2.5 ms, 5x5
// 8x8 -> 4x4 1.6 vs 1.1 ms, 3x3 on 8x8 1.0 vs 0.5 ms).
bool depthwise_by_lanes(const ConvShape& s) {
  return s.out_channels == s.channels && s.kernel_h * s.kernel_w <= 9 && s.out_height * s.out_width <= 16;
}

void depthwise_forward_lanes(const ConvShape& s, const TicketImages& g, const std::vector<int64_t>& run, const float* x,
                             Strides4 xs, const float* w, const float* bias, const int64_t* ptr, const int32_t* idx,
                             float* y, Strides4 ys) {
  const int64_t taps = s.kernel_h * s.kernel_w, c = s.channels, c8 = (c + 7) / 8 * 8;
  const PlaneLayout l = plane_layout(s);
  // per run ticket, its masked weights (taps, c8): zero where pruned (a select, so an inf pruned away stays away)
  std::vector<float> wmask(g.num_tickets * taps * c8, 0.f), bias8(c8, 0.f);
  for (int64_t t : run)
    for (int64_t o = 0; o < c; ++o) {
      const int64_t row = t * c + o;
      for (int64_t e = ptr[row]; e < ptr[row + 1]; ++e) wmask[(t * taps + idx[e]) * c8 + o] = w[o * taps + idx[e]];
    }
  if (bias) std::copy(bias, bias + c, bias8.begin());
  std::vector<int64_t> tap_offset(taps);
  for (int64_t tap = 0; tap < taps; ++tap) tap_offset[tap] = l.tap_offset[tap] * c8;
  const std::vector<int64_t> ticket = ticket_of_image(g, run);
  const Isa& kernels = isa();
#pragma omp parallel num_threads(g.num_threads)
  {
    std::vector<float> buf(l.hp * l.wp * c8 + 8, 0.f);
    DepthwiseLanes a{};
    a.x_c = xs.c;
    a.x_h = xs.h;
    a.x_w = xs.w;
    a.y_c = ys.c;
    a.y_h = ys.h;
    a.y_w = ys.w;
    a.channels = c;
    a.c8 = c8;
    set_plane_geometry(a, s, l);
    a.bias8 = bias ? bias8.data() : nullptr;
    a.tap_offset = tap_offset.data();
    a.taps = taps;
    a.buf = buf.data();
#pragma omp for schedule(static)
    for (int64_t img = 0; img < g.batch; ++img) {
      if (ticket[img] < 0) continue;
      a.x = x + img * xs.n;
      a.y = y + img * ys.n;
      a.wmask = wmask.data() + ticket[img] * taps * c8;
      kernels.depthwise_lanes_image(a);
    }
  }
}

const char* depthwise_forward(const ConvShape& s, const TicketImages& g, const std::vector<int64_t>& run,
                              const float* x, Strides4 xs, const float* w, const float* bias, const int64_t* ptr,
                              const int32_t* idx, int64_t nnz, float* y, Strides4 ys) {
  const int64_t taps = s.kernel_h * s.kernel_w, m = s.out_channels / s.channels;
  if (const char* bad = check_taps(g, run, ptr, idx, nnz, s.out_channels, taps)) return bad;
  if (depthwise_by_lanes(s)) {
    depthwise_forward_lanes(s, g, run, x, xs, w, bias, ptr, idx, y, ys);
    return nullptr;
  }
  const std::vector<int64_t> ticket = ticket_of_image(g, run);
  const PlaneLayout l = plane_layout(s);
  const int64_t n_items = g.batch * s.out_channels;
  const Isa& kernels = isa();
#pragma omp parallel num_threads(g.num_threads)
  {
    std::vector<float> buf(l.size, 0.f), wts(taps);
    std::vector<int64_t> offs(taps);
    DepthwisePlane a = plane_args(s, l, buf.data(), wts.data(), offs.data(), xs);
    a.y_h = ys.h;
    a.y_w = ys.w;
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t img = item / s.out_channels, o = item % s.out_channels, t = ticket[img];
      if (t < 0) continue;
      a.count = gather_taps(ptr, idx, t * s.out_channels + o, w + o * taps, l, wts.data(), offs.data());
      a.x = x + img * xs.n + (o / m) * xs.c;
      a.y = y + img * ys.n + o * ys.c;
      a.bias = bias ? bias[o] : 0.f;
      kernels.depthwise_forward_plane(a);
    }
  }
  return nullptr;
}

const char* depthwise_grad_input(const ConvShape& s, const TicketImages& g, const std::vector<int64_t>& run,
                                 const float* dy, Strides4 dys, const float* w, const int64_t* ptr, const int32_t* idx,
                                 int64_t nnz, float* dx, Strides4 dxs) {
  const int64_t taps = s.kernel_h * s.kernel_w, m = s.out_channels / s.channels;
  if (const char* bad = check_taps(g, run, ptr, idx, nnz, s.out_channels, taps)) return bad;
  const std::vector<int64_t> ticket = ticket_of_image(g, run);
  const PlaneLayout l = plane_layout(s);
  const int64_t n_items = g.batch * s.channels;
  const Isa& kernels = isa();
#pragma omp parallel num_threads(g.num_threads)
  {
    std::vector<float> buf(l.size, 0.f), wts(taps);
    std::vector<int64_t> offs(taps);
    DepthwisePlane a = plane_args(s, l, buf.data(), wts.data(), offs.data(), dys);
#pragma omp for schedule(static)
    for (int64_t item = 0; item < n_items; ++item) {
      const int64_t img = item / s.channels, c = item % s.channels, t = ticket[img];
      if (t < 0) continue;
      std::fill(buf.begin(), buf.end(), 0.f);
      for (int64_t o = c * m; o < (c + 1) * m; ++o) {
        a.count = gather_taps(ptr, idx, t * s.out_channels + o, w + o * taps, l, wts.data(), offs.data());
        a.x = dy + img * dys.n + o * dys.c;
        kernels.depthwise_grad_input_plane(a);
      }
      float* out = dx + img * dxs.n + c * dxs.c;
      for (int64_t r = 0; r < s.height; ++r) {
        const float* src = buf.data() + (r + s.pad_h) * l.wp + s.pad_w;
        float* dst = out + r * dxs.h;
        for (int64_t k = 0; k < s.width; ++k) dst[k * dxs.w] = src[k];
      }
    }
  }
  return nullptr;
}

const char* depthwise_grad_weight(const ConvShape& s, const TicketImages& g, const std::vector<int64_t>& run,
                                  const float* dy, Strides4 dys, const float* x, Strides4 xs, const int64_t* ptr,
                                  const int32_t* idx, int64_t nnz, float* dw) {
  const int64_t taps = s.kernel_h * s.kernel_w, m = s.out_channels / s.channels;
  if (const char* bad = check_taps(g, run, ptr, idx, nnz, s.out_channels, taps)) return bad;
  const PlaneLayout l = plane_layout(s);
  const Isa& kernels = isa();
  // Each output channel is one thread's: its tickets in order, each ticket's images in order (deterministic).
#pragma omp parallel num_threads(g.num_threads)
  {
    std::vector<float> buf(l.size, 0.f), sums(taps);
    std::vector<int64_t> offs(taps);
    DepthwisePlane a = plane_args(s, l, buf.data(), nullptr, offs.data(), xs);
#pragma omp for schedule(dynamic, 1)
    for (int64_t o = 0; o < s.out_channels; ++o) {
      for (int64_t t : run) {
        const int64_t row = t * s.out_channels + o;
        a.count = static_cast<int>(ptr[row + 1] - ptr[row]);
        if (a.count == 0) continue;
        for (int e = 0; e < a.count; ++e) offs[e] = l.tap_offset[idx[ptr[row] + e]];
        std::fill(sums.begin(), sums.end(), 0.f);
        for (int64_t q = g.offsets[t]; q < g.offsets[t + 1]; ++q) {
          const int64_t img = g.perm[q];
          a.x = x + img * xs.n + (o / m) * xs.c;
          kernels.depthwise_grad_weight_plane(a, dy + img * dys.n + o * dys.c, dys.h, dys.w, sums.data());
        }
        for (int e = 0; e < a.count; ++e) dw[o * taps + idx[ptr[row] + e]] += sums[e];
      }
    }
  }
  return nullptr;
}

}  // namespace

const char* routed_conv2d_forward(const ConvShape& s, const TicketImages& g, const float* x, Strides4 xs,
                                  const float* w, const float* bias, const int64_t* csr_ptr, const int32_t* csr_idx,
                                  int64_t nnz, float* y, Strides4 ys) {
  if (const char* bad = check_grouping(g)) return bad;
  const std::vector<int64_t> run = run_tickets(g);
  if (run.empty()) return nullptr;
  if (s.channels == s.groups) return depthwise_forward(s, g, run, x, xs, w, bias, csr_ptr, csr_idx, nnz, y, ys);
  const ForwardLayout f = forward_layout(s, forward_shifted(s));
  const bool direct = reads_in_place(s, xs, s.height, s.width);
  Operand probe;
  probe.in_place = direct;
  probe.strides = xs;
  const int64_t out_per_group = s.out_channels / s.groups, in_per_group = s.channels / s.groups;
  const int64_t k_in = in_per_group * s.kernel_h * s.kernel_w;
  if (const char* bad = check_index(g, run, s.out_channels, csr_ptr, csr_idx, nnz, k_in)) return bad;

  const auto lut = forward_luts(s, f, g, run, probe);
  std::vector<int64_t> group_stride(g.num_tickets, 0);
  for (int64_t t : run) group_stride[t] = in_per_group * channel_stride(probe, f.in, images_of(g, t));
  const Operand op = direct ? in_place(x, xs) : pack(f.in, g, run, x, xs, kSlotA, f.in.wq + kTileRows);
  std::vector<GridTile> tiles;
  std::vector<OutRun> out_runs;
  Grid gr;
  gr.rows = s.out_height;
  gr.cols = direct ? s.out_width : f.in.wq;
  gr.operand_cols = f.in.wq;
  grid_tiles<true>(
      g, run, op, nullptr, gr,
      [&](int64_t ho, int64_t wo, int64_t img) -> int64_t {
        return wo < s.out_width ? img * ys.n + ho * ys.h + wo * ys.w : -1;
      },
      tiles, out_runs);
  run_spmm(
      tiles, out_runs, s.out_channels, [&](int64_t t, int64_t) { return csr_ptr + t * s.out_channels; }, csr_idx,
      [&](int64_t t) { return lut[t].data(); }, w, k_in, out_per_group, group_stride, bias, y, ys.c, g.num_threads);
  return nullptr;
}

const char* routed_conv2d_grad_input(const ConvShape& s, const TicketImages& g, const float* dy, Strides4 dys,
                                     const float* w, const int64_t* in_ptr, const int32_t* in_idx, int64_t nnz,
                                     float* dx, Strides4 dxs) {
  if (const char* bad = check_grouping(g)) return bad;
  const std::vector<int64_t> run = run_tickets(g);
  if (run.empty()) return nullptr;
  if (s.channels == s.groups) return depthwise_grad_input(s, g, run, dy, dys, w, in_ptr, in_idx, nnz, dx, dxs);
  const int64_t sh = s.stride_h, sw = s.stride_w, phases = sh * sw;
  const int64_t hm = (s.kernel_h - 1) * s.dil_h / sh, wm = (s.kernel_w - 1) * s.dil_w / sw;
  // Phase-plane rows / columns that hold x positions: a in [a_lo(ph), a_hi(ph)] with h = a * sh + ph - pad_h.
  const int64_t a_max = (s.height - 1 + s.pad_h) / sh, b_max = (s.width - 1 + s.pad_w) / sw;
  // dy, zero-bordered: hm rows above, wm columns left, and zeros right / below far enough that every read of a
  // kept position lands in dy or in zeros (a read past a row's end lands in the next row's left border).
  const Packing p = bordered(s.out_channels, s.out_height, s.out_width, hm, wm,
                             hm + std::max(a_max + 2, s.out_height + 1), std::max(b_max + 1, wm + s.out_width));
  const bool direct = reads_in_place(s, dys, s.out_height, s.out_width);
  const int64_t out_per_group = s.out_channels / s.groups, in_per_group = s.channels / s.groups;
  const int64_t taps = s.kernel_h * s.kernel_w, k_in = in_per_group * taps;
  const int64_t entries = out_per_group * taps;  // an entry is og * taps + tap, og the output within the group
  const int64_t rows = phases * s.channels;      // index rows of one ticket: (phase, c)
  if (const char* bad = check_index(g, run, rows, in_ptr, in_idx, nnz, entries)) return bad;

  // per run ticket, the operand offset of each entry (output 0 of the group: groups add group_stride)
  std::vector<std::vector<int64_t>> lut(g.num_tickets);
  std::vector<int64_t> group_stride(g.num_tickets, 0);
  for (int64_t t : run) {
    const int64_t n = direct ? 1 : images_of(g, t);
    group_stride[t] = out_per_group * (direct ? dys.c : p.plane() * n);
    lut[t].resize(entries);
    for (int64_t og = 0; og < out_per_group; ++og)
      for (int64_t tap = 0; tap < taps; ++tap) {
        const int64_t rh = (tap / s.kernel_w) * s.dil_h, rw = (tap % s.kernel_w) * s.dil_w;
        lut[t][og * taps + tap] = direct ? og * dys.c : ((og * p.hq + hm - rh / sh) * n) * p.wq + wm - rw / sw;
      }
  }
  // The weight by input channel, wt[c][og][tap]: an input channel's entries read it in order (reading w itself
  // there took a cache miss an entry, k_in floats apart: 40 % of the call on ResNet's 512-channel convs).
  float* wt = scratch_of<float>(kSlotF, static_cast<size_t>(s.channels * entries));
#pragma omp parallel for num_threads(g.num_threads) schedule(static)
  for (int64_t c = 0; c < s.channels; ++c) {
    const float* src = w + (c / in_per_group) * out_per_group * k_in + (c % in_per_group) * taps;
    float* dst = wt + c * entries;
    for (int64_t og = 0; og < out_per_group; ++og)
      for (int64_t tap = 0; tap < taps; ++tap) dst[og * taps + tap] = src[og * k_in + tap];
  }

  const Operand op = direct ? in_place(dy, dys) : pack(p, g, run, dy, dys, kSlotA, kTileRows);
  std::vector<GridTile> tiles;
  std::vector<OutRun> out_runs;
  for (int64_t ph = 0; ph < sh; ++ph)
    for (int64_t pw = 0; pw < sw; ++pw) {
      Grid gr;
      gr.phase = ph * sw + pw;
      gr.first_row = std::max<int64_t>(0, ceil_div(s.pad_h - ph, sh));
      const int64_t a_hi = floor_div(s.height - 1 + s.pad_h - ph, sh);
      if (a_hi < gr.first_row) continue;
      gr.rows = a_hi - gr.first_row + 1;
      gr.cols = direct ? s.width : p.wq;
      gr.operand_cols = p.wq;
      grid_tiles<true>(
          g, run, op, nullptr, gr,
          [&](int64_t a, int64_t bb, int64_t img) -> int64_t {
            const int64_t h = a * sh + ph - s.pad_h, wcol = bb * sw + pw - s.pad_w;
            const bool inside = h >= 0 && h < s.height && wcol >= 0 && wcol < s.width;
            return inside ? img * dxs.n + h * dxs.h + wcol * dxs.w : -1;
          },
          tiles, out_runs);
    }
  // Every x position is a * sh + ph - pad_h (and likewise for columns) for exactly one phase and one grid position:
  // every (c, h, w) of a run image is written exactly once, zero where no kept weight reaches it.
  run_spmm(
      tiles, out_runs, s.channels, [&](int64_t t, int64_t phase) { return in_ptr + (t * phases + phase) * s.channels; },
      in_idx, [&](int64_t t) { return lut[t].data(); }, wt, entries, in_per_group, group_stride, nullptr, dx, dxs.c,
      g.num_threads);
  return nullptr;
}

const char* routed_conv2d_grad_weight(const ConvShape& s, const TicketImages& g, const float* dy, Strides4 dys,
                                      const float* x, Strides4 xs, const int64_t* csr_ptr, const int32_t* csr_idx,
                                      int64_t nnz, float* dw) {
  if (const char* bad = check_grouping(g)) return bad;
  const std::vector<int64_t> run = run_tickets(g);
  if (run.empty()) return nullptr;
  if (s.channels == s.groups) return depthwise_grad_weight(s, g, run, dy, dys, x, xs, csr_ptr, csr_idx, nnz, dw);
  // x split by kernel column: the grid holds the outputs only, so no dropped position multiplies a zero dy by an
  // x that may be inf (a gradient must be non-finite only where its weight truly sees a non-finite value)
  const ForwardLayout f = forward_layout(s, true);
  const bool direct = reads_in_place(s, xs, s.height, s.width) && reads_in_place(s, dys, s.out_height, s.out_width);
  Operand probe;
  probe.in_place = direct;
  probe.strides = xs;
  const int64_t out_per_group = s.out_channels / s.groups, in_per_group = s.channels / s.groups;
  const int64_t k_in = in_per_group * s.kernel_h * s.kernel_w;
  if (const char* bad = check_index(g, run, s.out_channels, csr_ptr, csr_idx, nnz, k_in)) return bad;
  const auto lut = forward_luts(s, f, g, run, probe);

  Grid gr;
  gr.rows = s.out_height;
  gr.cols = direct ? s.out_width : f.in.wq;
  gr.operand_cols = f.in.wq;
  Operand op, dyg;
  if (direct) {
    op = in_place(x, xs);
    dyg = in_place(dy, dys);
  } else {
    op = pack(f.in, g, run, x, xs, kSlotA, f.in.wq + kTileRows);
    // dy on the forward's grid: rows Ho, each image's row in turn
    dyg = pack(bordered(s.out_channels, s.out_height, s.out_width, 0, 0, gr.rows, gr.cols), g, run, dy, dys, kSlotD,
               kTileRows);
  }
  std::vector<GridTile> tiles;
  std::vector<OutRun> unused;
  grid_tiles<false>(g, run, op, &dyg, gr, [](int64_t, int64_t, int64_t) -> int64_t { return -1; }, tiles, unused);
  float* acc = scratch_of<float>(kSlotE, static_cast<size_t>(nnz) + 1);
  weight_gradient(tiles, g.num_tickets, s.out_channels, k_in, csr_ptr, csr_idx, csr_idx, acc, dw, g.num_threads,
                  [&](int64_t bt, int64_t o, SddmmRow& a) {
                    const GridTile& tile = tiles[bt];
                    const int64_t n = images_of(g, tile.ticket);
                    // dy of output o: its channel plane in place, else its grid in the ticket's packed block
                    const int64_t o_stride = direct ? dys.c : gr.rows * gr.cols * n;
                    a.dyt_row = tile.src2 + o * o_stride;
                    a.dyt_next = o_stride;
                    a.xt = tile.src + (o / out_per_group) * in_per_group * channel_stride(probe, f.in, n);
                    a.xt_stride = 1;
                    a.lut = lut[tile.ticket].data();
                  });
  return nullptr;
}

}  // namespace rtl_cpu
