// torch glue of the CUDA kernels: registers the internal ops rtl_kernels::_cuda_* (called by
// rtl_kernels/backends/cuda.py, which owns the layouts and the public op) and the Python module init (no pybind).
// Kept thin and stable (a torch translation unit takes minutes to compile): the kernels live in csrc/cuda/, a
// translation unit without torch headers. Every op checks what the kernels rely on (dtypes, devices, contiguity,
// layout sizes), runs on the tensors' device and current stream, never syncs, and raises on a launch error.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <string>

#include "cuda/routed_conv2d_kernels.cuh"
#include "cuda/routed_linear_kernels.cuh"
#include "op_checks.h"

extern "C" PyObject* PyInit__C_cuda(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C_cuda",
                               "rtl_kernels CUDA kernels (ops in torch.ops.rtl_kernels)", -1, nullptr};
  return PyModule_Create(&module);
}

namespace {

rtl_cuda::DType element_type(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return rtl_cuda::DType::kFloat32;
    case at::kHalf:
      return rtl_cuda::DType::kFloat16;
    case at::kBFloat16:
      return rtl_cuda::DType::kBFloat16;
    default:
      break;
  }
  TORCH_CHECK(false, name, " must be float32, float16 or bfloat16 for the cuda backend, got ", t.scalar_type());
  return rtl_cuda::DType::kFloat32;  // not reached
}

// t is a contiguous tensor of dtype `dtype` on `device` with the given sizes.
void check(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device,
           c10::IntArrayRef sizes) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, " (where x is), got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.sizes() == sizes, name, " must have shape ", sizes, ", got ", t.sizes());
}

// A 1-D contiguous index tensor of that dtype on `device` (length checked by the caller where it is known).
void check_1d(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Device& device) {
  TORCH_CHECK(t.device() == device, name, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.is_contiguous(), name, " must be a contiguous 1-D ", dtype,
              " tensor, got ", t.scalar_type(), " of shape ", t.sizes());
}

void check_blocks(int64_t block_n, int64_t block_k) {
  TORCH_CHECK(block_n == rtl_cuda::kBlockN && block_k == rtl_cuda::kBlockK, "the cuda kernels need a layout of ",
              rtl_cuda::kBlockN, "x", rtl_cuda::kBlockK, " blocks, got ", block_n, "x", block_k);
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// perm (B) and offsets (T + 1) int64 on x's device; masks (T, N, K) bool.
rtl_cuda::RoutedRows routed_rows(const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& masks,
                                 int64_t batch, const at::Device& device) {
  TORCH_CHECK(masks.dim() == 3, "masks must be (T, N, K), got shape ", masks.sizes());
  const int64_t tickets = masks.size(0);
  check(perm, "perm", at::kLong, device, {batch});
  check(offsets, "offsets", at::kLong, device, {tickets + 1});
  rtl_cuda::RoutedRows rows;
  rows.batch = batch;
  rows.num_tickets = tickets;
  rows.perm = perm.data_ptr<int64_t>();
  rows.offsets = offsets.data_ptr<int64_t>();
  return rows;
}

void raise_on_error(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "rtl_kernels cuda ", what, " failed: ", cudaGetErrorString(err), " (",
              static_cast<int>(err), ")");
}

// Grid limits of the kernels (grid.y <= 65535 output blocks), checked here with a clear message.
void check_grid(int64_t out_blocks, const char* dim_name, int64_t dim) {
  TORCH_CHECK(out_blocks <= 65535, "the cuda backend supports ", dim_name, " up to 65535 * 64, got ", dim);
}

// What the forward and the input gradient check alike: a (B, a_cols) times the masked weight (N, K), read
// transposed for the input gradient, into out (B, out_cols) through a block index of out_cols / 64 block rows a
// ticket. Returns the element type, the grouping and (N, K).
struct Product {
  rtl_cuda::DType dtype;
  rtl_cuda::RoutedRows rows;
  int64_t n, k;
};

Product check_product(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& masks, const at::Tensor& perm,
                      const at::Tensor& offsets, const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& full,
                      int64_t block_n, int64_t block_k, const at::Tensor& out, bool transposed) {
  const char* a_name = transposed ? "grad_y" : "x";
  check_blocks(block_n, block_k);
  TORCH_CHECK(a.is_cuda() && a.dim() == 2, a_name, " must be a 2-D CUDA tensor, got ", a.device(), " ", a.sizes());
  TORCH_CHECK(weight.dim() == 2, "weight must be 2-D, got shape ", weight.sizes());
  const auto device = a.device();
  Product p;
  p.dtype = element_type(a, a_name);
  p.n = weight.size(0);
  p.k = weight.size(1);
  const int64_t b = a.size(0), a_cols = transposed ? p.n : p.k, out_cols = transposed ? p.k : p.n;
  check(a, a_name, a.scalar_type(), device, {b, a_cols});
  check(weight, "weight", a.scalar_type(), device, {p.n, p.k});
  check(masks, "masks", at::kBool, device, {masks.dim() == 3 ? masks.size(0) : -1, p.n, p.k});
  check(out, "out", a.scalar_type(), device, {b, out_cols});
  p.rows = routed_rows(perm, offsets, masks, b, device);
  const int64_t out_blocks = cdiv(out_cols, transposed ? rtl_cuda::kBlockK : rtl_cuda::kBlockN);
  check(ptr, transposed ? "t_col_ptr" : "row_ptr", at::kInt, device, {p.rows.num_tickets * out_blocks + 1});
  check_1d(idx, transposed ? "t_row_idx" : "col_idx", at::kInt, device);
  check(full, transposed ? "t_full" : "full", at::kChar, device, {idx.numel()});
  check_grid(out_blocks, transposed ? "in_features" : "out_features", out_cols);
  return p;
}

void linear_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& masks,
                    const std::optional<at::Tensor>& bias, const at::Tensor& perm, const at::Tensor& offsets,
                    const at::Tensor& row_ptr, const at::Tensor& col_idx, const at::Tensor& full, int64_t block_n,
                    int64_t block_k, at::Tensor& out) {
  const Product p =
      check_product(x, weight, masks, perm, offsets, row_ptr, col_idx, full, block_n, block_k, out, false);
  if (bias.has_value()) check(*bias, "bias", x.scalar_type(), x.device(), {p.n});
  if (out.numel() == 0) return;

  const auto device = x.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  raise_on_error(rtl_cuda::linear_forward(p.dtype, p.rows, p.n, p.k, x.data_ptr(), weight.data_ptr(),
                                          reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>()),
                                          bias.has_value() ? bias->data_ptr() : nullptr, row_ptr.data_ptr<int32_t>(),
                                          col_idx.data_ptr<int32_t>(), full.data_ptr<int8_t>(), out.data_ptr(), stream),
                 "linear_forward");
}

void linear_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& masks,
                       const at::Tensor& perm, const at::Tensor& offsets, const at::Tensor& t_col_ptr,
                       const at::Tensor& t_row_idx, const at::Tensor& t_full, int64_t block_n, int64_t block_k,
                       at::Tensor& out) {
  const Product p =
      check_product(grad_y, weight, masks, perm, offsets, t_col_ptr, t_row_idx, t_full, block_n, block_k, out, true);
  if (out.numel() == 0) return;

  const auto device = grad_y.device();
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  raise_on_error(rtl_cuda::linear_grad_input(p.dtype, p.rows, p.n, p.k, grad_y.data_ptr(), weight.data_ptr(),
                                             reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>()),
                                             t_col_ptr.data_ptr<int32_t>(), t_row_idx.data_ptr<int32_t>(),
                                             t_full.data_ptr<int8_t>(), out.data_ptr(), stream),
                 "linear_grad_input");
}

void linear_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& masks, const at::Tensor& perm,
                        const at::Tensor& offsets, const at::Tensor& w_ptr, const at::Tensor& w_tickets,
                        int64_t block_n, int64_t block_k, at::Tensor& out) {
  check_blocks(block_n, block_k);
  TORCH_CHECK(grad_y.is_cuda() && grad_y.dim() == 2, "grad_y must be a 2-D CUDA tensor, got ", grad_y.device(), " ",
              grad_y.sizes());
  TORCH_CHECK(x.dim() == 2, "x must be 2-D, got shape ", x.sizes());
  const auto device = grad_y.device();
  const auto dtype = element_type(grad_y, "grad_y");
  const int64_t b = grad_y.size(0), n = grad_y.size(1), k = x.size(1);
  check(x, "x", grad_y.scalar_type(), device, {b, k});
  check(masks, "masks", at::kBool, device, {masks.dim() == 3 ? masks.size(0) : -1, n, k});
  check(out, "out", grad_y.scalar_type(), device, {n, k});
  const auto rows = routed_rows(perm, offsets, masks, b, device);
  check(w_ptr, "w_ptr", at::kInt, device, {cdiv(n, rtl_cuda::kBlockN) * cdiv(k, rtl_cuda::kBlockK) + 1});
  check_1d(w_tickets, "w_tickets", at::kInt, device);
  if (out.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  const int splits = rtl_cuda::grad_weight_splits(b, n, k, device.index());
  // Per-split fp32 partials of a small W with many rows; from the caching allocator, so graph capture works.
  at::Tensor workspace;
  if (splits > 1) workspace = at::empty({splits, n, k}, grad_y.options().dtype(at::kFloat));
  raise_on_error(
      rtl_cuda::linear_grad_weight(dtype, rows, n, k, grad_y.data_ptr(), x.data_ptr(),
                                   reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>()), w_ptr.data_ptr<int32_t>(),
                                   w_tickets.data_ptr<int32_t>(), splits,
                                   splits > 1 ? workspace.data_ptr<float>() : nullptr, out.data_ptr(), stream),
      "linear_grad_weight");
}

// ---- routed masked conv2d -----------------------------------------------------------------------------------------

// The conv geometry of input (B, C, H, W) and weight (O, C / groups, kh, kw) with T tickets, checked; out_h/out_w
// as F.conv2d computes them (must be positive).
rtl_cuda::Conv2dShape conv2d_shape(c10::IntArrayRef input, c10::IntArrayRef weight, int64_t tickets,
                                   c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation,
                                   int64_t groups) {
  TORCH_CHECK(input.size() == 4, "the conv input must be (B, C, H, W), got shape ", input);
  TORCH_CHECK(weight.size() == 4, "weight must be (O, C / groups, kh, kw), got shape ", weight);
  rtl_cuda::Conv2dShape s{};
  rtl_ops::set_conv_params(s, stride, padding, dilation, groups);
  TORCH_CHECK(tickets >= 1, "masks must hold at least one ticket, got ", tickets);
  s.batch = input[0];
  s.channels = input[1];
  s.height = input[2];
  s.width = input[3];
  s.out_channels = weight[0];
  s.kernel_h = weight[2];
  s.kernel_w = weight[3];
  TORCH_CHECK(s.channels % groups == 0 && s.out_channels % groups == 0, "groups = ", groups,
              " must divide the input channels (", s.channels, ") and the output channels (", s.out_channels, ")");
  TORCH_CHECK(weight[1] == s.channels / groups, "weight must be (O, C / groups, kh, kw) = (", s.out_channels, ", ",
              s.channels / groups, ", kh, kw), got shape ", weight);
  s.num_tickets = tickets;
  TORCH_CHECK(s.kernel_h >= 1 && s.kernel_w >= 1, "the kernel must be at least 1 x 1, got weight shape ", weight);
  s.out_h = rtl_ops::conv_out_size(s.height, s.pad_h, s.dil_h, s.kernel_h, s.stride_h);
  s.out_w = rtl_ops::conv_out_size(s.width, s.pad_w, s.dil_w, s.kernel_w, s.stride_w);
  TORCH_CHECK(s.out_h > 0 && s.out_w > 0, "the conv output would be empty (", s.out_h, " x ", s.out_w, ") for input ",
              input, ", kernel ", s.kernel_h, " x ", s.kernel_w, ", padding ", padding, ", dilation ", dilation,
              ", stride ", stride);
  const std::string problem = rtl_cuda::conv2d_grid_problem(s);
  TORCH_CHECK(problem.empty(), "the cuda backend cannot run this conv2d: ", problem);
  return s;
}

// masks (T, O, C / groups, kh, kw) bool, perm (B) and offsets (T + 1) int64, all on `device`.
void check_conv_routing(const at::Tensor& masks, const at::Tensor& perm, const at::Tensor& offsets,
                        const rtl_cuda::Conv2dShape& s, const at::Device& device) {
  check(masks, "masks", at::kBool, device,
        {s.num_tickets, s.out_channels, s.channels / s.groups, s.kernel_h, s.kernel_w});
  check(perm, "perm", at::kLong, device, {s.batch});
  check(offsets, "offsets", at::kLong, device, {s.num_tickets + 1});
}

int64_t mask_tickets(const at::Tensor& masks) {
  TORCH_CHECK(masks.dim() == 5, "masks must be (T, O, C / groups, kh, kw), got shape ", masks.sizes());
  return masks.size(0);
}

void conv2d_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& masks,
                    const std::optional<at::Tensor>& bias, const at::Tensor& perm, const at::Tensor& offsets,
                    c10::IntArrayRef stride, c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups,
                    at::Tensor& out) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 4, "x must be a 4-D CUDA tensor, got ", x.device(), " ", x.sizes());
  const auto device = x.device();
  const auto dtype = element_type(x, "x");
  const auto s = conv2d_shape(x.sizes(), weight.sizes(), mask_tickets(masks), stride, padding, dilation, groups);
  check(x, "x", x.scalar_type(), device, x.sizes());
  check(weight, "weight", x.scalar_type(), device, weight.sizes());
  check_conv_routing(masks, perm, offsets, s, device);
  if (bias.has_value()) check(*bias, "bias", x.scalar_type(), device, {s.out_channels});
  check(out, "out", x.scalar_type(), device, {s.batch, s.out_channels, s.out_h, s.out_w});
  if (out.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  raise_on_error(rtl_cuda::conv2d_forward(dtype, s, perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), x.data_ptr(),
                                          weight.data_ptr(), reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>()),
                                          bias.has_value() ? bias->data_ptr() : nullptr, out.data_ptr(), stream),
                 "conv2d_forward");
}

// out = dx (B, C, H, W): its shape gives the input geometry (several H give the same Ho when stride > 1).
void conv2d_grad_input(const at::Tensor& grad_y, const at::Tensor& weight, const at::Tensor& masks,
                       const at::Tensor& perm, const at::Tensor& offsets, c10::IntArrayRef stride,
                       c10::IntArrayRef padding, c10::IntArrayRef dilation, int64_t groups, at::Tensor& out) {
  TORCH_CHECK(grad_y.is_cuda() && grad_y.dim() == 4, "grad_y must be a 4-D CUDA tensor, got ", grad_y.device(), " ",
              grad_y.sizes());
  const auto device = grad_y.device();
  const auto dtype = element_type(grad_y, "grad_y");
  const auto s = conv2d_shape(out.sizes(), weight.sizes(), mask_tickets(masks), stride, padding, dilation, groups);
  check(grad_y, "grad_y", grad_y.scalar_type(), device, {s.batch, s.out_channels, s.out_h, s.out_w});
  check(weight, "weight", grad_y.scalar_type(), device, weight.sizes());
  check_conv_routing(masks, perm, offsets, s, device);
  check(out, "out", grad_y.scalar_type(), device, out.sizes());
  if (out.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  raise_on_error(
      rtl_cuda::conv2d_grad_input(dtype, s, perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), grad_y.data_ptr(),
                                  weight.data_ptr(), reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>()),
                                  out.data_ptr(), stream),
      "conv2d_grad_input");
}

// out = dW (O, C / groups, kh, kw): its shape gives the weight geometry.
void conv2d_grad_weight(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& masks, const at::Tensor& perm,
                        const at::Tensor& offsets, c10::IntArrayRef stride, c10::IntArrayRef padding,
                        c10::IntArrayRef dilation, int64_t groups, at::Tensor& out) {
  TORCH_CHECK(grad_y.is_cuda() && grad_y.dim() == 4, "grad_y must be a 4-D CUDA tensor, got ", grad_y.device(), " ",
              grad_y.sizes());
  const auto device = grad_y.device();
  const auto dtype = element_type(grad_y, "grad_y");
  const auto s = conv2d_shape(x.sizes(), out.sizes(), mask_tickets(masks), stride, padding, dilation, groups);
  check(x, "x", grad_y.scalar_type(), device, x.sizes());
  check(grad_y, "grad_y", grad_y.scalar_type(), device, {s.batch, s.out_channels, s.out_h, s.out_w});
  check_conv_routing(masks, perm, offsets, s, device);
  check(out, "out", grad_y.scalar_type(), device, out.sizes());
  if (out.numel() == 0) return;

  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  raise_on_error(rtl_cuda::conv2d_grad_weight(
                     dtype, s, perm.data_ptr<int64_t>(), offsets.data_ptr<int64_t>(), grad_y.data_ptr(), x.data_ptr(),
                     reinterpret_cast<const uint8_t*>(masks.data_ptr<bool>()), out.data_ptr(), stream),
                 "conv2d_grad_weight");
}

// "" when the kernels can run on that CUDA device, else why not.
std::string device_problem(int64_t device) {
  TORCH_CHECK(device >= 0, "device must be a CUDA device index, got ", device);
  return rtl_cuda::device_problem(static_cast<int>(device));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rtl_kernels, m) {
  m.def(
      "_cuda_linear_forward(Tensor x, Tensor weight, Tensor masks, Tensor? bias, Tensor perm, Tensor offsets, "
      "Tensor row_ptr, Tensor col_idx, Tensor full, int block_n, int block_k, Tensor(a!) out) -> ()");
  m.def(
      "_cuda_linear_grad_input(Tensor grad_y, Tensor weight, Tensor masks, Tensor perm, Tensor offsets, "
      "Tensor t_col_ptr, Tensor t_row_idx, Tensor t_full, int block_n, int block_k, Tensor(a!) out) -> ()");
  m.def(
      "_cuda_linear_grad_weight(Tensor grad_y, Tensor x, Tensor masks, Tensor perm, Tensor offsets, "
      "Tensor w_ptr, Tensor w_tickets, int block_n, int block_k, Tensor(a!) out) -> ()");
  m.def(
      "_cuda_conv2d_forward(Tensor x, Tensor weight, Tensor masks, Tensor? bias, Tensor perm, Tensor offsets, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor(a!) out) -> ()");
  m.def(
      "_cuda_conv2d_grad_input(Tensor grad_y, Tensor weight, Tensor masks, Tensor perm, Tensor offsets, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor(a!) out) -> ()");
  m.def(
      "_cuda_conv2d_grad_weight(Tensor grad_y, Tensor x, Tensor masks, Tensor perm, Tensor offsets, "
      "int[2] stride, int[2] padding, int[2] dilation, int groups, Tensor(a!) out) -> ()");
  m.def("_cuda_device_problem(int device) -> str");
}

TORCH_LIBRARY_IMPL(rtl_kernels, CUDA, m) {
  m.impl("_cuda_linear_forward", &linear_forward);
  m.impl("_cuda_linear_grad_input", &linear_grad_input);
  m.impl("_cuda_linear_grad_weight", &linear_grad_weight);
  m.impl("_cuda_conv2d_forward", &conv2d_forward);
  m.impl("_cuda_conv2d_grad_input", &conv2d_grad_input);
  m.impl("_cuda_conv2d_grad_weight", &conv2d_grad_weight);
}

TORCH_LIBRARY_IMPL(rtl_kernels, CompositeExplicitAutograd, m) { m.impl("_cuda_device_problem", &device_problem); }
