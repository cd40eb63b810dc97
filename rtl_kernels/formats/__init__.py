"""Compiled mask layouts: block-CSR over the weight's block grid (GPU backends), row-compressed indices of linear
and conv masks (cpu backend)."""
