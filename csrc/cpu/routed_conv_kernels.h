// Routed direct sparse convolution for the CPU, on raw pointers (no torch headers).
//
// y[i] = conv2d(x[i], w * mask[route[i]]) + bias for every image i of the tickets computed here, without im2col and
// without a masked copy of w. Per call:
//   1. the kept weights of every computed ticket are gathered into one compact list per output channel, each with
//      its offset into the packed images (below);
//   2. the images of each ticket are copied once into a padded, stride-phase-split layout with the ticket's images
//      innermost: packed[c][phase][hq][wq][i];
//   3. each kept weight is a broadcast FMA over a run of 64 consecutive positions of the output grid
//      q = (ho * Wq + wq) * n + i, held in registers: the tap (kh, kw) of input channel c reads the packed images at
//      a fixed offset from q, so the run is contiguous memory (a 1-D convolution over the flattened grid);
//      grid columns wq >= Wo are computed and dropped as the results are written to y in place.
// The input gradient is the adjoint (per stride phase of x, a correlation of the zero-bordered dy with the taps of
// that phase); the weight gradient dots, per kept weight, dy over the grid with the same shifted packed images.
//
// Index layouts (built and cached per mask version by rtl_kernels/formats/conv_index.py):
//   forward / weight gradient: csr_ptr (T * O + 1), csr_idx: the kept k = c_local * kh * kw + tap of output o of
//       ticket t at csr_idx[csr_ptr[t * O + o] .. csr_ptr[t * O + o + 1]);
//   input gradient: in_ptr (T * P * C + 1), in_idx: the kept weights that reach input channel c through taps of
//       stride phase p (p = ph * stride_w + pw, ph = (kh * dil_h) % stride_h, ...), in rows (t, p, c); an entry is
//       og * kh * kw + tap, og the output channel within c's group. Depthwise convs (C == groups) read the forward's
//       index instead.
//
// Depthwise convs take their own loops: each (image, output channel) copies its one input plane into a bordered
// buffer and applies its kept taps row by row (one read of x, one write of y, as a dense depthwise conv).
// Every index is checked as it is read: a malformed one makes the call return a message and write nothing outside
// the tensors.
#pragma once
#include <cstdint>

namespace rtl_cpu {

// One conv2d: x (B, C, H, W) -> y (B, O, Ho, Wo), w (O, C / groups, kernel_h, kernel_w) contiguous.
struct ConvShape {
  int64_t channels, height, width;
  int64_t out_channels, out_height, out_width;
  int64_t kernel_h, kernel_w;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t groups;
};

// Element strides of a 4-D tensor (any memory format: NCHW, channels_last, views).
struct Strides4 {
  int64_t n, c, h, w;
};

// The batch grouped by ticket: ticket t owns images perm[offsets[t] .. offsets[t + 1]); only tickets with
// computed[t] != 0 are run here, the other images are left untouched.
struct TicketImages {
  int64_t batch;
  int64_t num_tickets;
  const int64_t* perm;
  const int64_t* offsets;
  const uint8_t* computed;
  int num_threads;
};

// Each returns nullptr, or a message naming what was malformed.
const char* routed_conv2d_forward(const ConvShape& s, const TicketImages& g, const float* x, Strides4 xs,
                                  const float* w, const float* bias, const int64_t* csr_ptr, const int32_t* csr_idx,
                                  int64_t nnz, float* y, Strides4 ys);

// dx (B, C, H, W) for the images of computed tickets: every element of those images is written.
const char* routed_conv2d_grad_input(const ConvShape& s, const TicketImages& g, const float* dy, Strides4 dys,
                                     const float* w, const int64_t* in_ptr, const int32_t* in_idx, int64_t nnz,
                                     float* dx, Strides4 dxs);

// dw (O, C / groups * kh * kw) += the gradient of the computed tickets, at their kept entries only. Deterministic.
const char* routed_conv2d_grad_weight(const ConvShape& s, const TicketImages& g, const float* dy, Strides4 dys,
                                      const float* x, Strides4 xs, const int64_t* csr_ptr, const int32_t* csr_idx,
                                      int64_t nnz, float* dw);

}  // namespace rtl_cpu
