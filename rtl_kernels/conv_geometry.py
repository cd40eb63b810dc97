"""Output sizes of convolutions (F.conv2d / F.conv_transpose2d arithmetic), shared by the ops and the backends."""


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one spatial axis."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def transposed_output_size(
    size: int, kernel: int, stride: int, padding: int, dilation: int, output_padding: int
) -> int:
    """Output length of a transposed convolution along one spatial axis."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1
