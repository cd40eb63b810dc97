// torch glue of the CPU kernels: registers the internal ops rtl_kernels::_cpu_* (called by
// rtl_kernels/backends/cpu.py, which owns layouts, dense tickets and the public op) and the Python module init.
// Kept thin and stable: the kernels live in csrc/cpu/, a translation unit without torch headers.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "cpu/routed_conv_kernels.h"
#include "cpu/routed_linear_kernels.h"
#include "op_checks.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdint>
#include <utility>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "rtl_kernels CPU kernels (ops in torch.ops.rtl_kernels)",
                               -1, nullptr};
  return PyModule_Create(&module);
}

namespace {

// A fresh output of tens of MB is faulted in 4 KB pages as the kernels scatter rows into it; on the 2-core VM
// this cost more than the arithmetic (INR layer, 32 MB output: 21 ms kernel, +23 ms of page faults). Asking for
// transparent huge pages on the output's 2 MB-aligned interior cuts the faults ~500-fold where THP is in
// madvise mode; elsewhere the call is a no-op.
void advise_huge_pages(const at::Tensor& t) {
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t end = begin + t.nbytes();
  const uintptr_t lo = (begin + kHuge - 1) & ~(kHuge - 1), hi = end & ~(kHuge - 1);
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);
}

void check_f32(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous(), name,
              " must be a contiguous float32 CPU tensor");
}

rtl_cpu::RoutedRows routed_rows(const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& ticket_sparse) {
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.is_contiguous(), "perm must be contiguous int64");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous(), "offsets must be contiguous int64");
  TORCH_CHECK(ticket_sparse.scalar_type() == at::kByte && ticket_sparse.numel() + 1 == offsets.numel(),
              "ticket_sparse must be uint8 (T)");
  rtl_cpu::RoutedRows r;
  r.batch = perm.numel();
  r.num_tickets = ticket_sparse.numel();
  r.perm = perm.data_ptr<int64_t>();
  r.offsets = offsets.data_ptr<int64_t>();
  r.ticket_sparse = ticket_sparse.data_ptr<uint8_t>();
  r.num_threads = at::get_num_threads();
  // The kernels index rows through perm and offsets unchecked: a bad grouping must fail here, not read or write
  // outside the batch (the Python op checks it first; this is the last line for direct callers).
  TORCH_CHECK(r.offsets[0] == 0 && r.offsets[r.num_tickets] == r.batch, "ticket offsets must run from 0 to the batch");
  for (int64_t t = 0; t < r.num_tickets; ++t)
    TORCH_CHECK(r.offsets[t] <= r.offsets[t + 1], "ticket offsets must be non-decreasing");
  for (int64_t i = 0; i < r.batch; ++i)
    TORCH_CHECK(r.perm[i] >= 0 && r.perm[i] < r.batch, "ticket perm holds a row index outside the batch");
  return r;
}

void check_index(const at::Tensor& ptr, const at::Tensor& idx, int64_t expect_ptr) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.is_contiguous() && ptr.numel() == expect_ptr,
              "sparse row pointer must be contiguous int64 of ", expect_ptr, " entries, got ", ptr.numel());
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.is_contiguous(), "sparse index must be contiguous int32");
}

int64_t check_chunks(const at::Tensor& chunk_ptr, int64_t rows) {
  TORCH_CHECK(chunk_ptr.scalar_type() == at::kLong && chunk_ptr.is_contiguous() && rows > 0 &&
                  (chunk_ptr.numel() - 1) % rows == 0 && chunk_ptr.numel() > 1,
              "chunk pointer must be contiguous int64 of rows * n_chunks + 1 entries");
  return (chunk_ptr.numel() - 1) / rows;
}

// The entries the kernels will walk: for each sparse ticket with rows, its row (and chunk) pointers rise inside
// [0, nnz] and every index lies in [0, cols). O(entries of those tickets), small beside the kernels' B x entries.
void check_index_values(const rtl_cpu::RoutedRows& r, const at::Tensor& ptr, const at::Tensor& chunk_ptr,
                        int64_t n_chunks, const at::Tensor& idx, int64_t rows, int64_t cols) {
  const int64_t* p = ptr.data_ptr<int64_t>();
  const int64_t* c = chunk_ptr.defined() ? chunk_ptr.data_ptr<int64_t>() : nullptr;
  const int32_t* ix = idx.data_ptr<int32_t>();
  const int64_t nnz = idx.numel();
  // the kernels size their scratch from the last pointer
  TORCH_CHECK(p[0] == 0 && p[r.num_tickets * rows] == nnz, "sparse row pointer must run from 0 to the index's size");
  for (int64_t t = 0; t < r.num_tickets; ++t) {
    if (!r.ticket_sparse[t] || r.offsets[t] == r.offsets[t + 1]) continue;
    for (int64_t row = t * rows; row < (t + 1) * rows; ++row) {
      const int64_t begin = p[row], end = p[row + 1];
      TORCH_CHECK(0 <= begin && begin <= end && end <= nnz, "sparse row pointer out of order or past the index");
      for (int64_t e = begin; e < end; ++e)
        TORCH_CHECK(ix[e] >= 0 && ix[e] < cols, "sparse index holds a column outside the weight");
      if (c == nullptr) continue;
      TORCH_CHECK(c[row * n_chunks] == begin && c[(row + 1) * n_chunks] == end,
                  "chunk pointer disagrees with the row pointer");
      for (int64_t k = row * n_chunks; k < (row + 1) * n_chunks; ++k)
        TORCH_CHECK(c[k] <= c[k + 1], "chunk pointer must be non-decreasing");
    }
  }
}

void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == rows && t.size(1) == cols, name, " must have shape (", rows, ", ", cols,
              "), got ", t.sizes());
}

// What the forward and the input gradient check alike: a (B, a_cols) times weight (N, K), read transposed for the
// input gradient, into out (B, out_cols) through an index of out_cols rows a ticket over a_cols columns.
struct Product {
  rtl_cpu::RoutedRows rows;
  int64_t n, k, n_chunks;
};

Product check_product(const at::Tensor& a, const char* a_name, const at::Tensor& weight, const at::Tensor& out,
                      bool transposed, const at::Tensor& perm, const at::Tensor& offsets,
                      const at::Tensor& ticket_sparse, const at::Tensor& ptr, const at::Tensor& chunk_ptr,
                      const at::Tensor& idx) {
  check_f32(a, a_name);
  check_f32(weight, "weight");
  check_f32(out, "out");
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D");
  Product p;
  p.n = weight.size(0);
  p.k = weight.size(1);
  const int64_t a_cols = transposed ? p.n : p.k, out_cols = transposed ? p.k : p.n;
  p.rows = routed_rows(perm, offsets, ticket_sparse);
  check_rows(a, a_name, p.rows.batch, a_cols);
  check_rows(out, "out", p.rows.batch, out_cols);
  check_index(ptr, idx, p.rows.num_tickets * out_cols + 1);
  p.n_chunks = check_chunks(chunk_ptr, p.rows.num_tickets * out_cols);
  check_index_values(p.rows, ptr, chunk_ptr, p.n_chunks, idx, out_cols, a_cols);
  return p;
}

void linear_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& ticket_sparse,
                    const at::Tensor& csr_ptr, const at::Tensor& csr_chunk_ptr, const at::Tensor& csr_idx,
                    at::Tensor& out) {
  const Product p =
      check_product(x, "x", weight, out, false, perm, offsets, ticket_sparse, csr_ptr, csr_chunk_ptr, csr_idx);
  const float* b = nullptr;
  if (bias.has_value()) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == p.n, "bias must have shape (", p.n, ")");
    b = bias->data_ptr<float>();
  }
  advise_huge_pages(out);
  rtl_cpu::routed_linear_forward(p.rows, p.n, p.k, x.data_ptr<float>(), weight.data_ptr<float>(), b,
                                 csr_ptr.data_ptr<int64_t>(), csr_chunk_ptr.data_ptr<int64_t>(), p.n_chunks,
                                 csr_idx.data_ptr<int32_t>(), out.data_ptr<float>());
}

void linear_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& perm,
                       const at::Tensor& offsets, const at::Tensor& ticket_sparse, const at::Tensor& csc_ptr,
                       const at::Tensor& csc_chunk_ptr, const at::Tensor& csc_idx, at::Tensor& out) {
  const Product p =
      check_product(grad_y, "grad_y", weight, out, true, perm, offsets, ticket_sparse, csc_ptr, csc_chunk_ptr, csc_idx);
  advise_huge_pages(out);
  rtl_cpu::routed_linear_grad_input(p.rows, p.n, p.k, grad_y.data_ptr<float>(), weight.data_ptr<float>(),
                                    csc_ptr.data_ptr<int64_t>(), csc_chunk_ptr.data_ptr<int64_t>(), p.n_chunks,
                                    csc_idx.data_ptr<int32_t>(), out.data_ptr<float>());
}

void linear_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& perm,
                        const at::Tensor& offsets, const at::Tensor& ticket_sparse, const at::Tensor& csr_ptr,
                        const at::Tensor& csr_idx, at::Tensor& out) {
  check_f32(grad_y, "grad_y");
  check_f32(x, "x");
  check_f32(out, "out");
  TORCH_CHECK(out.dim() == 2, "out must be 2-D");
  const int64_t n = out.size(0), k = out.size(1);
  auto rows = routed_rows(perm, offsets, ticket_sparse);
  check_rows(grad_y, "grad_y", rows.batch, n);
  check_rows(x, "x", rows.batch, k);
  check_index(csr_ptr, csr_idx, rows.num_tickets * n + 1);
  check_index_values(rows, csr_ptr, at::Tensor(), 1, csr_idx, n, k);
  rtl_cpu::routed_linear_grad_weight(rows, n, k, grad_y.data_ptr<float>(), x.data_ptr<float>(),
                                     csr_ptr.data_ptr<int64_t>(), csr_idx.data_ptr<int32_t>(), out.data_ptr<float>());
}

// ---- direct sparse convolution ----
void check_images(const at::Tensor& t, const char* name, int64_t n, int64_t c, int64_t h, int64_t w) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.dim() == 4, name,
              " must be a 4-D float32 CPU tensor");
  TORCH_CHECK(t.size(0) == n && t.size(1) == c && t.size(2) == h && t.size(3) == w, name, " must have shape (", n, ", ",
              c, ", ", h, ", ", w, "), got ", t.sizes());
}

rtl_cpu::Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Output tensors are written through their strides: they must not overlap themselves (a broadcast view would).
void check_writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.is_non_overlapping_and_dense(), name, " must be a dense tensor without overlapping elements");
}

rtl_cpu::ConvShape conv_shape(const at::Tensor& x, int64_t out_channels, at::IntArrayRef out_hw, at::IntArrayRef kernel,
                              at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                              int64_t groups) {
  TORCH_CHECK(kernel.size() == 2 && kernel[0] >= 1 && kernel[1] >= 1 && out_hw.size() == 2,
              "the kernel must be two sizes >= 1 and the output size a pair, got ", kernel, " and ", out_hw);
  rtl_cpu::ConvShape s;
  rtl_ops::set_conv_params(s, stride, padding, dilation, groups);
  TORCH_CHECK(x.size(1) % groups == 0 && out_channels % groups == 0, "channels must divide by groups");
  s.channels = x.size(1);
  s.height = x.size(2);
  s.width = x.size(3);
  s.out_channels = out_channels;
  s.kernel_h = kernel[0];
  s.kernel_w = kernel[1];
  s.out_height = rtl_ops::conv_out_size(s.height, s.pad_h, s.dil_h, s.kernel_h, s.stride_h);
  s.out_width = rtl_ops::conv_out_size(s.width, s.pad_w, s.dil_w, s.kernel_w, s.stride_w);
  TORCH_CHECK(s.out_height > 0 && s.out_width > 0, "the input is smaller than the dilated kernel");
  TORCH_CHECK(out_hw[0] == s.out_height && out_hw[1] == s.out_width, "the output size must be (", s.out_height, ", ",
              s.out_width, ") for this geometry, got ", out_hw);
  return s;
}

rtl_cpu::TicketImages ticket_images(const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& computed,
                                    int64_t batch) {
  TORCH_CHECK(perm.scalar_type() == at::kLong && perm.is_contiguous() && perm.dim() == 1 && perm.numel() == batch,
              "perm must be contiguous int64 with one entry per image");
  TORCH_CHECK(offsets.scalar_type() == at::kLong && offsets.is_contiguous() && offsets.dim() == 1,
              "offsets must be contiguous int64 (T + 1)");
  TORCH_CHECK(
      computed.scalar_type() == at::kByte && computed.is_contiguous() && computed.numel() + 1 == offsets.numel(),
      "computed must be uint8 (T)");
  rtl_cpu::TicketImages g;
  g.batch = batch;
  g.num_tickets = computed.numel();
  g.perm = perm.data_ptr<int64_t>();
  g.offsets = offsets.data_ptr<int64_t>();
  g.computed = computed.data_ptr<uint8_t>();
  g.num_threads = at::get_num_threads();
  return g;
}

void check_conv_index(const at::Tensor& ptr, const at::Tensor& idx, int64_t rows) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && ptr.is_contiguous() && ptr.dim() == 1 && ptr.numel() == rows + 1,
              "the conv index's row pointer must be contiguous int64 of ", rows + 1, " entries, got ", ptr.numel());
  TORCH_CHECK(idx.scalar_type() == at::kInt && idx.is_contiguous() && idx.dim() == 1,
              "the conv index's entries must be contiguous int32");
}

void check_weight(const at::Tensor& weight, const rtl_cpu::ConvShape& s) {
  check_f32(weight, "weight");
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == s.out_channels && weight.size(1) == s.channels / s.groups &&
                  weight.size(2) == s.kernel_h && weight.size(3) == s.kernel_w,
              "weight must have shape (O, C / groups, kh, kw)");
}

void conv2d_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& computed,
                    const at::Tensor& csr_ptr, const at::Tensor& csr_idx, at::IntArrayRef stride,
                    at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups, at::Tensor& out) {
  TORCH_CHECK(x.dim() == 4 && out.dim() == 4 && weight.dim() == 4, "x, weight and out must be 4-D");
  const auto s =
      conv_shape(x, weight.size(0), out.sizes().slice(2), weight.sizes().slice(2), stride, padding, dilation, groups);
  check_images(x, "x", x.size(0), s.channels, s.height, s.width);
  check_images(out, "out", x.size(0), s.out_channels, s.out_height, s.out_width);
  check_writable(out, "out");
  check_weight(weight, s);
  if (bias.has_value()) {
    TORCH_CHECK(bias->device().is_cpu() && bias->scalar_type() == at::kFloat && bias->dim() == 1 &&
                    bias->numel() == s.out_channels,
                "bias must be a float32 CPU tensor of ", s.out_channels, " entries");
  }
  const at::Tensor bias_c = bias.has_value() ? bias->contiguous() : at::Tensor();
  const float* b = bias_c.defined() ? bias_c.data_ptr<float>() : nullptr;
  const auto g = ticket_images(perm, offsets, computed, x.size(0));
  check_conv_index(csr_ptr, csr_idx, g.num_tickets * s.out_channels);
  const char* error = rtl_cpu::routed_conv2d_forward(s, g, x.data_ptr<float>(), strides_of(x), weight.data_ptr<float>(),
                                                     b, csr_ptr.data_ptr<int64_t>(), csr_idx.data_ptr<int32_t>(),
                                                     csr_idx.numel(), out.data_ptr<float>(), strides_of(out));
  TORCH_CHECK(error == nullptr, "routed conv2d forward: ", error);
}

void conv2d_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& perm,
                       const at::Tensor& offsets, const at::Tensor& computed, const at::Tensor& in_ptr,
                       const at::Tensor& in_idx, at::IntArrayRef stride, at::IntArrayRef padding,
                       at::IntArrayRef dilation, int64_t groups, at::Tensor& dx) {
  TORCH_CHECK(grad_y.dim() == 4 && dx.dim() == 4 && weight.dim() == 4, "grad_y, weight and dx must be 4-D");
  const auto s = conv_shape(dx, weight.size(0), grad_y.sizes().slice(2), weight.sizes().slice(2), stride, padding,
                            dilation, groups);
  check_images(grad_y, "grad_y", dx.size(0), s.out_channels, s.out_height, s.out_width);
  check_images(dx, "dx", dx.size(0), s.channels, s.height, s.width);
  check_writable(dx, "dx");
  check_weight(weight, s);
  const auto g = ticket_images(perm, offsets, computed, dx.size(0));
  // depthwise convs (one input channel per group) read the forward's index; others the input-gradient index
  const bool depthwise = s.channels == s.groups;
  check_conv_index(in_ptr, in_idx, g.num_tickets * (depthwise ? s.out_channels : s.stride_h * s.stride_w * s.channels));
  const char* error = rtl_cpu::routed_conv2d_grad_input(
      s, g, grad_y.data_ptr<float>(), strides_of(grad_y), weight.data_ptr<float>(), in_ptr.data_ptr<int64_t>(),
      in_idx.data_ptr<int32_t>(), in_idx.numel(), dx.data_ptr<float>(), strides_of(dx));
  TORCH_CHECK(error == nullptr, "routed conv2d input gradient: ", error);
}

void conv2d_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& perm,
                        const at::Tensor& offsets, const at::Tensor& computed, const at::Tensor& csr_ptr,
                        const at::Tensor& csr_idx, at::IntArrayRef stride, at::IntArrayRef padding,
                        at::IntArrayRef dilation, int64_t groups, at::Tensor& dw) {
  TORCH_CHECK(grad_y.dim() == 4 && x.dim() == 4 && dw.dim() == 4, "grad_y, x and dw must be 4-D");
  check_f32(dw, "dw");
  const auto s =
      conv_shape(x, dw.size(0), grad_y.sizes().slice(2), dw.sizes().slice(2), stride, padding, dilation, groups);
  TORCH_CHECK(dw.size(1) == s.channels / s.groups, "dw must have shape (O, C / groups, kh, kw)");
  check_images(x, "x", x.size(0), s.channels, s.height, s.width);
  check_images(grad_y, "grad_y", x.size(0), s.out_channels, s.out_height, s.out_width);
  const auto g = ticket_images(perm, offsets, computed, x.size(0));
  check_conv_index(csr_ptr, csr_idx, g.num_tickets * s.out_channels);
  const char* error = rtl_cpu::routed_conv2d_grad_weight(
      s, g, grad_y.data_ptr<float>(), strides_of(grad_y), x.data_ptr<float>(), strides_of(x),
      csr_ptr.data_ptr<int64_t>(), csr_idx.data_ptr<int32_t>(), csr_idx.numel(), dw.data_ptr<float>());
  TORCH_CHECK(error == nullptr, "routed conv2d weight gradient: ", error);
}

std::string kernel_isa() { return rtl_cpu::kernel_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(rtl_kernels, m) {
  m.def(
      "_cpu_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor perm, Tensor offsets, "
      "Tensor ticket_sparse, Tensor csr_ptr, Tensor csr_chunk_ptr, Tensor csr_idx, Tensor(a!) out) -> ()");
  m.def(
      "_cpu_linear_grad_input(Tensor grad_y, Tensor weight, Tensor perm, Tensor offsets, "
      "Tensor ticket_sparse, Tensor csc_ptr, Tensor csc_chunk_ptr, Tensor csc_idx, Tensor(a!) out) -> ()");
  m.def(
      "_cpu_linear_grad_weight(Tensor grad_y, Tensor x, Tensor perm, Tensor offsets, "
      "Tensor ticket_sparse, Tensor csr_ptr, Tensor csr_idx, Tensor(a!) out) -> ()");
  m.def(
      "_cpu_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, Tensor perm, Tensor offsets, Tensor computed, "
      "Tensor csr_ptr, Tensor csr_idx, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "Tensor(a!) out) -> ()");
  m.def(
      "_cpu_conv2d_grad_input(Tensor grad_y, Tensor weight, Tensor perm, Tensor offsets, Tensor computed, "
      "Tensor in_ptr, Tensor in_idx, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "Tensor(a!) dx) -> ()");
  m.def(
      "_cpu_conv2d_grad_weight(Tensor grad_y, Tensor x, Tensor perm, Tensor offsets, Tensor computed, "
      "Tensor csr_ptr, Tensor csr_idx, int[2] stride, int[2] padding, int[2] dilation, int groups, "
      "Tensor(a!) dw) -> ()");
  m.def("_cpu_kernel_isa() -> str");
}

TORCH_LIBRARY_IMPL(rtl_kernels, CPU, m) {
  m.impl("_cpu_linear_forward", &linear_forward);
  m.impl("_cpu_linear_grad_input", &linear_grad_input);
  m.impl("_cpu_linear_grad_weight", &linear_grad_weight);
  m.impl("_cpu_conv2d_forward", &conv2d_forward);
  m.impl("_cpu_conv2d_grad_input", &conv2d_grad_input);
  m.impl("_cpu_conv2d_grad_weight", &conv2d_grad_weight);
}

TORCH_LIBRARY_IMPL(rtl_kernels, CompositeExplicitAutograd, m) { m.impl("_cpu_kernel_isa", &kernel_isa); }
