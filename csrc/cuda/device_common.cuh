// Device helpers shared by the CUDA kernel translation units (routed_linear_kernels.cu, routed_conv2d_kernels.cu).
// Header-only and force-inlined: a helper used inside a kernel's inner loop compiles to the loop written in place.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace rtl_cuda {

// Launch limits of a grid's x and of its y / z dimensions.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Element-type conversions to and from the fp32 the kernels accumulate in (round to nearest on the way back).
template <typename T>
struct Num;
template <>
struct Num<float> {
  __device__ static float to_f(float v) { return v; }
  __device__ static float from_f(float v) { return v; }
};
template <>
struct Num<__half> {
  __device__ static float to_f(__half v) { return __half2float(v); }
  __device__ static __half from_f(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  __device__ static float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_f(float v) { return __float2bfloat16_rn(v); }
};

// The 4 x 4 outputs a SIMT thread owns, held in registers.
__device__ __forceinline__ void zero_4x4(float (&acc)[4][4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;
}

// acc[i][j] += a[i] * b[j] in fp32 FMAs: one rank-1 update of a thread's 4 x 4 outputs.
__device__ __forceinline__ void fma_4x4(float (&acc)[4][4], const float (&a)[4], const float (&b)[4]) {
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
}

// acc[i][j] += sum over kk (ascending) of a[kk][a0 + 16 i] * b[kk][b0 + 16 j]: one step of a thread's 4 x 4
// outputs, 16 apart, over two k-major tiles in shared memory.
template <int kSteps, int kLdA, int kLdB>
__device__ __forceinline__ void fma_step_4x4(float (&acc)[4][4], const float (&a)[kSteps][kLdA], int a0,
                                             const float (&b)[kSteps][kLdB], int b0) {
#pragma unroll
  for (int kk = 0; kk < kSteps; ++kk) {
    float av[4], bv[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) av[i] = a[kk][a0 + 16 * i];
#pragma unroll
    for (int j = 0; j < 4; ++j) bv[j] = b[kk][b0 + 16 * j];
    fma_4x4(acc, av, bv);
  }
}

}  // namespace rtl_cuda
