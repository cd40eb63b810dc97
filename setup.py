"""Build of rtl_kernels' compiled extensions.

- rtl_kernels._C       C++ CPU kernels (OpenMP, AVX2 chosen at run time), built whenever a compiler works.
- rtl_kernels._C_cuda  CUDA kernels, built when torch is a CUDA build and CUDA_HOME is set.

Environment:
    RTL_BUILD_CPU=auto|0|1   (auto: build, and fall back to pure Python if it fails; 1: a failure is an error)
    RTL_BUILD_CUDA=auto|0|1  (auto: build when torch has CUDA and CUDA_HOME is set; 1: required)
    RTL_SANITIZE=1           (the CPU extension with AddressSanitizer and UndefinedBehaviorSanitizer, for
                              tools/sanitizer_lane.sh; such a build needs libasan preloaded to import)
    TORCH_CUDA_ARCH_LIST     (default "9.0": Hopper, the GPUs rtl is measured on)
    MAX_JOBS                 (ninja parallelism)

Install with ``pip install --no-build-isolation -e .``: the build needs the torch already installed.
"""

import os
import sys
import warnings

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> str:
    value = os.environ.get(name, "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise SystemExit(f"{name} must be auto, 0 or 1, got {value!r}")
    return value


def _extensions():
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        warnings.warn("torch is not importable at build time: installing rtl as pure Python")
        return [], {}

    exts, required = [], set()
    cpu_flag = _flag("RTL_BUILD_CPU")
    cxx_flags, link_flags = ["-O3", "-fopenmp", "-std=c++20", "-ffp-contract=fast", "-Wno-psabi"], ["-fopenmp"]
    if os.environ.get("RTL_SANITIZE") == "1":
        sanitize = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
        cxx_flags = ["-O1", "-g"] + cxx_flags[1:] + sanitize
        link_flags = link_flags + sanitize
    if cpu_flag != "0":
        exts.append(
            cpp_extension.CppExtension(
                "rtl_kernels._C",
                sources=[
                    "csrc/cpu_ops.cpp",
                    "csrc/cpu/tile_kernels.cpp",
                    "csrc/cpu/routed_linear_kernels.cpp",
                    "csrc/cpu/routed_conv_kernels.cpp",
                ],
                extra_compile_args={"cxx": cxx_flags},
                extra_link_args=link_flags,
            )
        )
        if cpu_flag == "1":
            required.add("rtl_kernels._C")

    cuda_flag = _flag("RTL_BUILD_CUDA")
    cuda_home = cpp_extension.CUDA_HOME
    can_cuda = torch.version.cuda is not None and cuda_home is not None and os.path.exists(cuda_home)
    if cuda_flag == "1" and not can_cuda:
        raise SystemExit(f"RTL_BUILD_CUDA=1 but torch.version.cuda={torch.version.cuda!r} and CUDA_HOME={cuda_home!r}")
    if cuda_flag != "0" and can_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "9.0")
        exts.append(
            cpp_extension.CUDAExtension(
                "rtl_kernels._C_cuda",
                sources=[
                    "csrc/cuda_ops.cpp",
                    "csrc/cuda/routed_linear_kernels.cu",
                    "csrc/cuda/routed_conv2d_kernels.cu",
                ],
                extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": ["-O3", "-std=c++20", "-lineinfo"]},
            )
        )
        if cuda_flag == "1":
            required.add("rtl_kernels._C_cuda")

    base = cpp_extension.BuildExtension.with_options(use_ninja=True)

    class OptionalBuildExtension(base):
        """Builds each extension on its own; an optional one that fails leaves rtl pure Python for it."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # compiler missing or broken
                if ext.name in required:
                    raise
                warnings.warn(f"skipping optional extension {ext.name}: {exc}")
                print(f"rtl: {ext.name} not built ({exc}); the reference backend still works", file=sys.stderr)

    return exts, {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()

# Metadata, dependencies and the version live in pyproject.toml; this file adds the compiled extensions.
setup(ext_modules=ext_modules, cmdclass=cmdclass, zip_safe=False)
