"""Complex-mask U-Net for speech enhancement as in the paper (arXiv 2601.22141, Sec. 3.1, App. D.2).

Input is a complex STFT as two real channels (real, imag) shaped (B, 2, T, F); the network predicts a complex
ratio mask (B, 2, T, F) and returns the input multiplied by it (complex product). Five encoder convs with
channels [12, 12, 12, 24, 48] and five decoder transposed convs 48->24, 48->12, 24->12, 24->12, 24->2, each
decoder output but the last concatenated with the encoder output of the same resolution. All ten convs are the
pruning scope: 37,368 weights, the paper's ~37.4K.

Decisions where the paper is silent or ambiguous (docs/paper_notes.md, choice 17):
    - Every encoder conv has stride (1, 2) and every decoder conv upsamples by (1, 2): this is the only layout in
      which the decoder inputs 48, 24, 24, 24 are a previous output concatenated with an encoder output of the same
      resolution. The stride acts on the LAST axis, F (frequency), as the shape [C, T, F] with stride (1, 2)
      implies; the paper's text says "time axis".
    - Kernels are 3x3 except the first encoder conv and the last decoder conv, (3, 5); padding keeps T and halves
      F (ceil(F / 2)) in the encoder; the decoder asks each transposed conv for the skip's size (``output_size``),
      so any T >= 1 and F >= 1 work. F = 32 n + 1 (513 for a 1024-point STFT) halves exactly at every level.
    - Encoder and decoder blocks are conv -> BN -> ELU, without conv bias (BN follows); the last decoder conv has a
      bias and no BN or activation. Only weights count toward 37,368.
    - The mask is bounded with tanh on its real and imaginary parts (``mask_activation="tanh"``), so each
      component lies in (-1, 1); ``mask_activation=None`` leaves it unbounded.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._filters import check_filter_args

__all__ = ["SpeechUNet", "apply_complex_mask"]

ENCODER_CHANNELS = (12, 12, 12, 24, 48)
# (in, out) of the decoder's transposed convs: after the first, in = previous out + the skip's channels.
DECODER_CHANNELS = ((48, 24), (48, 12), (24, 12), (24, 12), (24, 2))


def apply_complex_mask(spec: Tensor, mask: Tensor) -> Tensor:
    """Multiply a two-channel complex spectrogram by a two-channel complex mask.

    Args:
        spec (B, 2, T, F): real and imaginary parts.
        mask (B, 2, T, F): real and imaginary parts of the mask.

    Returns:
        (B, 2, T, F): (spec_re * mask_re - spec_im * mask_im, spec_re * mask_im + spec_im * mask_re).

    Example:
        >>> apply_complex_mask(torch.randn(1, 2, 4, 9), torch.randn(1, 2, 4, 9)).shape
        torch.Size([1, 2, 4, 9])
    """
    if spec.dim() != 4 or spec.shape[1] != 2:
        raise ValueError(f"spec must be (B, 2, T, F), got shape {tuple(spec.shape)}")
    if mask.shape != spec.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from spec shape {tuple(spec.shape)}")
    s_re, s_im = spec[:, 0], spec[:, 1]
    m_re, m_im = mask[:, 0], mask[:, 1]
    return torch.stack((s_re * m_re - s_im * m_im, s_re * m_im + s_im * m_re), dim=1)


class SpeechUNet(nn.Module):
    """The paper's complex-ratio-mask U-Net: 5 strided encoder convs, 5 upsampling transposed convs, skips.

    Layers (in -> out, kernel, stride; T is kept, F halves per encoder level and doubles back):
        enc0 2->12 (3,5) (1,2); enc1 12->12 3x3; enc2 12->12 3x3; enc3 12->24 3x3; enc4 24->48 3x3;
        dec0 48->24 3x3; dec1 48->12 3x3; dec2 24->12 3x3; dec3 24->12 3x3; dec4 24->2 (3,5); all (1,2).
    Weights are Kaiming-normal with the ReLU gain (paper App. A.2; fan_in for convs, fan_out = C_in * kh * kw
    for transposed convs, the number of inputs each output position gathers before the stride), biases zero.
    See the module docstring for the decisions the paper leaves open.

    Args:
        mask_activation: ``"tanh"`` (each mask component in (-1, 1)) or None (unbounded mask).

    Shapes:
        x (B, 2, T, F) real/imag STFT -> enhanced (B, 2, T, F); :meth:`predict_mask` gives the mask (B, 2, T, F).

    Example:
        >>> model = SpeechUNet()
        >>> model(torch.randn(2, 2, 16, 65)).shape
        torch.Size([2, 2, 16, 65])
        >>> routed = rtl.convert_(model, num_tickets=3, filter_fn=model.prunable_filter)
    """

    def __init__(self, mask_activation: Optional[str] = "tanh"):
        super().__init__()
        if mask_activation not in ("tanh", None):
            raise ValueError(f"mask_activation must be 'tanh' or None, got {mask_activation!r}")
        self.mask_activation = mask_activation
        self.encoder = nn.ModuleList()
        in_channels = 2
        for level, out_channels in enumerate(ENCODER_CHANNELS):
            kernel = (3, 5) if level == 0 else (3, 3)
            self.encoder.append(
                nn.Sequential(
                    nn.Conv2d(
                        in_channels, out_channels, kernel, stride=(1, 2), padding=(1, kernel[1] // 2), bias=False
                    ),
                    nn.BatchNorm2d(out_channels),
                    nn.ELU(inplace=True),
                )
            )
            in_channels = out_channels
        self.decoder = nn.ModuleList()
        last = len(DECODER_CHANNELS) - 1
        for level, (in_channels, out_channels) in enumerate(DECODER_CHANNELS):
            kernel = (3, 5) if level == last else (3, 3)
            conv = nn.ConvTranspose2d(
                in_channels, out_channels, kernel, stride=(1, 2), padding=(1, kernel[1] // 2), bias=level == last
            )
            # The last block is the bare mask conv; the others follow the encoder's conv -> BN -> ELU.
            block = [conv] if level == last else [conv, nn.BatchNorm2d(out_channels), nn.ELU(inplace=True)]
            self.decoder.append(nn.Sequential(*block))
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.ConvTranspose2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def predict_mask(self, x: Tensor) -> Tensor:
        """The complex ratio mask.

        Args:
            x (B, 2, T, F): real and imaginary STFT.

        Returns:
            mask (B, 2, T, F): real and imaginary parts, tanh-bounded unless ``mask_activation`` is None.

        Example:
            >>> SpeechUNet().predict_mask(torch.randn(1, 2, 8, 33)).shape
            torch.Size([1, 2, 8, 33])
        """
        if x.dim() != 4 or x.shape[1] != 2:
            raise ValueError(f"x must be (B, 2, T, F), got shape {tuple(x.shape)}")
        sizes, skips = [], []
        y = x
        for block in self.encoder:
            sizes.append(y.shape[-2:])
            y = block(y)
            skips.append(y)
        skips.pop()  # the deepest output is the decoder's input, not a skip
        for block in self.decoder:
            # Restore the size the matching encoder level took in; the transposed conv picks its output_padding
            # from output_size, so odd and even F both round-trip.
            y = block[0](y, output_size=sizes.pop())
            for layer in block[1:]:
                y = layer(y)
            if skips:
                y = torch.cat([y, skips.pop()], dim=1)
        return torch.tanh(y) if self.mask_activation == "tanh" else y

    def forward(self, x: Tensor) -> Tensor:
        """x (B, 2, T, F) -> the input times the predicted complex mask, (B, 2, T, F)."""
        return apply_complex_mask(x, self.predict_mask(x))

    def prunable_filter(self, name: str, module: nn.Module) -> bool:
        """True for the layers the paper prunes: all ten convs (encoder convs and decoder transposed convs).

        Usable as ``filter_fn`` of :func:`rtl.convert_`; it judges by type, so it also holds after conversion.
        It reads nothing from ``self``: the class's function serves any instance.

        Args:
            name: the module's name as ``named_modules`` gives it.
            module: the module.

        Returns:
            Whether the module is in the pruning scope.

        Example:
            >>> model = SpeechUNet()
            >>> sum(m.weight.numel() for n, m in model.named_modules() if model.prunable_filter(n, m))
            37368
        """
        check_filter_args(name, module)
        return isinstance(module, (nn.Conv2d, nn.ConvTranspose2d))
