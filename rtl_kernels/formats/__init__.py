"""Compiled mask layouts: block-CSR over the weight's block grid (GPU backends), row-compressed indices of linear
and conv masks (cpu backend)."""

INT32_MAX = 2**31 - 1


def check_int32_columns(what: str, columns: int) -> None:
    """The cpu kernels' indices hold column positions as int32: refuse a row longer than that can address."""
    if columns > INT32_MAX:
        raise ValueError(f"{what} has {columns} positions a row, more than the int32 index of the cpu backend holds")
