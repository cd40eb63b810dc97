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

#include <cstdint>

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

std::string kernel_isa() { return rtl_cpu::kernel_isa(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(rtl_kernels, m) {
  m.def("_cpu_linear_forward(Tensor x, Tensor weight, Tensor? bias, Tensor perm, Tensor offsets, "
        "Tensor ticket_sparse, Tensor csr_ptr, Tensor csr_chunk_ptr, Tensor csr_idx, Tensor(a!) out) -> ()");
  m.def("_cpu_linear_grad_input(Tensor grad_y, Tensor weight, Tensor perm, Tensor offsets, "
        "Tensor ticket_sparse, Tensor csc_ptr, Tensor csc_chunk_ptr, Tensor csc_idx, Tensor(a!) out) -> ()");
  m.def("_cpu_linear_grad_weight(Tensor grad_y, Tensor x, Tensor perm, Tensor offsets, "
        "Tensor ticket_sparse, Tensor csr_ptr, Tensor csr_idx, Tensor(a!) out) -> ()");
  m.def("_cpu_kernel_isa() -> str");
}

TORCH_LIBRARY_IMPL(rtl_kernels, CPU, m) {
  m.impl("_cpu_linear_forward", &linear_forward);
  m.impl("_cpu_linear_grad_input", &linear_grad_input);
  m.impl("_cpu_linear_grad_weight", &linear_grad_weight);
}

TORCH_LIBRARY_IMPL(rtl_kernels, CompositeExplicitAutograd, m) { m.impl("_cpu_kernel_isa", &kernel_isa); }
