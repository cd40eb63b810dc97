// Routed masked conv2d kernels for CUDA, on raw device pointers (no torch headers: included by the torch glue
// csrc/cuda_ops.cpp and by csrc/cuda/routed_conv2d_kernels.cu).
//
// Shapes (all contiguous NCHW / row-major, on one device):
//   x (B, C, H, W), dy (B, O, Ho, Wo), w (O, C/g, kh, kw), masks (T, O, C/g, kh, kw) bool (one byte per weight),
//   bias (O) or null, perm (B) int64: images sorted by ticket; offsets (T + 1) int64: ticket t owns the images
//   perm[offsets[t] .. offsets[t+1]). Padding is symmetric (pad_h rows above and below, pad_w columns each side).
// Element types: float, __half, __nv_bfloat16 (DType from routed_linear_kernels.cuh); accumulation in fp32.
//
// No function here synchronises with the device or reads device memory on the host (tickets and their image
// ranges are found on the device from offsets), so the launches can be captured in a CUDA graph. Each returns
// the launch error (cudaSuccess when every launch was accepted, cudaErrorInvalidConfiguration when a grid limit
// is exceeded: the glue checks conv2d_grid_problem first to raise a clear message).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

#include "routed_linear_kernels.cuh"  // DType

namespace rtl_cuda {

// Implicit-GEMM tile: kConvTileM GEMM rows (pixels) x kConvTileN GEMM columns x kConvTileK inner elements a step.
constexpr int kConvTileM = 64;
constexpr int kConvTileN = 64;
constexpr int kConvTileK = 16;

struct Conv2dShape {
  int64_t batch, channels, height, width;    // x (B, C, H, W)
  int64_t out_channels, kernel_h, kernel_w;  // w (O, C / groups, kh, kw)
  int64_t out_h, out_w;                      // dy / y (B, O, Ho, Wo)
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups, num_tickets;
};

// Empty when the grids of the three kernels fit the launch limits for this shape; else what does not fit.
std::string conv2d_grid_problem(const Conv2dShape& s);

// y[i] = conv2d(x[i], w * masks[t(i)], bias) for every image i: every element of y (B, O, Ho, Wo) written.
cudaError_t conv2d_forward(DType dtype, const Conv2dShape& s, const int64_t* perm, const int64_t* offsets,
                           const void* x, const void* w, const uint8_t* masks, const void* bias, void* y,
                           cudaStream_t stream);

// dx[i] = input gradient of conv2d through w * masks[t(i)]: every element of dx (B, C, H, W) written once
// (a gather over the output pixels that read it, no atomics).
cudaError_t conv2d_grad_input(DType dtype, const Conv2dShape& s, const int64_t* perm, const int64_t* offsets,
                              const void* dy, const void* w, const uint8_t* masks, void* dx, cudaStream_t stream);

// dw = sum over tickets t (ascending) of where(masks[t], weight gradient over the images of t, 0): every element
// of dw (O, C/g, kh, kw) written once, exactly zero where no ticket with images keeps it; deterministic.
cudaError_t conv2d_grad_weight(DType dtype, const Conv2dShape& s, const int64_t* perm, const int64_t* offsets,
                               const void* dy, const void* x, const uint8_t* masks, void* dw, cudaStream_t stream);

}  // namespace rtl_cuda
