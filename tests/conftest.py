"""Test set-up: Triton runs under its interpreter on machines without a GPU; TF32 is off for fp32 checks."""

import os

import torch

if not torch.cuda.is_available():
    # Must be set before triton is first imported: it decides at decoration time whether kernels are interpreted.
    os.environ.setdefault("TRITON_INTERPRET", "1")

torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    config.addinivalue_line("markers", "slow: longer sweeps")
