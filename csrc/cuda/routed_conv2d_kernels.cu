// Routed masked conv2d kernels for CUDA (declarations and shapes in routed_conv2d_kernels.cuh). No torch headers.
//
// All three kernels are implicit GEMMs on one 64 x 64 output tile with 16-deep inner steps, staged through shared
// memory in fp32 (elements converted on load, fp32 FMAs, one rounding at the store). First version: plain SIMT
// (256 threads, 4 x 4 outputs each, no tensor cores, no double buffering): correctness first.
//
//   forward      y  (B, O, Ho, Wo): per group g, GEMM rows = output pixels of the images of one ticket, columns =
//                the group's output channels, inner = (c, r, s) of the group's input channels (im2col gathered from
//                x inside the shared-memory load, padding and dilation included). Weights W ⊙ M_t loaded with a
//                select, so a NaN/inf in a pruned weight never reaches y.
//   grad_input   dx (B, C, H, W): the transposed gather: rows = input pixels of the images of one ticket, columns =
//                the group's input channels, inner = (o, r, s); the output pixel read for (h, w, r, s) is
//                ((h + ph - r dh) / sh, (w + pw - s dw) / sw) when both divisions are exact and in range. Each dx
//                element is owned by one thread: no atomics, deterministic.
//   grad_weight  dW (O, C/g, kh, kw): a thread block per (group, 64 output channels, 64 of the (c, r, s) columns);
//                loops over the tickets in ascending order, skips tickets without images or without a kept weight
//                in the tile, reduces dy_t x im2col(x_t) over the pixels of the ticket's images in fp32, then adds
//                where(M_t, P_t, 0) to the running total. Written once: exactly zero outside the present masks.
//
// Row tiles: tile i of the grid (forward / grad_input) is the i-th 64-row tile when each ticket's rows are cut into
// cdiv(images_t * pixels, 64) tiles, tickets in order. Thread 0 of the block finds its ticket by scanning offsets
// (no host sync, no planning kernel); the grid is the bound cdiv(B * pixels, 64) + T, surplus blocks exit.
#include "routed_conv2d_kernels.cuh"

#include "device_common.cuh"

#include <cstdint>
#include <string>
#include <type_traits>

namespace rtl_cuda {
namespace {

constexpr int kBM = kConvTileM;  // GEMM rows of a tile
constexpr int kBN = kConvTileN;  // GEMM columns of a tile
constexpr int kBK = kConvTileK;  // inner elements of a step
constexpr int kThreads = 256;    // 16 x 16 threads, 4 x 4 outputs each (rows tx + 16 i, columns ty + 16 j)
static_assert(kBM == 64 && kBN == 64 && kBK == 16, "the thread mappings below are written for 64x64x16 tiles");
static_assert(kThreads == kBM * kBK / 4 && kThreads == kBN * kBK / 4, "each thread loads 4 elements per tile");

struct ConvArgs {
  Conv2dShape s;
  const int64_t* perm;     // (B)
  const int64_t* offsets;  // (T + 1)
  const void* a;           // x (forward) / dy (grad_input, grad_weight)
  const void* b;           // w (forward, grad_input) / x (grad_weight)
  const uint8_t* masks;    // (T, O, C/g, kh, kw)
  const void* bias;        // (O) or null; forward only
  void* out;               // y / dx / dw
};

// The ticket of row tile `tile`, the position of its first image in perm, the tile's first GEMM row within the
// ticket and its row count; false past the last tile. Block-uniform (thread 0 scans, shared memory broadcasts).
__device__ bool find_conv_tile(const int64_t* offsets, int64_t num_tickets, int64_t rows_per_image, int64_t tile,
                               int64_t& ticket, int64_t& first_image, int64_t& row0, int64_t& rows) {
  __shared__ int64_t info[4];
  __shared__ int found;
  if (threadIdx.x == 0) {
    found = 0;
    int64_t rest = tile;
    for (int64_t t = 0; t < num_tickets; ++t) {
      const int64_t lo = offsets[t], hi = offsets[t + 1];
      const int64_t n = hi > lo ? (hi - lo) * rows_per_image : 0;
      const int64_t tiles = (n + kBM - 1) / kBM;
      if (rest < tiles) {
        info[0] = t;
        info[1] = lo;
        info[2] = rest * kBM;
        info[3] = n - rest * kBM < kBM ? n - rest * kBM : kBM;
        found = 1;
        break;
      }
      rest -= tiles;
    }
  }
  __syncthreads();
  if (found == 0) return false;
  ticket = info[0];
  first_image = info[1];
  row0 = info[2];
  rows = info[3];
  return true;
}

// ---------------------------------------------------------------------------------------------------------------
// forward / grad_input. Grid (row tile bound, cdiv(GEMM columns, 64), groups), 256 threads.
// ---------------------------------------------------------------------------------------------------------------
template <typename T, bool kGradInput>
__global__ void __launch_bounds__(kThreads) conv_mm_kernel(const ConvArgs args) {
  const Conv2dShape& s = args.s;
  const int64_t g = blockIdx.z;
  const int64_t cg = s.channels / s.groups;
  const int64_t og = s.out_channels / s.groups;
  const int64_t khw = s.kernel_h * s.kernel_w;
  const int64_t in_pix = s.height * s.width;
  const int64_t out_pix = s.out_h * s.out_w;
  const int64_t rows_per_image = kGradInput ? in_pix : out_pix;
  const int64_t row_w = kGradInput ? s.width : s.out_w;  // pixel -> (row, column) of the GEMM row's image
  const int64_t ncols = kGradInput ? cg : og;
  const int64_t kdim = kGradInput ? og * khw : cg * khw;
  const int64_t w_row = cg * khw;  // elements of one output channel of W
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;

  int64_t ticket = 0, first_image = 0, row0 = 0, rows = 0;
  if (!find_conv_tile(args.offsets, s.num_tickets, rows_per_image, blockIdx.x, ticket, first_image, row0, rows)) return;

  __shared__ float As[kBK][kBM];
  __shared__ float Bs[kBK][kBN + 1];  // +1: the column-major stores of the B loads hit distinct banks

  const int tid = threadIdx.x;
  const T* a_src = static_cast<const T*>(args.a);
  const T* w = static_cast<const T*>(args.b);
  const uint8_t* mask_t = args.masks + ticket * s.out_channels * w_row;

  // A loads: GEMM row am (fixed for the whole loop), inner elements ak + 4 j.
  const int am = tid % kBM;
  const int ak = tid / kBM;
  const bool a_ok = am < rows;
  const T* a_img = nullptr;  // x[img, g * cg] (forward) or dy[img, g * og] (grad_input)
  int64_t p0 = 0, p1 = 0;    // (ho, wo) forward / (h, w) grad_input
  if (a_ok) {
    const int64_t m = row0 + am;
    const int64_t img = args.perm[first_image + m / rows_per_image];
    const int64_t pix = m % rows_per_image;
    p0 = pix / row_w;
    p1 = pix % row_w;
    a_img =
        kGradInput ? a_src + (img * s.out_channels + g * og) * out_pix : a_src + (img * s.channels + g * cg) * in_pix;
  }
  // B loads: inner element bk, GEMM columns bn + 16 j.
  const int bk = tid % kBK;
  const int bn = tid / kBK;

  const int tx = tid % 16;
  const int ty = tid / 16;
  float acc[4][4];
  zero_4x4(acc);

  for (int64_t k0 = 0; k0 < kdim; k0 += kBK) {
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int kk = ak + 4 * j;
      const int64_t k = k0 + kk;
      float v = 0.f;
      if (a_ok && k < kdim) {
        const int64_t q = k / khw;  // input channel (forward) / output channel (grad_input) within the group
        const int64_t rs = k % khw;
        const int64_t r = rs / s.kernel_w;
        const int64_t c = rs % s.kernel_w;
        if constexpr (kGradInput) {
          const int64_t th = p0 + s.pad_h - r * s.dil_h;
          const int64_t tw = p1 + s.pad_w - c * s.dil_w;
          if (th >= 0 && tw >= 0 && th % s.stride_h == 0 && tw % s.stride_w == 0) {
            const int64_t ho = th / s.stride_h;
            const int64_t wo = tw / s.stride_w;
            if (ho < s.out_h && wo < s.out_w) v = Num<T>::to_f(a_img[q * out_pix + ho * s.out_w + wo]);
          }
        } else {
          const int64_t hi = p0 * s.stride_h - s.pad_h + r * s.dil_h;
          const int64_t wi = p1 * s.stride_w - s.pad_w + c * s.dil_w;
          if (hi >= 0 && hi < s.height && wi >= 0 && wi < s.width)
            v = Num<T>::to_f(a_img[q * in_pix + hi * s.width + wi]);
        }
      }
      As[kk][am] = v;
    }
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int n = bn + 16 * j;
      const int64_t col = n0 + n;
      const int64_t k = k0 + bk;
      float v = 0.f;
      if (col < ncols && k < kdim) {
        int64_t idx;
        if constexpr (kGradInput) {
          idx = (g * og + k / khw) * w_row + col * khw + k % khw;
        } else {
          idx = (g * og + col) * w_row + k;
        }
        // A select, not a multiply: pruned weights are zeros whatever they hold.
        v = mask_t[idx] != 0 ? Num<T>::to_f(w[idx]) : 0.f;
      }
      Bs[bk][n] = v;
    }
    __syncthreads();
    fma_step_4x4(acc, As, tx, Bs, ty);
    __syncthreads();
  }

  T* out = static_cast<T*>(args.out);
  const T* bias = static_cast<const T*>(args.bias);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int ml = tx + 16 * i;
    if (ml >= rows) continue;
    const int64_t m = row0 + ml;
    const int64_t img = args.perm[first_image + m / rows_per_image];
    const int64_t pix = m % rows_per_image;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t col = n0 + ty + 16 * j;
      if (col >= ncols) continue;
      if constexpr (kGradInput) {
        out[(img * s.channels + g * cg + col) * in_pix + pix] = Num<T>::from_f(acc[i][j]);
      } else {
        const int64_t o = g * og + col;
        const float b = bias != nullptr ? Num<T>::to_f(bias[o]) : 0.f;
        out[(img * s.out_channels + o) * out_pix + pix] = Num<T>::from_f(acc[i][j] + b);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// grad_weight. Grid (cdiv(C/g * kh * kw, 64), cdiv(O/g, 64), groups), 256 threads. Tile rows = output channels
// o0 + ty + 16 i, columns = (c, r, s) index k0 + tx + 16 j; reduction over the pixels of each ticket's images.
// ---------------------------------------------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads) conv_grad_weight_kernel(const ConvArgs args) {
  const Conv2dShape& s = args.s;
  const int64_t g = blockIdx.z;
  const int64_t cg = s.channels / s.groups;
  const int64_t og = s.out_channels / s.groups;
  const int64_t khw = s.kernel_h * s.kernel_w;
  const int64_t kdim = cg * khw;  // = elements of one output channel of W
  const int64_t in_pix = s.height * s.width;
  const int64_t out_pix = s.out_h * s.out_w;
  const int64_t o0 = static_cast<int64_t>(blockIdx.y) * kBM;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kBN;
  const int64_t w_size = s.out_channels * kdim;

  __shared__ float Ds[kBK][kBM + 1];  // dy: [pixel][output channel]
  __shared__ float Xs[kBK][kBN + 1];  // im2col(x): [pixel][(c, r, s)]

  const int tid = threadIdx.x;
  const int tx = tid % 16;
  const int ty = tid / 16;
  const T* dy = static_cast<const T*>(args.a);
  const T* x = static_cast<const T*>(args.b);

  // Loads: pixel lq of the step, tile rows / columns lc + 16 j (fixed for the whole kernel: decoded once).
  const int lq = tid % kBK;
  const int lc = tid / kBK;
  bool o_ok[4], k_ok[4];
  int64_t dy_chan[4];                     // (g * og + o) * out_pix
  int64_t x_chan[4], h_off[4], w_off[4];  // (g * cg + c) * in_pix, r * dh - ph, s * dw - pw
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int64_t o = o0 + lc + 16 * j;
    o_ok[j] = o < og;
    dy_chan[j] = (g * og + o) * out_pix;
    const int64_t k = k0 + lc + 16 * j;
    k_ok[j] = k < kdim;
    const int64_t c = k / khw;
    const int64_t rs = k % khw;
    x_chan[j] = (g * cg + c) * in_pix;
    h_off[j] = (rs / s.kernel_w) * s.dil_h - s.pad_h;
    w_off[j] = (rs % s.kernel_w) * s.dil_w - s.pad_w;
  }

  float total[4][4];
  zero_4x4(total);

  for (int64_t t = 0; t < s.num_tickets; ++t) {
    const int64_t lo = args.offsets[t], hi = args.offsets[t + 1];
    if (hi <= lo) continue;  // block-uniform: a ticket without images adds nothing
    // This thread's outputs the ticket keeps (bit 4 i + j); skip the ticket when it keeps none of the tile.
    unsigned keep = 0;
    const uint8_t* mask_t = args.masks + t * w_size;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t o = o0 + ty + 16 * i;
      if (o >= og) continue;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int64_t k = k0 + tx + 16 * j;
        if (k < kdim && mask_t[(g * og + o) * kdim + k] != 0) keep |= 1u << (4 * i + j);
      }
    }
    if (__syncthreads_or(keep != 0) == 0) continue;

    float acc[4][4];
    zero_4x4(acc);

    const int64_t length = (hi - lo) * out_pix;  // GEMM reduction length of this ticket
    for (int64_t q0 = 0; q0 < length; q0 += kBK) {
      const int64_t q = q0 + lq;
      const bool q_ok = q < length;
      const T* dy_img = nullptr;
      const T* x_img = nullptr;
      int64_t pix = 0, ho = 0, wo = 0;
      if (q_ok) {
        const int64_t img = args.perm[lo + q / out_pix];
        pix = q % out_pix;
        ho = pix / s.out_w;
        wo = pix % s.out_w;
        dy_img = dy + img * s.out_channels * out_pix;
        x_img = x + img * s.channels * in_pix;
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        float dv = 0.f, xv = 0.f;
        if (q_ok && o_ok[j]) dv = Num<T>::to_f(dy_img[dy_chan[j] + pix]);
        if (q_ok && k_ok[j]) {
          const int64_t hh = ho * s.stride_h + h_off[j];
          const int64_t ww = wo * s.stride_w + w_off[j];
          if (hh >= 0 && hh < s.height && ww >= 0 && ww < s.width)
            xv = Num<T>::to_f(x_img[x_chan[j] + hh * s.width + ww]);
        }
        Ds[lq][lc + 16 * j] = dv;
        Xs[lq][lc + 16 * j] = xv;
      }
      __syncthreads();
      fma_step_4x4(acc, Ds, ty, Xs, tx);
      __syncthreads();
    }
    // A select: a NaN/inf in a pruned position of this ticket's product never reaches dW.
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if ((keep >> (4 * i + j)) & 1u) total[i][j] += acc[i][j];
  }

  T* dw = static_cast<T*>(args.out);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t o = o0 + ty + 16 * i;
    if (o >= og) continue;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int64_t k = k0 + tx + 16 * j;
      if (k < kdim) dw[(g * og + o) * kdim + k] = Num<T>::from_f(total[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------------------------
dim3 forward_grid(const Conv2dShape& s) {
  const int64_t tiles = cdiv(s.batch * s.out_h * s.out_w, kBM) + s.num_tickets;
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(cdiv(s.out_channels / s.groups, kBN)),
              static_cast<unsigned>(s.groups));
}

dim3 grad_input_grid(const Conv2dShape& s) {
  const int64_t tiles = cdiv(s.batch * s.height * s.width, kBM) + s.num_tickets;
  return dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(cdiv(s.channels / s.groups, kBN)),
              static_cast<unsigned>(s.groups));
}

dim3 grad_weight_grid(const Conv2dShape& s) {
  return dim3(static_cast<unsigned>(cdiv(s.channels / s.groups * s.kernel_h * s.kernel_w, kBN)),
              static_cast<unsigned>(cdiv(s.out_channels / s.groups, kBM)), static_cast<unsigned>(s.groups));
}

template <typename T, bool kGradInput>
cudaError_t launch_mm(const ConvArgs& args, cudaStream_t stream) {
  if (!conv2d_grid_problem(args.s).empty()) return cudaErrorInvalidConfiguration;
  const dim3 grid = kGradInput ? grad_input_grid(args.s) : forward_grid(args.s);
  conv_mm_kernel<T, kGradInput><<<grid, kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

template <bool kGradInput>
cudaError_t dispatch_mm(DType dtype, const ConvArgs& args, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32:
      return launch_mm<float, kGradInput>(args, stream);
    case DType::kFloat16:
      return launch_mm<__half, kGradInput>(args, stream);
    case DType::kBFloat16:
      return launch_mm<__nv_bfloat16, kGradInput>(args, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T>
cudaError_t launch_grad_weight(const ConvArgs& args, cudaStream_t stream) {
  if (!conv2d_grid_problem(args.s).empty()) return cudaErrorInvalidConfiguration;
  conv_grad_weight_kernel<T><<<grad_weight_grid(args.s), kThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

bool valid_shape(const Conv2dShape& s) {
  return s.groups >= 1 && s.channels % s.groups == 0 && s.out_channels % s.groups == 0 && s.stride_h >= 1 &&
         s.stride_w >= 1 && s.dil_h >= 1 && s.dil_w >= 1 && s.pad_h >= 0 && s.pad_w >= 0 && s.num_tickets >= 1;
}

ConvArgs make_args(const Conv2dShape& s, const int64_t* perm, const int64_t* offsets, const void* a, const void* b,
                   const uint8_t* masks, const void* bias, void* out) {
  ConvArgs args{};
  args.s = s;
  args.perm = perm;
  args.offsets = offsets;
  args.a = a;
  args.b = b;
  args.masks = masks;
  args.bias = bias;
  args.out = out;
  return args;
}

}  // namespace

std::string conv2d_grid_problem(const Conv2dShape& s) {
  if (!valid_shape(s)) return "invalid conv2d shape (groups, strides, dilations, padding or tickets)";
  if (s.groups > kMaxGridYZ) return "groups = " + std::to_string(s.groups) + " exceeds 65535";
  const int64_t cg = s.channels / s.groups, og = s.out_channels / s.groups;
  if (cdiv(og, kBN) > kMaxGridYZ || cdiv(cg, kBN) > kMaxGridYZ) return "channels per group exceed 65535 * 64";
  if (cdiv(s.batch * s.out_h * s.out_w, kBM) + s.num_tickets > kMaxGridX ||
      cdiv(s.batch * s.height * s.width, kBM) + s.num_tickets > kMaxGridX)
    return "batch * pixels exceeds the grid limit (2^31 - 1 tiles of 64 pixels)";
  if (cdiv(cg * s.kernel_h * s.kernel_w, kBN) > kMaxGridX) return "C/groups * kh * kw exceeds the grid limit";
  return {};
}

cudaError_t conv2d_forward(DType dtype, const Conv2dShape& s, const int64_t* perm, const int64_t* offsets,
                           const void* x, const void* w, const uint8_t* masks, const void* bias, void* y,
                           cudaStream_t stream) {
  if (s.batch <= 0 || s.out_channels <= 0 || s.out_h <= 0 || s.out_w <= 0) return cudaSuccess;  // nothing to write
  return dispatch_mm<false>(dtype, make_args(s, perm, offsets, x, w, masks, bias, y), stream);
}

cudaError_t conv2d_grad_input(DType dtype, const Conv2dShape& s, const int64_t* perm, const int64_t* offsets,
                              const void* dy, const void* w, const uint8_t* masks, void* dx, cudaStream_t stream) {
  if (s.batch <= 0 || s.channels <= 0 || s.height <= 0 || s.width <= 0) return cudaSuccess;
  return dispatch_mm<true>(dtype, make_args(s, perm, offsets, dy, w, masks, nullptr, dx), stream);
}

cudaError_t conv2d_grad_weight(DType dtype, const Conv2dShape& s, const int64_t* perm, const int64_t* offsets,
                               const void* dy, const void* x, const uint8_t* masks, void* dw, cudaStream_t stream) {
  if (s.out_channels <= 0 || s.channels <= 0 || s.kernel_h <= 0 || s.kernel_w <= 0) return cudaSuccess;
  const ConvArgs args = make_args(s, perm, offsets, dy, x, masks, nullptr, dw);
  switch (dtype) {
    case DType::kFloat32:
      return launch_grad_weight<float>(args, stream);
    case DType::kFloat16:
      return launch_grad_weight<__half>(args, stream);
    case DType::kBFloat16:
      return launch_grad_weight<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace rtl_cuda
