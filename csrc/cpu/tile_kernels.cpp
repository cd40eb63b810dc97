// The tile loops (tile_loops.inc) compiled for three instruction sets, the run-time choice among them, and the
// per-thread scratch buffers. See tile_kernels.h.
#include "tile_kernels.h"

#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace rtl_cpu::tile {
namespace generic {
#include "tile_loops.inc"
}  // namespace generic

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "tile_loops.inc"
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx2,fma")
#define RTL_TILE_LANES 16
namespace avx512 {
#include "tile_loops.inc"
}  // namespace avx512
#undef RTL_TILE_LANES
#pragma GCC pop_options

const Isa& isa() {
  static const Isa chosen = [] {
    __builtin_cpu_init();
    // The widest ISA the CPU has. RTL_CPU_ISA=avx2 or =generic caps it (tests run every path the machine has;
    // a user can opt out of 512-bit vectors where they lower the clock); a cap above the CPU is ignored. The
    // Python side refuses any other value before this runs.
    const char* forced = std::getenv("RTL_CPU_ISA");
    const int cap = forced == nullptr                     ? 2
                    : std::strcmp(forced, "generic") == 0 ? 0
                    : std::strcmp(forced, "avx2") == 0    ? 1
                                                          : 2;
    const bool has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    if (cap >= 2 && has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl"))
      return Isa{avx512::spmm_tile,
                 avx512::sddmm_row,
                 avx512::transpose_rows8,
                 avx512::depthwise_forward_plane,
                 avx512::depthwise_grad_input_plane,
                 avx512::depthwise_grad_weight_plane,
                 avx512::depthwise_lanes_image,
                 "avx512"};
    if (cap >= 1 && has_avx2)
      return Isa{avx2::spmm_tile,
                 avx2::sddmm_row,
                 avx2::transpose_rows8,
                 avx2::depthwise_forward_plane,
                 avx2::depthwise_grad_input_plane,
                 avx2::depthwise_grad_weight_plane,
                 avx2::depthwise_lanes_image,
                 "avx2"};
    return Isa{generic::spmm_tile,
               generic::sddmm_row,
               generic::transpose_rows8,
               generic::depthwise_forward_plane,
               generic::depthwise_grad_input_plane,
               generic::depthwise_grad_weight_plane,
               generic::depthwise_lanes_image,
               "generic"};
  }();
  return chosen;
}

namespace {
// Allocating tens of MB per call cost more than the arithmetic (fresh pages fault on first touch: 20 ms for 32 MB
// measured on the 2-core machine), so the buffers grow and are kept; each calling thread has its own, so
// concurrent calls from several threads stay safe.
struct Scratch {
  std::vector<char> slot[kNumSlots];
};
}  // namespace

void* scratch(int slot, size_t bytes) {
  thread_local Scratch ws;
  std::vector<char>& buf = ws.slot[slot];
  // 64-byte aligned: an unaligned tile made half of the 32-byte loads straddle two cache lines.
  if (buf.size() < bytes + 64) {
    buf.clear();
    buf.shrink_to_fit();
    buf.resize(bytes + 64);
  }
  const uintptr_t p = reinterpret_cast<uintptr_t>(buf.data());
  return reinterpret_cast<void*>((p + 63) & ~static_cast<uintptr_t>(63));
}

}  // namespace rtl_cpu::tile
