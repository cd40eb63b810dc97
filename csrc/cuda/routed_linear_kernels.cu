// Routed masked linear kernels for CUDA (declarations and shapes in routed_linear_kernels.cuh). No torch headers:
// nvcc builds this translation unit in seconds; the torch glue lives in csrc/cuda_ops.cpp.
//
// Three kernels, one 64x64 tile grid (the layout's block = the kernels' tile, so one layout entry = one step):
//   forward      y  (B, N): a thread block per (row tile of one ticket, block row nb of W); loops over the ticket's
//                           nonzero blocks (nb, kb); A = x rows gathered through perm, B = (W ⊙ M_t) block.
//   grad_input   dx (B, K): the same kernel over the transposed index: per (row tile, block column kb), loops over
//                           the ticket's nonzero blocks (nb, kb); A = dy rows, B = (W ⊙ M_t) block read transposed.
//   grad_weight  dW (N, K): a thread block per (W block, row split); loops over the tickets keeping the block and
//                           their rows; per ticket P = dy_tᵀ x_t in fp32, then total += where(M_t, P, 0).
// fp16/bf16 run on tensor cores (WMMA 16x16x16, fp32 accumulators, 4 warps each owning 32x32 of the tile); fp32
// runs a plain SIMT tile (256 threads, 4x4 outputs each, fmaf: exact fp32, no TF32).
//
// Pipelining: each thread fetches its share of the next step's tiles into registers (16-byte loads when rows are
// 16-byte aligned) while the tensor cores / FMAs work on the current step in shared memory; one barrier pair per
// step. Out-of-range rows/columns are stored as zeros in shared memory, so edge tiles need no special MMA path.
#include "routed_linear_kernels.cuh"

#include <mma.h>

#include "device_common.cuh"

#include <atomic>
#include <cstdint>
#include <string>
#include <type_traits>

namespace rtl_cuda {
namespace {

constexpr int kTile = 64;
static_assert(kBlockM == kTile && kBlockN == kTile && kBlockK == kTile, "the kernels are written for 64x64x64 tiles");
constexpr unsigned kFullWarp = 0xffffffffu;

// How the threads of a block share the global loads of one 64x64 tile: each thread owns one 16-byte column chunk
// (kVec elements) in kRowsPerThread rows kRowStep apart, so a warp reads whole 128/256-byte row segments.
template <typename T>
struct TileCfg {
  static constexpr int kVec = 16 / static_cast<int>(sizeof(T));          // 8 (16-bit) or 4 (fp32)
  static constexpr int kThreads = std::is_same_v<T, float> ? 256 : 128;  // SIMT fp32: 4x4 outputs a thread
  static constexpr int kChunksPerRow = kTile / kVec;                     // 8 or 16
  static constexpr int kRowStep = kThreads / kChunksPerRow;              // 16
  static constexpr int kRowsPerThread = kTile / kRowStep;                // 4
  // One mask byte per element of a chunk, loaded as one word.
  using MaskWord = std::conditional_t<kVec == 8, unsigned long long, unsigned int>;
  static_assert(kThreads % kChunksPerRow == 0 && kTile % kRowStep == 0, "tile split");
};

// 16 bytes of a row: kVec elements, kept as an int4 so loads/stores are single 128-bit instructions.
struct Chunk {
  int4 raw;
};

template <typename T>
__device__ __forceinline__ T* elems(Chunk& c) {
  return reinterpret_cast<T*>(&c.raw);
}

// Chunk of row[col .. col + kVec) (zeros past ncols or when row is null). `vec`: ncols is a multiple of kVec and
// the matrix base is 16-byte aligned, so every in-range chunk is one aligned 16-byte load.
template <typename T>
__device__ __forceinline__ void fetch_chunk(Chunk& c, const T* row, int64_t col, int64_t ncols, bool vec) {
  constexpr int V = TileCfg<T>::kVec;
  if (row != nullptr && vec && col < ncols) {
    c.raw = __ldg(reinterpret_cast<const int4*>(row + col));
  } else {
    T* e = elems<T>(c);
#pragma unroll
    for (int j = 0; j < V; ++j) e[j] = (row != nullptr && col + j < ncols) ? row[col + j] : Num<T>::from_f(0.f);
  }
}

// Mask bytes row[col .. col + kVec) as one word (byte j nonzero = element j kept); 0 past ncols or for a null row.
template <typename T>
__device__ __forceinline__ typename TileCfg<T>::MaskWord fetch_mask(const uint8_t* row, int64_t col, int64_t ncols,
                                                                    bool vec) {
  using Word = typename TileCfg<T>::MaskWord;
  constexpr int V = TileCfg<T>::kVec;
  if (row == nullptr || col >= ncols) return 0;
  if (vec) return __ldg(reinterpret_cast<const Word*>(row + col));
  Word word = 0;
#pragma unroll
  for (int j = 0; j < V; ++j)
    if (col + j < ncols && row[col + j] != 0) word |= Word(1) << (8 * j);
  return word;
}

// Pruned weights become zeros (a select, not a multiply: a NaN/inf in a pruned weight must not leak).
template <typename T>
__device__ __forceinline__ void apply_mask(Chunk& c, typename TileCfg<T>::MaskWord m) {
  T* e = elems<T>(c);
#pragma unroll
  for (int j = 0; j < TileCfg<T>::kVec; ++j)
    if (((m >> (8 * j)) & 0xffu) == 0) e[j] = Num<T>::from_f(0.f);
}

// ---------------------------------------------------------------------------------------------------------------
// Row tiles: tile i of the grid is the i-th 64-row tile when the tickets' rows are cut into cdiv(count_t, 64)
// tiles each, tickets in order. Each warp finds its tile from offsets alone (no planning kernel, no host sync):
// a round reads 32 tickets' offsets, scans their tile counts with shuffles and stops at the first ticket whose
// cumulative count passes i; one round for T <= 32 (the paper uses T = 3-10). Every warp computes the same answer,
// so no shared memory or barrier is needed and the block can exit uniformly.
// ---------------------------------------------------------------------------------------------------------------
__device__ bool find_row_tile(const int64_t* offsets, int64_t num_tickets, int64_t tile, int64_t& ticket, int64_t& row0,
                              int& rows) {
  const int lane = threadIdx.x & 31;
  int64_t before = 0;  // tiles of the tickets of earlier rounds
  for (int64_t base = 0; base < num_tickets; base += 32) {
    const int64_t t = base + lane;
    int64_t lo = 0, hi = 0;
    if (t < num_tickets) {
      lo = offsets[t];
      hi = offsets[t + 1];
    }
    const int64_t count = hi > lo ? (hi - lo + kTile - 1) / kTile : 0;
    int64_t incl = count;  // inclusive scan of the tile counts over the lanes
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const int64_t v = __shfl_up_sync(kFullWarp, incl, d);
      if (lane >= d) incl += v;
    }
    const unsigned hit = __ballot_sync(kFullWarp, t < num_tickets && before + incl > tile);
    if (hit != 0) {
      const int src = __ffs(static_cast<int>(hit)) - 1;  // the first such lane has count > 0
      const int64_t first = __shfl_sync(kFullWarp, before + incl - count, src);
      lo = __shfl_sync(kFullWarp, lo, src);
      hi = __shfl_sync(kFullWarp, hi, src);
      ticket = base + src;
      row0 = lo + (tile - first) * kTile;
      rows = static_cast<int>(hi - row0 < kTile ? hi - row0 : kTile);
      return true;
    }
    before += __shfl_sync(kFullWarp, incl, 31);
  }
  return false;  // past the last tile: the grid is an upper bound
}

// ---------------------------------------------------------------------------------------------------------------
// forward / grad_input
// ---------------------------------------------------------------------------------------------------------------
struct MmArgs {
  const void* a;           // (B, a_cols): x (forward, a_cols = K) or dy (grad_input, a_cols = N)
  const void* w;           // (N, K)
  const uint8_t* masks;    // (T, N, K)
  const void* bias;        // (N) or null; forward only
  const int64_t* perm;     // (B)
  const int64_t* offsets;  // (T + 1)
  const int32_t* ptr;      // (T * out_blocks + 1): row_ptr (forward) or t_col_ptr (grad_input)
  const int32_t* idx;      // (nnz): col_idx (block kb) or t_row_idx (block nb)
  const int8_t* full;      // (nnz)
  void* out;               // (B, out_cols): y (out_cols = N) or dx (out_cols = K)
  int64_t n, k, num_tickets, out_blocks;
  bool a_vec, w_vec;  // 16-byte loads allowed for a / for w and the masks
};

// Per-thread register stage of one step (one layout entry): a chunk of the A tile, of the W tile and its mask.
template <typename T>
struct MmStage {
  static constexpr int R = TileCfg<T>::kRowsPerThread;
  Chunk a[R];
  Chunk w[R];
  typename TileCfg<T>::MaskWord m[R];
};

// Loads step e: A columns = block ib of the inner dimension; W block (nb, kb) = (ob, ib) forward, (ib, ob) dx.
template <typename T, bool kGradInput>
__device__ __forceinline__ void fetch_mm_step(const MmArgs& args, int64_t e, int64_t ob,
                                              const T* const (&a_row)[TileCfg<T>::kRowsPerThread],
                                              const uint8_t* mask_t, int cc, int r_first, MmStage<T>& st) {
  using Cfg = TileCfg<T>;
  using Word = typename Cfg::MaskWord;
  const T* w = static_cast<const T*>(args.w);
  const int64_t ib = args.idx[e];
  const bool full = args.full[e] != 0;
  const int64_t n0 = (kGradInput ? ib : ob) * kTile;
  const int64_t k0 = (kGradInput ? ob : ib) * kTile;
  const int64_t a_cols = kGradInput ? args.n : args.k;
#pragma unroll
  for (int i = 0; i < Cfg::kRowsPerThread; ++i) fetch_chunk<T>(st.a[i], a_row[i], ib * kTile + cc, a_cols, args.a_vec);
#pragma unroll
  for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
    const int64_t n = n0 + r_first + i * Cfg::kRowStep;
    const bool valid = n < args.n;
    fetch_chunk<T>(st.w[i], valid ? w + n * args.k : nullptr, k0 + cc, args.k, args.w_vec);
    // A full block skips its mask tile (1 byte a weight: a third of a 16-bit W tile's traffic).
    st.m[i] = full ? ~Word(0) : fetch_mask<T>(valid ? mask_t + n * args.k : nullptr, k0 + cc, args.k, args.w_vec);
  }
}

// The batch row of each row of this block's tile (s_rows, the scatter targets) and the input rows of this thread's
// chunks (a_row, null past the tile's rows), gathered through perm.
template <typename T, bool kGradInput>
__device__ __forceinline__ void gather_tile_rows(const MmArgs& args, int64_t row0, int rows, int tid, int64_t* s_rows,
                                                 const T* (&a_row)[TileCfg<T>::kRowsPerThread]) {
  using Cfg = TileCfg<T>;
  const T* a = static_cast<const T*>(args.a);
  const int64_t a_cols = kGradInput ? args.n : args.k;
  const int r_first = tid / Cfg::kChunksPerRow;
  for (int r = tid; r < kTile; r += Cfg::kThreads) s_rows[r] = r < rows ? args.perm[row0 + r] : 0;
#pragma unroll
  for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
    const int r = r_first + i * Cfg::kRowStep;
    a_row[i] = r < rows ? a + args.perm[row0 + r] * a_cols : nullptr;
  }
}

// Tensor-core kernel (fp16/bf16). Grid (row_tile_bound(B, T), out_blocks), 128 threads.
template <typename T, bool kGradInput>
__global__ void __launch_bounds__(128) routed_mm_tc_kernel(const MmArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80+; device_problem() keeps the backend off such GPUs
#else
  using namespace nvcuda;
  using Cfg = TileCfg<T>;
  constexpr int NT = 128;
  static_assert(Cfg::kThreads == NT, "tensor-core tile uses 4 warps");
  // Row strides padded by 16 bytes: rows stay 16-byte aligned for int4 stores and WMMA's 32-byte fragment
  // pointers, and consecutive rows start in different banks.
  constexpr int LD = kTile + 8;
  constexpr int LDC = kTile + 4;
  constexpr int kOperandBytes = 2 * kTile * LD * static_cast<int>(sizeof(T));
  constexpr int kAccBytes = kTile * LDC * static_cast<int>(sizeof(float));
  // The fp32 result tile reuses the operand tiles' memory once the last MMA is done (36 KB -> 18 KB).
  __shared__ __align__(128) unsigned char smem[kOperandBytes > kAccBytes ? kOperandBytes : kAccBytes];
  __shared__ int64_t s_rows[kTile];  // batch row of each tile row (scatter target)
  T* As = reinterpret_cast<T*>(smem);
  T* Ws = As + kTile * LD;
  float* Cs = reinterpret_cast<float*>(smem);

  int64_t ticket, row0;
  int rows;
  if (!find_row_tile(args.offsets, args.num_tickets, blockIdx.x, ticket, row0, rows)) return;

  const int64_t ob = blockIdx.y;
  const int64_t out_cols = kGradInput ? args.k : args.n;
  const uint8_t* mask_t = args.masks + ticket * args.n * args.k;
  const int tid = threadIdx.x;
  const int cc = (tid % Cfg::kChunksPerRow) * Cfg::kVec;
  const int r_first = tid / Cfg::kChunksPerRow;
  const T* a_row[Cfg::kRowsPerThread];
  gather_tile_rows<T, kGradInput>(args, row0, rows, tid, s_rows, a_row);

  const int64_t list = ticket * args.out_blocks + ob;
  const int64_t e_begin = args.ptr[list], e_end = args.ptr[list + 1];

  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;  // this warp's 32x32 of the 64x64 output tile
  using BLayout = std::conditional_t<kGradInput, wmma::row_major, wmma::col_major>;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

  MmStage<T> st;
  if (e_begin < e_end) fetch_mm_step<T, kGradInput>(args, e_begin, ob, a_row, mask_t, cc, r_first, st);
  for (int64_t e = e_begin; e < e_end; ++e) {
    __syncthreads();  // the previous step's MMAs are done reading As/Ws
#pragma unroll
    for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
      const int r = r_first + i * Cfg::kRowStep;
      *reinterpret_cast<int4*>(As + r * LD + cc) = st.a[i].raw;
      apply_mask<T>(st.w[i], st.m[i]);
      *reinterpret_cast<int4*>(Ws + r * LD + cc) = st.w[i].raw;
    }
    __syncthreads();
    if (e + 1 < e_end) fetch_mm_step<T, kGradInput>(args, e + 1, ob, a_row, mask_t, cc, r_first, st);
#pragma unroll
    for (int kk = 0; kk < kTile; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], As + (wm * 32 + 16 * i) * LD + kk, LD);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const int c0 = wn * 32 + 16 * j;
        // Ws holds W[n][k]. forward: B(k, n) = Ws[n][k] (col-major); grad_input: B(n, k) = Ws[n][k] (row-major).
        const T* p = kGradInput ? Ws + kk * LD + c0 : Ws + c0 * LD + kk;
        wmma::load_matrix_sync(fb[j], p, LD);
      }
#pragma unroll
      for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
  }
  __syncthreads();  // Cs aliases As/Ws; also publishes s_rows when the ticket has no block in this row/column
#pragma unroll
  for (int i = 0; i < 2; ++i)
#pragma unroll
    for (int j = 0; j < 2; ++j)
      wmma::store_matrix_sync(Cs + (wm * 32 + 16 * i) * LDC + wn * 32 + 16 * j, acc[i][j], LDC, wmma::mem_row_major);
  __syncthreads();

  // Epilogue: bias in fp32, one rounding, scatter to the rows' batch positions (consecutive threads write
  // consecutive columns of one row). A ticket with no kept block here still writes bias (or zeros).
  T* out = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
  for (int idx = tid; idx < kTile * kTile; idx += NT) {
    const int r = idx / kTile, c = idx % kTile;
    const int64_t col = ob * kTile + c;
    if (r < rows && col < out_cols) {
      float v = Cs[r * LDC + c];
      if (bias != nullptr) v += Num<T>::to_f(bias[col]);
      out[s_rows[r] * out_cols + col] = Num<T>::from_f(v);
    }
  }
#endif
}

// SIMT fp32 kernel: same structure, 256 threads, thread (tx, ty) owns outputs (ty + 16 i, tx + 16 j).
template <bool kGradInput>
__global__ void __launch_bounds__(256) routed_mm_simt_kernel(const MmArgs args) {
  using Cfg = TileCfg<float>;
  constexpr int NT = 256;
  static_assert(Cfg::kThreads == NT, "SIMT tile uses 256 threads");
  // Stride 65: column reads Ws[(tx + 16 j) * 65 + kk] of 16 threads hit 16 different banks.
  constexpr int LD = kTile + 1;
  __shared__ float As[kTile * LD];
  __shared__ float Ws[kTile * LD];
  __shared__ int64_t s_rows[kTile];

  int64_t ticket, row0;
  int rows;
  if (!find_row_tile(args.offsets, args.num_tickets, blockIdx.x, ticket, row0, rows)) return;

  const int64_t ob = blockIdx.y;
  const int64_t out_cols = kGradInput ? args.k : args.n;
  const uint8_t* mask_t = args.masks + ticket * args.n * args.k;
  const int tid = threadIdx.x;
  const int cc = (tid % Cfg::kChunksPerRow) * Cfg::kVec;
  const int r_first = tid / Cfg::kChunksPerRow;
  const int tx = tid % 16, ty = tid / 16;
  const float* a_row[Cfg::kRowsPerThread];
  gather_tile_rows<float, kGradInput>(args, row0, rows, tid, s_rows, a_row);

  const int64_t list = ticket * args.out_blocks + ob;
  const int64_t e_begin = args.ptr[list], e_end = args.ptr[list + 1];

  float acc[4][4];
  zero_4x4(acc);

  MmStage<float> st;
  if (e_begin < e_end) fetch_mm_step<float, kGradInput>(args, e_begin, ob, a_row, mask_t, cc, r_first, st);
  for (int64_t e = e_begin; e < e_end; ++e) {
    __syncthreads();
#pragma unroll
    for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
      const int r = r_first + i * Cfg::kRowStep;
      apply_mask<float>(st.w[i], st.m[i]);
      const float* ea = elems<float>(st.a[i]);
      const float* ew = elems<float>(st.w[i]);
#pragma unroll
      for (int j = 0; j < Cfg::kVec; ++j) {
        As[r * LD + cc + j] = ea[j];
        Ws[r * LD + cc + j] = ew[j];
      }
    }
    __syncthreads();
    if (e + 1 < e_end) fetch_mm_step<float, kGradInput>(args, e + 1, ob, a_row, mask_t, cc, r_first, st);
#pragma unroll 8
    for (int kk = 0; kk < kTile; ++kk) {
      float av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = As[(ty + 16 * i) * LD + kk];
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = kGradInput ? Ws[kk * LD + tx + 16 * j] : Ws[(tx + 16 * j) * LD + kk];
      fma_4x4(acc, av, bv);
    }
  }
  __syncthreads();  // publishes s_rows when the loop ran zero times

  float* out = static_cast<float*>(args.out);
  const float* bias = static_cast<const float*>(args.bias);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = ty + 16 * i;
    if (r >= rows) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = ob * kTile + tx + 16 * j;
      if (col < out_cols) out[s_rows[r] * out_cols + col] = acc[i][j] + (bias != nullptr ? bias[col] : 0.f);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// grad_weight
// ---------------------------------------------------------------------------------------------------------------
struct GwArgs {
  const void* dy;          // (B, N)
  const void* x;           // (B, K)
  const uint8_t* masks;    // (T, N, K)
  const int64_t* perm;     // (B)
  const int64_t* offsets;  // (T + 1)
  const int32_t* w_ptr;    // (NB * KB + 1)
  const int32_t* w_tickets;
  void* out;       // (N, K) in the element type, when partial is null
  float* partial;  // (splits, N, K) fp32, when splits > 1
  int64_t n, k, batch, kb_count, rows_per_split;
  bool dy_vec, x_vec;
};

// Per-thread register stage of 64 sorted rows: chunks of the dy tile (rows x 64 outputs) and of the x tile.
template <typename T>
struct GwStage {
  static constexpr int R = TileCfg<T>::kRowsPerThread;
  Chunk d[R];
  Chunk x[R];
};

// Rows p = r0 + m (sorted positions) for m < 64, only p < hi (the ticket's rows inside this split).
template <typename T>
__device__ __forceinline__ void fetch_gw_step(const GwArgs& args, int64_t r0, int64_t hi, int64_t n0, int64_t k0,
                                              int cc, int r_first, GwStage<T>& st) {
  using Cfg = TileCfg<T>;
  const T* dy = static_cast<const T*>(args.dy);
  const T* x = static_cast<const T*>(args.x);
#pragma unroll
  for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
    const int64_t p = r0 + r_first + i * Cfg::kRowStep;
    const int64_t row = p < hi ? args.perm[p] : -1;
    fetch_chunk<T>(st.d[i], row >= 0 ? dy + row * args.n : nullptr, n0 + cc, args.n, args.dy_vec);
    fetch_chunk<T>(st.x[i], row >= 0 ? x + row * args.k : nullptr, k0 + cc, args.k, args.x_vec);
  }
}

// The sorted rows of ticket t that fall in this block's split: [lo, hi) (empty when lo >= hi).
__device__ __forceinline__ void split_rows(const GwArgs& args, int64_t t, int64_t& lo, int64_t& hi) {
  const int64_t p_lo = static_cast<int64_t>(blockIdx.y) * args.rows_per_split;
  const int64_t p_hi = p_lo + args.rows_per_split;
  lo = args.offsets[t];
  hi = args.offsets[t + 1];
  if (lo < p_lo) lo = p_lo;
  if (hi > p_hi) hi = p_hi;
}

// Tensor-core grad_weight (fp16/bf16). Grid (NB * KB, splits), 128 threads.
template <typename T>
__global__ void __launch_bounds__(128) grad_weight_tc_kernel(const GwArgs args) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using namespace nvcuda;
  using Cfg = TileCfg<T>;
  constexpr int NT = 128;
  constexpr int LD = kTile + 8;
  constexpr int LDC = kTile + 4;
  constexpr int kPerThread = kTile * kTile / NT;    // 32 outputs of the W block a thread owns in the epilogue
  __shared__ __align__(128) T Ds[kTile * LD];       // dy tile [m][n]
  __shared__ __align__(128) T Xs[kTile * LD];       // x tile [m][k]
  __shared__ __align__(128) float Cs[kTile * LDC];  // one ticket's fp32 product, for the mask select

  const int64_t blk = blockIdx.x;
  const int64_t n0 = (blk / args.kb_count) * kTile, k0 = (blk % args.kb_count) * kTile;
  const int tid = threadIdx.x;
  const int cc = (tid % Cfg::kChunksPerRow) * Cfg::kVec;
  const int r_first = tid / Cfg::kChunksPerRow;
  const int warp = tid / 32, wm = warp / 2, wn = warp % 2;  // this warp's 32 (n) x 32 (k) of the block

  // Epilogue ownership: column kl, rows nl0 + 2 q (q < kPerThread) of the block; q_end cuts the rows past N.
  constexpr int kRowsPerQ = NT / kTile;  // 2
  const int kl = tid % kTile, nl0 = tid / kTile;
  const bool k_in = k0 + kl < args.k;
  const int64_t rows_left = args.n - n0 - nl0;  // > 0 for nl0 = 0; may be <= 0 for nl0 = 1 when one row is left
  const int q_end = rows_left <= 0 ? 0 : static_cast<int>((rows_left + kRowsPerQ - 1) / kRowsPerQ);
  float total[kPerThread];
#pragma unroll
  for (int q = 0; q < kPerThread; ++q) total[q] = 0.f;

  const int64_t e_end = args.w_ptr[blk + 1];
  for (int64_t e = args.w_ptr[blk]; e < e_end; ++e) {  // tickets ascending: a fixed summation order
    const int64_t t = args.w_tickets[e];
    int64_t lo, hi;
    split_rows(args, t, lo, hi);
    if (lo >= hi) continue;  // no rows of t here: its mask must not let anything through (block-uniform)

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    GwStage<T> st;
    fetch_gw_step<T>(args, lo, hi, n0, k0, cc, r_first, st);
    for (int64_t r0 = lo; r0 < hi; r0 += kTile) {
      __syncthreads();  // previous MMAs done with Ds/Xs; previous ticket's Cs reads done
#pragma unroll
      for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
        const int m = r_first + i * Cfg::kRowStep;
        *reinterpret_cast<int4*>(Ds + m * LD + cc) = st.d[i].raw;
        *reinterpret_cast<int4*>(Xs + m * LD + cc) = st.x[i].raw;
      }
      __syncthreads();
      if (r0 + kTile < hi) fetch_gw_step<T>(args, r0 + kTile, hi, n0, k0, cc, r_first, st);
#pragma unroll
      for (int mm = 0; mm < kTile; mm += 16) {
        // P(n, k) += sum_m dy[m][n] x[m][k]: A(n, m) = Ds[m][n] is column-major, B(m, k) = Xs[m][k] row-major.
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(fa[i], Ds + mm * LD + wm * 32 + 16 * i, LD);
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(fb[j], Xs + mm * LD + wn * 32 + 16 * j, LD);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    }
    // WMMA's register layout is opaque, so the mask select goes through shared memory.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + 16 * i) * LDC + wn * 32 + 16 * j, acc[i][j], LDC, wmma::mem_row_major);
    __syncthreads();
    // Thread tid owns column kl = tid % 64 and rows nl = tid / 64 + 2 q: one running mask pointer (few registers,
    // coalesced: 64 consecutive mask bytes a row).
    if (k_in) {
      const uint8_t* mp = args.masks + t * args.n * args.k + (n0 + nl0) * args.k + k0 + kl;
      const float* cp = Cs + nl0 * LDC + kl;
#pragma unroll
      for (int q = 0; q < kPerThread; ++q) {
        if (q < q_end && mp[0] != 0) total[q] += cp[0];
        mp += kRowsPerQ * args.k;
        cp += kRowsPerQ * LDC;
      }
    }
  }

  // Every in-bounds element of the block is written, zeros included.
  if (k_in) {
    const int64_t first = (n0 + nl0) * args.k + k0 + kl;
    const int64_t step = kRowsPerQ * args.k;
    if (args.partial != nullptr) {
      float* p = args.partial + static_cast<int64_t>(blockIdx.y) * args.n * args.k + first;
#pragma unroll
      for (int q = 0; q < kPerThread; ++q)
        if (q < q_end) p[q * step] = total[q];
    } else {
      T* p = static_cast<T*>(args.out) + first;
#pragma unroll
      for (int q = 0; q < kPerThread; ++q)
        if (q < q_end) p[q * step] = Num<T>::from_f(total[q]);
    }
  }
#endif
}

// SIMT fp32 grad_weight. Grid (NB * KB, splits), 256 threads; thread (tx, ty) owns (n0 + ty + 16 i, k0 + tx + 16 j).
__global__ void __launch_bounds__(256) grad_weight_simt_kernel(const GwArgs args) {
  using Cfg = TileCfg<float>;
  constexpr int LD = kTile + 1;
  __shared__ float Ds[kTile * LD];  // dy tile [m][n]
  __shared__ float Xs[kTile * LD];  // x tile [m][k]

  const int64_t blk = blockIdx.x;
  const int64_t n0 = (blk / args.kb_count) * kTile, k0 = (blk % args.kb_count) * kTile;
  const int tid = threadIdx.x;
  const int cc = (tid % Cfg::kChunksPerRow) * Cfg::kVec;
  const int r_first = tid / Cfg::kChunksPerRow;
  const int tx = tid % 16, ty = tid / 16;
  // Outputs (n0 + ty + 16 i, k0 + tx + 16 j) are in bounds for i < i_end, j < j_end.
  const int64_t n_left = args.n - n0 - ty, k_left = args.k - k0 - tx;
  const int i_end = n_left <= 0 ? 0 : static_cast<int>((n_left + 15) / 16);
  const int j_end = k_left <= 0 ? 0 : static_cast<int>((k_left + 15) / 16);

  float total[4][4];
  zero_4x4(total);

  const int64_t e_end = args.w_ptr[blk + 1];
  for (int64_t e = args.w_ptr[blk]; e < e_end; ++e) {
    const int64_t t = args.w_tickets[e];
    int64_t lo, hi;
    split_rows(args, t, lo, hi);
    if (lo >= hi) continue;

    float acc[4][4];
    zero_4x4(acc);

    GwStage<float> st;
    fetch_gw_step<float>(args, lo, hi, n0, k0, cc, r_first, st);
    for (int64_t r0 = lo; r0 < hi; r0 += kTile) {
      __syncthreads();
#pragma unroll
      for (int i = 0; i < Cfg::kRowsPerThread; ++i) {
        const int m = r_first + i * Cfg::kRowStep;
        const float* ed = elems<float>(st.d[i]);
        const float* ex = elems<float>(st.x[i]);
#pragma unroll
        for (int j = 0; j < Cfg::kVec; ++j) {
          Ds[m * LD + cc + j] = ed[j];
          Xs[m * LD + cc + j] = ex[j];
        }
      }
      __syncthreads();
      if (r0 + kTile < hi) fetch_gw_step<float>(args, r0 + kTile, hi, n0, k0, cc, r_first, st);
#pragma unroll 8
      for (int mm = 0; mm < kTile; ++mm) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = Ds[mm * LD + ty + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) bv[j] = Xs[mm * LD + tx + 16 * j];
        fma_4x4(acc, av, bv);
      }
    }
    // where(M_t, P, 0) straight from the registers: this thread's outputs have a known (n, k).
    const uint8_t* mp = args.masks + t * args.n * args.k + (n0 + ty) * args.k + k0 + tx;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      if (i < i_end) {
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (j < j_end && mp[16 * j] != 0) total[i][j] += acc[i][j];
      }
      mp += 16 * args.k;
    }
  }

  float* out = args.partial != nullptr ? args.partial + static_cast<int64_t>(blockIdx.y) * args.n * args.k
                                       : static_cast<float*>(args.out);
  out += (n0 + ty) * args.k + k0 + tx;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    if (i < i_end) {
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (j < j_end) out[16 * j] = total[i][j];  // every in-bounds element, zeros included
    }
    out += 16 * args.k;
  }
}

// out[i] = sum over splits s (ascending) of partial[s][i]: the deterministic second pass of a split grad_weight.
template <typename T>
__global__ void __launch_bounds__(256) sum_splits_kernel(const float* partial, int64_t splits, int64_t count, T* out) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < count;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int64_t sp = 0; sp < splits; ++sp) s += partial[sp * count + i];
    out[i] = Num<T>::from_f(s);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------
bool aligned(const void* p, uintptr_t bytes) { return (reinterpret_cast<uintptr_t>(p) % bytes) == 0; }

int vec_elems(DType dtype) { return dtype == DType::kFloat32 ? 4 : 8; }

// Cached per device: cudaDeviceGetAttribute is cheap but not free, and this runs on every backward.
int sm_count(int device) {
  static std::atomic<int> cache[64];
  if (device >= 0 && device < 64) {
    const int cached = cache[device].load(std::memory_order_relaxed);
    if (cached > 0) return cached;
  }
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms <= 0) {
    cudaGetLastError();  // clear the (non-sticky) query error; fall back to an H100's count
    sms = 132;
  }
  if (device >= 0 && device < 64) cache[device].store(sms, std::memory_order_relaxed);
  return sms;
}

// The arguments of forward (a = x (B, K), out = y (B, N)) or, grad_input, of the transposed product (a = dy (B, N),
// out = dx (B, K)), with the 16-byte load paths allowed where the row lengths and pointers are aligned.
MmArgs mm_args(DType dtype, const RoutedRows& rows, int64_t n, int64_t k, const void* a, const void* w,
               const uint8_t* masks, const void* bias, const int32_t* ptr, const int32_t* idx, const int8_t* full,
               void* out, bool grad_input) {
  const int v = vec_elems(dtype);
  MmArgs args{};
  args.a = a;
  args.w = w;
  args.masks = masks;
  args.bias = bias;
  args.perm = rows.perm;
  args.offsets = rows.offsets;
  args.ptr = ptr;
  args.idx = idx;
  args.full = full;
  args.out = out;
  args.n = n;
  args.k = k;
  args.num_tickets = rows.num_tickets;
  args.out_blocks = cdiv(grad_input ? k : n, kTile);
  args.a_vec = (grad_input ? n : k) % v == 0 && aligned(a, 16);
  args.w_vec = k % v == 0 && aligned(w, 16) && aligned(masks, v);
  return args;
}

template <typename T, bool kGradInput>
cudaError_t launch_mm(const MmArgs& args, int64_t tiles, cudaStream_t stream) {
  if (tiles > kMaxGridX || args.out_blocks > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(args.out_blocks));
  if constexpr (std::is_same_v<T, float>) {
    routed_mm_simt_kernel<kGradInput><<<grid, 256, 0, stream>>>(args);
  } else {
    routed_mm_tc_kernel<T, kGradInput><<<grid, 128, 0, stream>>>(args);
  }
  return cudaGetLastError();
}

template <bool kGradInput>
cudaError_t dispatch_mm(DType dtype, const MmArgs& args, int64_t tiles, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_mm<float, kGradInput>(args, tiles, stream);
    case DType::kFloat16:
      return launch_mm<__half, kGradInput>(args, tiles, stream);
    case DType::kBFloat16:
      return launch_mm<__nv_bfloat16, kGradInput>(args, tiles, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_grad_weight(const GwArgs& args, int64_t blocks, int64_t splits, cudaStream_t stream) {
  if (blocks > kMaxGridX || splits > kMaxGridYZ) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks), static_cast<unsigned>(splits));
  if constexpr (std::is_same_v<T, float>) {
    grad_weight_simt_kernel<<<grid, 256, 0, stream>>>(args);
  } else {
    grad_weight_tc_kernel<T><<<grid, 128, 0, stream>>>(args);
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || args.partial == nullptr) return err;
  const int64_t count = args.n * args.k;
  const int64_t reduce_blocks = cdiv(count, 256) < 65536 ? cdiv(count, 256) : 65536;
  sum_splits_kernel<T><<<static_cast<unsigned>(reduce_blocks), 256, 0, stream>>>(args.partial, splits, count,
                                                                                 static_cast<T*>(args.out));
  return cudaGetLastError();
}

}  // namespace

cudaError_t linear_forward(DType dtype, const RoutedRows& rows, int64_t n, int64_t k, const void* x, const void* w,
                           const uint8_t* masks, const void* bias, const int32_t* row_ptr, const int32_t* col_idx,
                           const int8_t* full, void* y, cudaStream_t stream) {
  if (rows.batch <= 0 || n <= 0) return cudaSuccess;  // nothing to write
  const MmArgs args = mm_args(dtype, rows, n, k, x, w, masks, bias, row_ptr, col_idx, full, y, false);
  return dispatch_mm<false>(dtype, args, row_tile_bound(rows.batch, rows.num_tickets), stream);
}

cudaError_t linear_grad_input(DType dtype, const RoutedRows& rows, int64_t n, int64_t k, const void* dy, const void* w,
                              const uint8_t* masks, const int32_t* t_col_ptr, const int32_t* t_row_idx,
                              const int8_t* t_full, void* dx, cudaStream_t stream) {
  if (rows.batch <= 0 || k <= 0) return cudaSuccess;
  const MmArgs args = mm_args(dtype, rows, n, k, dy, w, masks, nullptr, t_col_ptr, t_row_idx, t_full, dx, true);
  return dispatch_mm<true>(dtype, args, row_tile_bound(rows.batch, rows.num_tickets), stream);
}

int grad_weight_splits(int64_t batch, int64_t n, int64_t k, int device) {
  if (n <= 0 || k <= 0 || batch <= 0) return 1;
  const int64_t blocks = cdiv(n, kTile) * cdiv(k, kTile);
  // Aim at about 4 resident blocks per SM (36 KB shared memory, 128-256 threads each) so small layers with many
  // rows (regime A: 128x128 W = 4 blocks, 65,536 rows) do not run on 4 SMs. Splits cut the sorted rows, not the
  // tickets, so a split costs one fp32 partial W and one extra summing pass: each split gets >= 256 rows.
  const int64_t target = 4 * static_cast<int64_t>(sm_count(device));
  if (blocks >= target) return 1;
  int64_t s = cdiv(target, blocks);
  const int64_t by_rows = cdiv(batch, 4 * kTile);
  if (s > by_rows) s = by_rows;
  const int64_t by_memory = (int64_t(1) << 26) / (n * k);  // workspace <= 256 MiB
  if (s > by_memory) s = by_memory;
  if (s > kMaxGridYZ) s = kMaxGridYZ;
  if (s <= 1) return 1;
  // Drop splits that would hold no rows once each split is rounded up to whole 64-row steps.
  const int64_t per_split = cdiv(cdiv(batch, s), kTile) * kTile;
  return static_cast<int>(cdiv(batch, per_split));
}

cudaError_t linear_grad_weight(DType dtype, const RoutedRows& rows, int64_t n, int64_t k, const void* dy, const void* x,
                               const uint8_t* masks, const int32_t* w_ptr, const int32_t* w_tickets, int splits,
                               float* workspace, void* dw, cudaStream_t stream) {
  if (n <= 0 || k <= 0) return cudaSuccess;
  if (splits < 1 || (splits > 1 && workspace == nullptr)) return cudaErrorInvalidValue;
  const int v = vec_elems(dtype);
  const int64_t batch = rows.batch > 0 ? rows.batch : 0;
  GwArgs args{};
  args.dy = dy;
  args.x = x;
  args.masks = masks;
  args.perm = rows.perm;
  args.offsets = rows.offsets;
  args.w_ptr = w_ptr;
  args.w_tickets = w_tickets;
  args.out = dw;
  args.partial = splits > 1 ? workspace : nullptr;
  args.n = n;
  args.k = k;
  args.batch = batch;
  args.kb_count = cdiv(k, kTile);
  // Every split is a whole number of 64-row steps; splits * rows_per_split >= B, so all rows are covered.
  args.rows_per_split = splits > 1 ? cdiv(cdiv(batch, splits), kTile) * kTile : (batch > 0 ? batch : 1);
  args.dy_vec = n % v == 0 && aligned(dy, 16);
  args.x_vec = k % v == 0 && aligned(x, 16);
  const int64_t blocks = cdiv(n, kTile) * args.kb_count;
  switch (dtype) {
    case DType::kFloat32:
      return launch_grad_weight<float>(args, blocks, splits, stream);
    case DType::kFloat16:
      return launch_grad_weight<__half>(args, blocks, splits, stream);
    case DType::kBFloat16:
      return launch_grad_weight<__nv_bfloat16>(args, blocks, splits, stream);
  }
  return cudaErrorInvalidValue;
}

std::string device_problem(int device) {
  int major = 0, minor = 0;
  cudaError_t err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) err = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return "cannot query CUDA device " + std::to_string(device) + ": " + cudaGetErrorString(err);
  }
  const std::string cc = std::to_string(major) + "." + std::to_string(minor);
  if (major < 8)
    return "the cuda backend needs compute capability 8.0 or newer (fp16/bf16 tensor-core kernels); device " +
           std::to_string(device) + " has " + cc;
  // A kernel image for this device must be in the binary (TORCH_CUDA_ARCH_LIST at build time, default 9.0).
  int previous = 0;
  cudaGetDevice(&previous);
  cudaSetDevice(device);
  cudaFuncAttributes attr;
  err = cudaFuncGetAttributes(&attr, routed_mm_tc_kernel<__half, false>);
  cudaSetDevice(previous);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return "rtl_kernels._C_cuda holds no kernel image for compute capability " + cc + " (" + cudaGetErrorString(err) +
           "); rebuild with TORCH_CUDA_ARCH_LIST=" + cc;
  }
  return {};
}

}  // namespace rtl_cuda
