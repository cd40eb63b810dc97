"""The speech-enhancement task (paper §3.1, App. D, Table 3): one ticket per acoustic environment.

The paper's complex-mask U-Net (:class:`rtl.models.SpeechUNet`) enhances noisy speech; each environment (indoor,
outdoor, transport) has its own ticket, trained on that environment's clips only (no negatives, App. D.3), and a
clip is routed by its known environment (the paper's oracle cue). Data: :mod:`rtl.data.speech` (espeak-ng speech,
or a numpy formant synthesiser without it, mixed with synthetic environment noise).

Objective: the paper's weighted SDR loss (:func:`wsdr_loss`) on the waveform the enhanced STFT inverts to. Metric:
SI-SNRi (:func:`rtl.metrics.si_snr_improvement`), the mean over test clips, and per environment.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch
from torch import Tensor, nn

from .. import metrics as rtl_metrics
from .tasks import Settings, Task, predict, predict_routed

__all__ = ["SpeechEnvironments", "wsdr_loss"]


def wsdr_loss(mixture: Tensor, clean: Tensor, estimate: Tensor, eps: float = 1e-8) -> Tensor:
    """Weighted SDR loss (Choi et al. 2019, the loss the paper names): the energy-weighted mean of the negative
    cosine similarity of the estimate to the clean speech and of the estimated noise to the true noise.

    With n = mixture - clean, n_hat = mixture - estimate and a = |clean|^2 / (|clean|^2 + |n|^2):
    loss = -(a cos(clean, estimate) + (1 - a) cos(n, n_hat)), in [-1, 1]; -1 is a perfect estimate.

    Args:
        mixture, clean, estimate (B, L): waveforms.

    Returns:
        The mean over the batch, a scalar (differentiable in ``estimate``).
    """
    noise, noise_hat = mixture - clean, mixture - estimate

    def cosine(a: Tensor, b: Tensor) -> Tensor:
        return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)

    energy_clean, energy_noise = clean.pow(2).sum(-1), noise.pow(2).sum(-1)
    weight = energy_clean / (energy_clean + energy_noise + eps)
    return -(weight * cosine(clean, estimate) + (1 - weight) * cosine(noise, noise_hat)).mean()


class SpeechEnvironments(Task):
    """Noisy speech in three environments, one U-Net ticket per environment; SI-SNRi.

    Inputs x are noisy STFTs (N, 2, T, F); targets y stack the clean and noisy waveforms (N, 2, L), which the loss
    and the metric need; tickets are the environments.

    Args:
        settings, seed: as every task.
        train_per_environment, test_per_environment: clips per environment.
        source: the clean speech's synthesiser, "auto" | "espeak" | "formant"
            (:func:`rtl.data.speech.load_speech_split`); default: $RTL_SPEECH_SOURCE, else "auto".
    """

    name = "speech-environments"
    description = (
        "speech enhancement: espeak-ng speech (or a formant synthesiser) in 3 synthetic noise environments (indoor, "
        "outdoor, transport), one ticket per environment, the paper's complex-mask U-Net; SI-SNRi"
    )
    kind = "enhancement"

    def __init__(
        self,
        settings: Settings,
        seed: int = 0,
        train_per_environment: int = 96,
        test_per_environment: int = 32,
        source: Optional[str] = None,
    ) -> None:
        from ..data.speech import load_speech_split, stft

        # "auto" uses espeak-ng when installed; RTL_SPEECH_SOURCE=formant pins the numpy synthesiser (tests, and
        # runs to compare across machines with and without espeak-ng)
        source = source or os.environ.get("RTL_SPEECH_SOURCE", "auto")
        split = load_speech_split(train_per_environment, test_per_environment, seed=seed, source=source)
        self.settings = settings
        self.source = split.source
        self.length = split.clean_train.shape[1]
        self.x_train, self.x_test = stft(split.noisy_train), stft(split.noisy_test)
        self.y_train = torch.stack((split.clean_train, split.noisy_train), dim=1)
        self.y_test = torch.stack((split.clean_test, split.noisy_test), dim=1)
        self.t_train, self.t_test = split.env_train, split.env_test
        self.num_tickets = len(split.environments)
        self.ticket_names = list(split.environments)
        self.description = f"{type(self).description} (clean speech: {split.source})"

    def build_model(self, seed: int) -> nn.Module:
        from ..models import SpeechUNet

        torch.manual_seed(seed)
        return SpeechUNet()

    def prunable_filter(self, name, module):
        from ..models import SpeechUNet

        return SpeechUNet.prunable_filter(None, name, module)

    def _waveform(self, spec: Tensor) -> Tensor:
        from ..data.speech import istft

        return istft(spec, self.length)

    def loss_all(self, out: Tensor, y: Tensor) -> Tensor:
        return wsdr_loss(y[:, 1], y[:, 0], self._waveform(out))

    def loss_ticket(self, out: Tensor, target: Tensor, ticket: int) -> Tensor:
        return self.loss_all(out, target)

    def _scores(self, enhanced: Tensor) -> Dict:
        clean, noisy = self.y_test[:, 0].cpu(), self.y_test[:, 1].cpu()
        gain = rtl_metrics.si_snr_improvement(self._waveform(enhanced.cpu()), noisy, clean)
        t = self.t_test.cpu()
        return {
            "si_snri": float(gain.mean()),
            "si_snri_per_ticket": [float(gain[t == k].mean()) for k in range(self.num_tickets)],
            "si_snr_input": float(rtl_metrics.si_snr(noisy, clean).mean()),
        }

    def evaluate_single(self, fn):
        return {"speech": self._scores(predict(fn, self.x_test, self.settings.eval_batch))}

    def evaluate_routed(self, routed_fn):
        enhanced = predict_routed(routed_fn, self.x_test, self.t_test, self.settings.eval_batch)
        return {"speech": self._scores(enhanced)}
