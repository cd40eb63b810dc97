// Argument checks shared by the torch glue of both backends (csrc/cpu_ops.cpp, csrc/cuda_ops.cpp), so the two
// refuse a bad conv geometry with the same messages. Header-only: each glue file stays one translation unit.
#pragma once

#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <cstdint>

namespace rtl_ops {

// Checks stride, padding, dilation and groups and stores them in s (rtl_cpu::ConvShape or rtl_cuda::Conv2dShape).
template <typename Shape>
void set_conv_params(Shape& s, c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                     int64_t groups) {
  TORCH_CHECK(stride.size() == 2 && stride[0] >= 1 && stride[1] >= 1, "stride must be two ints >= 1, got ", stride);
  TORCH_CHECK(padding.size() == 2 && padding[0] >= 0 && padding[1] >= 0, "padding must be two ints >= 0, got ",
              padding);
  TORCH_CHECK(dilation.size() == 2 && dilation[0] >= 1 && dilation[1] >= 1, "dilation must be two ints >= 1, got ",
              dilation);
  TORCH_CHECK(groups >= 1, "groups must be >= 1, got ", groups);
  s.stride_h = stride[0];
  s.stride_w = stride[1];
  s.pad_h = padding[0];
  s.pad_w = padding[1];
  s.dil_h = dilation[0];
  s.dil_w = dilation[1];
  s.groups = groups;
}

// Output rows (or columns) of a conv as F.conv2d computes them; floor division, so 0 (not C++'s truncation towards
// zero) when the dilated kernel does not fit in the padded input.
inline int64_t conv_out_size(int64_t in, int64_t pad, int64_t dil, int64_t kernel, int64_t stride) {
  const int64_t span = in + 2 * pad - dil * (kernel - 1) - 1;
  return span < 0 ? 0 : span / stride + 1;
}

}  // namespace rtl_ops
