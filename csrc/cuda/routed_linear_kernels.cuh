// Routed masked linear kernels for CUDA, on raw device pointers (no torch headers: this header is included by
// the torch glue csrc/cuda_ops.cpp and by csrc/cuda/routed_linear_kernels.cu, which nvcc compiles in seconds).
//
// Shapes (all row-major, contiguous, on one device):
//   x (B, K), dy (B, N), w (N, K), masks (T, N, K) bool (one byte per weight), bias (N) or null,
//   perm (B) int64: rows sorted by ticket; offsets (T + 1) int64: ticket t owns perm[offsets[t] .. offsets[t+1]).
// Layout (rtl_kernels/formats/block_csr.py, block kBlockN x kBlockK, NB = cdiv(N, 64), KB = cdiv(K, 64)):
//   forward:     row_ptr (T*NB + 1), col_idx (nnz) block columns kb, full (nnz) int8
//   grad_input:  t_col_ptr (T*KB + 1), t_row_idx (nnz) block rows nb, t_full (nnz) int8
//   grad_weight: w_ptr (NB*KB + 1), w_tickets (nnz) tickets keeping any weight of the W block
// Element types: float (exact fp32 SIMT, no TF32), __half and __nv_bfloat16 (tensor cores); accumulation in fp32.
//
// No function here synchronises with the device or reads device memory on the host, so every launch can be
// captured in a CUDA graph. Each returns the launch error (cudaSuccess when all launches were accepted).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <string>

namespace rtl_cuda {

// The block shape the kernels are written for: the layout must be compiled with block_n = block_k = 64.
constexpr int kBlockN = 64;
constexpr int kBlockK = 64;
// Rows of one ticket handled by one thread block in forward / grad_input, and per step of grad_weight.
constexpr int kBlockM = 64;

enum class DType { kFloat32, kFloat16, kBFloat16 };

struct RoutedRows {
  int64_t batch;           // B
  int64_t num_tickets;     // T
  const int64_t* perm;     // (B)
  const int64_t* offsets;  // (T + 1)
};

// Grid size of forward / grad_input in row tiles: an upper bound on sum_t cdiv(count_t, kBlockM) that needs
// only shapes (no host sync): sum_t cdiv(c_t, M) <= (B + T (M - 1)) / M < cdiv(B, M) + T.
inline int64_t row_tile_bound(int64_t batch, int64_t num_tickets) {
  return (batch + kBlockM - 1) / kBlockM + num_tickets;
}

// y[r] = x[r] @ (w * masks[t(r)]).T + bias for every row r (every element of y (B, N) is written).
cudaError_t linear_forward(DType dtype, const RoutedRows& rows, int64_t n, int64_t k, const void* x, const void* w,
                           const uint8_t* masks, const void* bias, const int32_t* row_ptr, const int32_t* col_idx,
                           const int8_t* full, void* y, cudaStream_t stream);

// dx[r] = dy[r] @ (w * masks[t(r)]) for every row r (every element of dx (B, K) is written).
cudaError_t linear_grad_input(DType dtype, const RoutedRows& rows, int64_t n, int64_t k, const void* dy, const void* w,
                              const uint8_t* masks, const int32_t* t_col_ptr, const int32_t* t_row_idx,
                              const int8_t* t_full, void* dx, cudaStream_t stream);

// How many row splits grad_weight uses for this shape on this device (>= 1), from shapes only. With more than one
// split the caller passes a float32 workspace of splits * n * k elements.
int grad_weight_splits(int64_t batch, int64_t n, int64_t k, int device);

// dw (N, K) = sum over tickets t (ascending) of where(masks[t], dy[rows of t].T @ x[rows of t], 0): every element
// written once, exactly zero where no ticket with rows keeps the weight; deterministic (no atomics).
cudaError_t linear_grad_weight(DType dtype, const RoutedRows& rows, int64_t n, int64_t k, const void* dy, const void* x,
                               const uint8_t* masks, const int32_t* w_ptr, const int32_t* w_tickets, int splits,
                               float* workspace, void* dw, cudaStream_t stream);

// Empty when the kernels can run on that device; else why not (compute capability, missing kernel image).
std::string device_problem(int device);

}  // namespace rtl_cuda
