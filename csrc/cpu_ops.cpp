// torch glue of the CPU kernels: registers the internal ops rtl_kernels::_cpu_* (called by
// rtl_kernels/backends/cpu.py, which owns layouts, dense tickets and the public op) and the Python module init.
// Kept thin and stable: the kernels live in csrc/cpu/, a translation unit without torch headers.
#include <Python.h>

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include "cpu/routed_linear_kernels.h"

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

void linear_forward(const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                    const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& ticket_sparse,
                    const at::Tensor& csr_ptr, const at::Tensor& csr_chunk_ptr, const at::Tensor& csr_idx,
                    at::Tensor& out) {
  check_f32(x, "x");
  check_f32(weight, "weight");
  check_f32(out, "out");
  const int64_t n = weight.size(0), k = weight.size(1);
  auto rows = routed_rows(perm, offsets, ticket_sparse);
  check_index(csr_ptr, csr_idx, rows.num_tickets * n + 1);
  const float* b = nullptr;
  if (bias.has_value()) {
    check_f32(*bias, "bias");
    b = bias->data_ptr<float>();
  }
  const int64_t n_chunks = check_chunks(csr_chunk_ptr, rows.num_tickets * n);
  advise_huge_pages(out);
  rtl_cpu::routed_linear_forward(rows, n, k, x.data_ptr<float>(), weight.data_ptr<float>(), b,
                                 csr_ptr.data_ptr<int64_t>(), csr_chunk_ptr.data_ptr<int64_t>(), n_chunks,
                                 csr_idx.data_ptr<int32_t>(), out.data_ptr<float>());
}

void linear_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& perm,
                       const at::Tensor& offsets, const at::Tensor& ticket_sparse, const at::Tensor& csc_ptr,
                       const at::Tensor& csc_chunk_ptr, const at::Tensor& csc_idx, at::Tensor& out) {
  check_f32(grad_y, "grad_y");
  check_f32(weight, "weight");
  check_f32(out, "out");
  const int64_t n = weight.size(0), k = weight.size(1);
  auto rows = routed_rows(perm, offsets, ticket_sparse);
  check_index(csc_ptr, csc_idx, rows.num_tickets * k + 1);
  const int64_t n_chunks = check_chunks(csc_chunk_ptr, rows.num_tickets * k);
  advise_huge_pages(out);
  rtl_cpu::routed_linear_grad_input(rows, n, k, grad_y.data_ptr<float>(), weight.data_ptr<float>(),
                                    csc_ptr.data_ptr<int64_t>(), csc_chunk_ptr.data_ptr<int64_t>(), n_chunks,
                                    csc_idx.data_ptr<int32_t>(), out.data_ptr<float>());
}

void linear_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& perm,
                        const at::Tensor& offsets, const at::Tensor& ticket_sparse, const at::Tensor& csr_ptr,
                        const at::Tensor& csr_idx, at::Tensor& out) {
  check_f32(grad_y, "grad_y");
  check_f32(x, "x");
  check_f32(out, "out");
  const int64_t n = out.size(0), k = out.size(1);
  auto rows = routed_rows(perm, offsets, ticket_sparse);
  check_index(csr_ptr, csr_idx, rows.num_tickets * n + 1);
  rtl_cpu::routed_linear_grad_weight(rows, n, k, grad_y.data_ptr<float>(), x.data_ptr<float>(),
                                     csr_ptr.data_ptr<int64_t>(), csr_idx.data_ptr<int32_t>(), out.data_ptr<float>());
}

rtl_cpu::ConvChunk conv_chunk(const at::Tensor& img_offsets, const at::Tensor& ticket_sparse, int64_t pixels) {
  TORCH_CHECK(img_offsets.scalar_type() == at::kLong && img_offsets.is_contiguous(), "img_offsets must be int64");
  TORCH_CHECK(ticket_sparse.scalar_type() == at::kByte && ticket_sparse.numel() + 1 == img_offsets.numel(),
              "ticket_sparse must be uint8 (T)");
  rtl_cpu::ConvChunk c;
  c.num_tickets = ticket_sparse.numel();
  c.img_offsets = img_offsets.data_ptr<int64_t>();
  c.ticket_sparse = ticket_sparse.data_ptr<uint8_t>();
  c.pixels = pixels;
  c.num_threads = at::get_num_threads();
  return c;
}

// (images, channels, pixels...) float32 tensor: channels and pixels per image.
std::pair<int64_t, int64_t> planes(const at::Tensor& t, const char* name) {
  check_f32(t, name);
  TORCH_CHECK(t.dim() >= 3, name, " must be (images, channels, pixels...)");
  const int64_t ch = t.size(1);
  return {ch, t.numel() / std::max<int64_t>(1, t.size(0) * ch)};
}

void check_image_index(const at::Tensor& index, const at::Tensor& images, int64_t count, const char* name) {
  TORCH_CHECK(index.scalar_type() == at::kLong && index.is_contiguous() && index.numel() == count, name,
              " must be contiguous int64 of ", count, " entries");
  const int64_t* p = index.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(p[i] >= 0 && p[i] < images.size(0), name, " holds image ", p[i], " outside [0, ", images.size(0), ")");
}

void conv_spmm(const at::Tensor& weight, int64_t w_out_stride, int64_t w_in_stride, const at::Tensor& ptr,
               const at::Tensor& chunk_ptr, const at::Tensor& idx, const at::Tensor& src, const at::Tensor& src_index,
               const c10::optional<at::Tensor>& bias, const at::Tensor& img_offsets, const at::Tensor& ticket_sparse,
               at::Tensor& out, const at::Tensor& out_index) {
  check_f32(weight, "weight");
  const auto [n_in, pixels] = planes(src, "src");
  const auto [n_out, out_pixels] = planes(out, "out");
  TORCH_CHECK(pixels == out_pixels, "src and out must have the same pixels per image");
  auto c = conv_chunk(img_offsets, ticket_sparse, pixels);
  const int64_t count = img_offsets.data_ptr<int64_t>()[c.num_tickets];
  check_image_index(src_index, src, count, "src_index");
  check_image_index(out_index, out, count, "out_index");
  check_index(ptr, idx, c.num_tickets * n_out + 1);
  const int64_t n_chunks = check_chunks(chunk_ptr, c.num_tickets * n_out);
  TORCH_CHECK(weight.numel() == n_out * n_in, "weight must hold n_out * n_in values");
  const float* b = nullptr;
  if (bias.has_value()) {
    check_f32(*bias, "bias");
    TORCH_CHECK(bias->numel() == n_out, "bias must have n_out entries");
    b = bias->data_ptr<float>();
  }
  rtl_cpu::routed_conv_spmm(c, n_out, n_in, weight.data_ptr<float>(), w_out_stride, w_in_stride,
                            ptr.data_ptr<int64_t>(), chunk_ptr.data_ptr<int64_t>(), n_chunks, idx.data_ptr<int32_t>(),
                            src.data_ptr<float>(), src_index.data_ptr<int64_t>(), b, out.data_ptr<float>(),
                            out_index.data_ptr<int64_t>());
}

void conv_grad_weight(const at::Tensor& dy, const at::Tensor& dy_index, const at::Tensor& cols,
                      const at::Tensor& img_offsets, const at::Tensor& ticket_sparse, const at::Tensor& csr_ptr,
                      const at::Tensor& csr_idx, at::Tensor& dw) {
  const auto [n_out, pixels] = planes(dy, "dy");
  const auto [k_in, col_pixels] = planes(cols, "cols");
  TORCH_CHECK(pixels == col_pixels, "dy and cols must have the same pixels per image");
  check_f32(dw, "dw");
  TORCH_CHECK(dw.numel() == n_out * k_in, "dw must hold n_out * k_in values");
  auto c = conv_chunk(img_offsets, ticket_sparse, pixels);
  const int64_t count = img_offsets.data_ptr<int64_t>()[c.num_tickets];
  TORCH_CHECK(cols.size(0) >= count, "cols must hold every image of the chunk");
  check_image_index(dy_index, dy, count, "dy_index");
  check_index(csr_ptr, csr_idx, c.num_tickets * n_out + 1);
  rtl_cpu::routed_conv_grad_weight(c, n_out, k_in, dy.data_ptr<float>(), dy_index.data_ptr<int64_t>(),
                                   cols.data_ptr<float>(), csr_ptr.data_ptr<int64_t>(), csr_idx.data_ptr<int32_t>(),
                                   dw.data_ptr<float>());
}

std::string kernel_isa() { return rtl_cpu::kernel_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(rtl_kernels, m) {
  m.def("_cpu_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor perm, Tensor offsets, "
        "Tensor ticket_sparse, Tensor csr_ptr, Tensor csr_chunk_ptr, Tensor csr_idx, Tensor(a!) out) -> ()");
  m.def("_cpu_linear_grad_input(Tensor grad_y, Tensor weight, Tensor perm, Tensor offsets, "
        "Tensor ticket_sparse, Tensor csc_ptr, Tensor csc_chunk_ptr, Tensor csc_idx, Tensor(a!) out) -> ()");
  m.def("_cpu_linear_grad_weight(Tensor grad_y, Tensor x, Tensor perm, Tensor offsets, "
        "Tensor ticket_sparse, Tensor csr_ptr, Tensor csr_idx, Tensor(a!) out) -> ()");
  m.def("_cpu_conv_spmm(Tensor weight, int w_out_stride, int w_in_stride, Tensor ptr, Tensor chunk_ptr, "
        "Tensor idx, Tensor src, Tensor src_index, Tensor? bias, Tensor img_offsets, Tensor ticket_sparse, "
        "Tensor(a!) out, Tensor out_index) -> ()");
  m.def("_cpu_conv_grad_weight(Tensor dy, Tensor dy_index, Tensor cols, Tensor img_offsets, "
        "Tensor ticket_sparse, Tensor csr_ptr, Tensor csr_idx, Tensor(a!) dw) -> ()");
  m.def("_cpu_kernel_isa() -> str");
}

TORCH_LIBRARY_IMPL(rtl_kernels, CPU, m) {
  m.impl("_cpu_linear_forward", &linear_forward);
  m.impl("_cpu_linear_grad_input", &linear_grad_input);
  m.impl("_cpu_linear_grad_weight", &linear_grad_weight);
  m.impl("_cpu_conv_spmm", &conv_spmm);
  m.impl("_cpu_conv_grad_weight", &conv_grad_weight);
}

TORCH_LIBRARY_IMPL(rtl_kernels, CompositeExplicitAutograd, m) { m.impl("_cpu_kernel_isa", &kernel_isa); }
