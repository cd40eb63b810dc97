// Routed sparse linear kernels for the CPU, on raw pointers (no torch headers: this translation unit builds
// in seconds, the torch glue in csrc/cpu_ops.cpp rarely changes).
//
// Shapes: x (B, K), w (N, K) row-major float32, rows grouped by ticket through perm (B) and offsets (T + 1):
// ticket t owns rows perm[offsets[t] .. offsets[t + 1]). Only tickets with ticket_sparse[t] != 0 are computed
// here; the caller runs the others as dense masked GEMMs.
//
// Sparse layout of ticket t (compiled once per mask version by rtl_kernels/backends/cpu.py):
//   forward / grad_weight: csr_ptr (T * N + 1), csr_idx: kept input indices k of output n of ticket t are
//                          csr_idx[csr_ptr[t * N + n] .. csr_ptr[t * N + n + 1]).
//   grad_input:           csc_ptr (T * K + 1), csc_idx: kept outputs n of input k of ticket t.
//   chunk pointers:       the same entries cut at every kChunk-th index (C = n_chunks chunks per row):
//                          entries of (ticket t, row n, chunk c) start at chunk_ptr[(t * rows + n) * C + c].
// Weights are always read from w through these indices, never copied, so training sees every update.
#pragma once
#include <cstdint>

namespace rtl_cpu {

struct RoutedRows {
  int64_t batch;                 // B
  int64_t num_tickets;           // T
  const int64_t* perm;           // (B)
  const int64_t* offsets;        // (T + 1)
  const uint8_t* ticket_sparse;  // (T): 1 = computed by these kernels
  int num_threads;
};

// y[r, :] = x[r, :] @ (w * mask_t).T + bias, for the rows r of sparse tickets (other rows untouched).
void routed_linear_forward(const RoutedRows& rows, int64_t n_out, int64_t k_in, const float* x, const float* w,
                           const float* bias, const int64_t* csr_ptr, const int64_t* chunk_ptr, int64_t n_chunks,
                           const int32_t* csr_idx, float* y);

// dx[r, :] = dy[r, :] @ (w * mask_t), for the rows r of sparse tickets (other rows untouched).
void routed_linear_grad_input(const RoutedRows& rows, int64_t n_out, int64_t k_in, const float* dy, const float* w,
                              const int64_t* csc_ptr, const int64_t* chunk_ptr, int64_t n_chunks,
                              const int32_t* csc_idx, float* dx);

// dw[n, k] += sum over sparse tickets t keeping (n, k) of sum_{r in t} dy[r, n] * x[r, k]. Positions kept by no
// sparse ticket are not written. Deterministic: each dw row is owned by one thread, tickets in order.
void routed_linear_grad_weight(const RoutedRows& rows, int64_t n_out, int64_t k_in, const float* dy, const float* x,
                               const int64_t* csr_ptr, const int32_t* csr_idx, float* dw);

// Which instruction set the kernels run with: "avx512", "avx2" or "generic" (the widest the CPU has, capped by
// the environment variable RTL_CPU_ISA=avx2 or =generic).
const char* kernel_isa();

}  // namespace rtl_cpu
