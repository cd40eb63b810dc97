"""Compiled mask layouts shared by the GPU backends (block-CSR over the weight's block grid)."""
