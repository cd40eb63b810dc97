"""Noisy speech in three acoustic environments, made offline: the stand-in for the paper's speech experiment.

The paper (arXiv 2601.22141, §3.1 and App. D) mixes DNS Challenge 2020 clean speech with TAU Urban Acoustic
Scenes 2020 noise from three scenes (indoor, outdoor, transportation), one ticket per scene. Neither corpus can be
downloaded here, so :func:`load_speech_split` makes both:

- **Clean speech** from Debian's ``espeak-ng`` (a formant speech synthesiser; ``apt-get install espeak-ng``) reading
  a fixed list of sentences in several voices, speeds and pitches; when the program is absent, from a pure-numpy
  formant synthesiser (:func:`formant_utterance`: a glottal pulse train through vowel formant resonators with
  fricative noise bursts, speech-like but not words). The split records which source made it.
- **Noise** of three environments, each a sum of sources with its own spectral and temporal signature
  (:func:`environment_noise`): *indoor* is reverberant babble of other talkers over mains hum; *outdoor* is gusting
  wind with bird chirps; *transport* is an engine's harmonic drone with road rumble and periodic rail clacks.
- **Mixtures** at an SNR drawn uniformly from ``SNR_RANGE_DB`` (the paper does not give its SNRs).

Clips are one second at 8 kHz (the paper: 10 s at 16 kHz) to fit a CPU budget; the STFT front end
(:func:`stft`, 256-point Hann window, hop 128) gives (2, 63, 129) real/imaginary spectrograms, F = 129 = 32 * 4 + 1
halving exactly through the U-Net's four strided levels, as the paper's 513 bins do. Train and test use different
sentences and independent noise draws. Everything is deterministic given the seed (and the synthesiser).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "ENVIRONMENTS",
    "HOP",
    "N_FFT",
    "SAMPLE_RATE",
    "SNR_RANGE_DB",
    "SpeechSplit",
    "environment_noise",
    "espeak_available",
    "formant_utterance",
    "istft",
    "load_speech_split",
    "mix_at_snr",
    "speak",
    "stft",
]

SAMPLE_RATE = 8000
CLIP_SECONDS = 1.0
N_FFT, HOP = 256, 128
ENVIRONMENTS = ("indoor", "outdoor", "transport")
SNR_RANGE_DB = (-5.0, 5.0)
# peak level of every mixture (clean and noise scaled together, so the SNR is kept)
_PEAK = 0.9

# Short sentences for espeak-ng; the last quarter is held out for the test set.
SENTENCES = (
    "The birch canoe slid on the smooth planks.",
    "Glue the sheet to the dark blue background.",
    "It is easy to tell the depth of a well.",
    "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.",
    "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.",
    "Four hours of steady work faced us.",
    "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.",
    "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.",
    "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.",
    "A pot of tea helps to pass the evening.",
    "Smoky fires lack flame and heat.",
    "The soft cushion broke the man's fall.",
    "The salt breeze came across from the sea.",
    "The girl at the booth sold fifty bonds.",
    "The small pup gnawed a hole in the sock.",
    "The fish twisted and turned on the bent hook.",
    "Press the pants and sew a button on the vest.",
    "The swan dive was far short of perfect.",
    "The beauty of the view stunned the young boy.",
    "Two blue fish swam in the tank.",
    "Her purse was full of useless trash.",
    "The colt reared and threw the tall rider.",
    "It snowed, rained, and hailed the same morning.",
    "Read verse out loud for pleasure.",
    "Hoist the load to your left shoulder.",
    "Take the winding path to reach the lake.",
    "Note closely the size of the gas tank.",
    "Wipe the grease off his dirty face.",
    "Mend the coat before you go out.",
    "The wrist was badly strained and hung limp.",
    "The stray cat gave birth to kittens.",
    "The young girl gave no clear response.",
    "The meal was cooked before the bell rang.",
    "What joy there is in living.",
    "A king ruled the state in the early days.",
)
_VOICES = ("en+m1", "en+m3", "en+m5", "en+m7", "en+f1", "en+f2", "en+f3", "en+f4", "en-us+m2", "en-us+f5")


@dataclass
class SpeechSplit:
    """Clean and noisy clips of the train and test sets.

    Attributes:
        clean_train, noisy_train: (N, L) float32 waveforms at ``sample_rate``; env_train (N,) int64 index into
            ``environments``; snr_train (N,) float64 mixing SNR in dB. The same for ``*_test``.
        environments: the environment names, in ticket order.
        source: "espeak-ng" or "formant synthesiser" (what made the clean speech).
        sample_rate: samples per second.
    """

    clean_train: Tensor
    noisy_train: Tensor
    env_train: Tensor
    snr_train: Tensor
    clean_test: Tensor
    noisy_test: Tensor
    env_test: Tensor
    snr_test: Tensor
    environments: Tuple[str, ...]
    source: str
    sample_rate: int


# -- clean speech ----------------------------------------------------------------------------------------------------


def espeak_available() -> bool:
    """Whether Debian's ``espeak-ng`` is on PATH."""
    return shutil.which("espeak-ng") is not None


def speak(
    text: str, voice: str = "en", speed: int = 160, pitch: int = 50, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """``text`` spoken by espeak-ng, resampled to ``sample_rate``. Returns (L,) float32 in [-1, 1].

    Raises:
        RuntimeError: espeak-ng is not installed, or it failed.
    """
    from scipy.signal import resample_poly

    if not espeak_available():
        raise RuntimeError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "speech.wav")
        cmd = ["espeak-ng", "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, text]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not os.path.isfile(path):
            raise RuntimeError(f"espeak-ng failed on {text!r} with voice {voice}: {done.stderr.strip()}")
        with wave.open(path) as fh:
            rate, width, channels = fh.getframerate(), fh.getsampwidth(), fh.getnchannels()
            raw = fh.readframes(fh.getnframes())
    if width != 2:
        raise RuntimeError(f"espeak-ng wrote {8 * width}-bit samples; 16-bit expected")
    audio = np.frombuffer(raw, dtype="<i2").astype(np.float64).reshape(-1, channels).mean(1) / 32768.0
    g = np.gcd(sample_rate, rate)
    return resample_poly(audio, sample_rate // g, rate // g).astype(np.float32)


# (F1, F2, F3) in Hz of a few vowels (adult averages), for the formant synthesiser
_VOWEL_FORMANTS = (
    (730, 1090, 2440),
    (530, 1840, 2480),
    (270, 2290, 3010),
    (570, 840, 2410),
    (300, 870, 2240),
    (660, 1720, 2410),
    (490, 1350, 1690),
)


def _resonator(x: np.ndarray, freq: float, bandwidth: float, sample_rate: int) -> np.ndarray:
    """x through a two-pole resonator at ``freq`` Hz (unit gain at the peak, roughly)."""
    from scipy.signal import lfilter

    r = np.exp(-np.pi * bandwidth / sample_rate)
    a = [1.0, -2.0 * r * np.cos(2.0 * np.pi * freq / sample_rate), r * r]
    return lfilter([1.0 - r], a, x)


def formant_utterance(rng: np.random.Generator, seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """A speech-like utterance without words: syllables of a voiced vowel, often after a fricative burst.

    One talker per call: a base pitch of 90-240 Hz falling over the utterance; each vowel a glottal pulse train
    through three formant resonators; fricatives are noise through a high resonator; short gaps between syllables
    and longer ones between words. Returns (round(seconds * sample_rate),) float32, peak 1.
    """
    n = int(round(seconds * sample_rate))
    out = np.zeros(n)
    f0_base = rng.uniform(90.0, 240.0)
    pos = int(rng.integers(0, sample_rate // 10))
    while pos < n:
        if rng.random() < 0.6:  # a fricative onset
            length = int(rng.uniform(0.03, 0.09) * sample_rate)
            burst = _resonator(rng.standard_normal(length), rng.uniform(2200, 3600), 900.0, sample_rate)
            burst *= np.hanning(length) * rng.uniform(0.2, 0.5)
            end = min(n, pos + length)
            out[pos:end] += burst[: end - pos]
            pos = end
        length = int(rng.uniform(0.08, 0.22) * sample_rate)
        t = np.arange(length) / sample_rate
        f0 = f0_base * (1.0 - 0.15 * pos / n) * (1.0 + 0.03 * np.sin(2 * np.pi * rng.uniform(3, 6) * t))
        phase = np.cumsum(f0 / sample_rate)
        pulses = np.diff(np.floor(phase), prepend=0.0)  # one impulse per glottal period
        voiced = sum(
            _resonator(pulses, f, 60.0 + 0.05 * f, sample_rate) * g
            for f, g in zip(_VOWEL_FORMANTS[rng.integers(len(_VOWEL_FORMANTS))], (1.0, 0.6, 0.3))
        )
        voiced *= np.hanning(length) * rng.uniform(0.6, 1.0)
        end = min(n, pos + length)
        out[pos:end] += voiced[: end - pos]
        pos = end + int(rng.uniform(0.01, 0.06) * sample_rate)
        if rng.random() < 0.25:  # a word boundary
            pos += int(rng.uniform(0.08, 0.2) * sample_rate)
    return (out / max(np.abs(out).max(), 1e-9)).astype(np.float32)


# -- noise environments ----------------------------------------------------------------------------------------------


def _coloured_noise(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Noise with power spectrum ~ 1 / f^exponent (1: pink, 2: brown), unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(spectrum.size, dtype=np.float64)
    f[0] = 1.0
    x = np.fft.irfft(spectrum / f ** (exponent / 2.0), n)
    return x / max(x.std(), 1e-12)


def _slow_envelope(rng: np.random.Generator, n: int, sample_rate: int, rate_hz: float) -> np.ndarray:
    """A smooth positive random envelope changing about ``rate_hz`` times a second, mean ~1."""
    knots = max(2, int(n / sample_rate * rate_hz) + 2)
    values = rng.uniform(0.2, 1.8, knots)
    return np.interp(np.linspace(0, knots - 1, n), np.arange(knots), values)


def _indoor(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    from scipy.signal import fftconvolve

    babble = sum(formant_utterance(rng, n / sample_rate, sample_rate) for _ in range(int(rng.integers(3, 6))))
    decay = rng.uniform(0.2, 0.5)  # reverberation time (s) of the room
    ir_len = int(decay * sample_rate)
    ir = rng.standard_normal(ir_len) * np.exp(-6.9 * np.arange(ir_len) / ir_len)
    ir[0] = 1.0
    babble = fftconvolve(babble, ir)[:n]
    t = np.arange(n) / sample_rate
    mains = rng.choice([50.0, 60.0])
    hum = sum(np.sin(2 * np.pi * mains * k * t + rng.uniform(0, 2 * np.pi)) / k for k in range(1, 6))
    return babble / max(babble.std(), 1e-12) + 0.3 * hum + 0.05 * _coloured_noise(rng, n, 1.0)


def _outdoor(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    wind = _resonator(_coloured_noise(rng, n, 2.0), rng.uniform(80, 250), 300.0, sample_rate)
    wind = wind / max(wind.std(), 1e-12) * _slow_envelope(rng, n, sample_rate, rng.uniform(0.5, 2.0))
    birds = np.zeros(n)
    for _ in range(int(rng.integers(3, 9))):
        length = int(rng.uniform(0.05, 0.2) * sample_rate)
        start = int(rng.integers(0, max(1, n - length)))
        f = np.linspace(rng.uniform(1800, 3600), rng.uniform(1800, 3600), length)
        birds[start : start + length] += np.sin(2 * np.pi * np.cumsum(f) / sample_rate) * np.hanning(length)
    return wind + rng.uniform(0.5, 1.5) * birds + 0.1 * _coloured_noise(rng, n, 0.0)


def _transport(rng: np.random.Generator, n: int, sample_rate: int) -> np.ndarray:
    t = np.arange(n) / sample_rate
    f_engine = rng.uniform(25.0, 70.0) * (1.0 + 0.08 * np.sin(2 * np.pi * rng.uniform(0.1, 0.5) * t))
    phase = 2 * np.pi * np.cumsum(f_engine) / sample_rate
    harmonics = int(sample_rate / 2 / 80.0)
    engine = sum(np.sin(k * phase + rng.uniform(0, 2 * np.pi)) / k**0.7 for k in range(1, harmonics + 1))
    rumble = _resonator(_coloured_noise(rng, n, 1.0), rng.uniform(300, 700), 600.0, sample_rate)
    clacks = np.zeros(n)
    period = int(rng.uniform(0.3, 0.7) * sample_rate)
    for start in range(int(rng.integers(0, period)), n, period):
        length = min(int(0.03 * sample_rate), n - start)
        clacks[start : start + length] += rng.standard_normal(length) * np.exp(
            -np.arange(length) / (0.005 * sample_rate)
        )
    clacks = _resonator(clacks, rng.uniform(1200, 2500), 500.0, sample_rate)
    parts = (engine, rumble, clacks)
    weights = (1.0, rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.5))
    return sum(w * p / max(p.std(), 1e-12) for w, p in zip(weights, parts))


_NOISE_MAKERS = {"indoor": _indoor, "outdoor": _outdoor, "transport": _transport}


def environment_noise(
    environment: str, rng: np.random.Generator, seconds: float = CLIP_SECONDS, sample_rate: int = SAMPLE_RATE
) -> np.ndarray:
    """A noise clip of ``environment`` (one of :data:`ENVIRONMENTS`). Returns (round(seconds * sample_rate),)
    float32 with unit RMS.

    Raises:
        ValueError: unknown environment.
    """
    if environment not in _NOISE_MAKERS:
        raise ValueError(f"unknown environment {environment!r}; known: {', '.join(ENVIRONMENTS)}")
    x = _NOISE_MAKERS[environment](rng, int(round(seconds * sample_rate)), sample_rate)
    return (x / max(x.std(), 1e-12)).astype(np.float32)


def mix_at_snr(
    clean: np.ndarray, noise: np.ndarray, snr_db: float, peak: float = _PEAK
) -> Tuple[np.ndarray, np.ndarray]:
    """Scale ``noise`` so that 10 log10(|clean|^2 / |noise|^2) = snr_db, add it, and scale clean and mixture
    together so that the mixture's peak is ``peak``. Returns (clean, mixture), both (L,) float32.

    Raises:
        ValueError: shapes differ, or the clean or noise clip is silent.
    """
    clean, noise = np.asarray(clean, np.float64), np.asarray(noise, np.float64)
    if clean.shape != noise.shape:
        raise ValueError(f"clean and noise must have the same shape, got {clean.shape} and {noise.shape}")
    p_clean, p_noise = float(np.sum(clean**2)), float(np.sum(noise**2))
    if p_clean <= 0 or p_noise <= 0:
        raise ValueError("clean and noise must not be silent")
    noise = noise * np.sqrt(p_clean / (p_noise * 10.0 ** (snr_db / 10.0)))
    mixture = clean + noise
    scale = peak / max(np.abs(mixture).max(), 1e-12)
    return (clean * scale).astype(np.float32), (mixture * scale).astype(np.float32)


# -- STFT front end ---------------------------------------------------------------------------------------------------


def stft(wave: Tensor, n_fft: int = N_FFT, hop: int = HOP) -> Tensor:
    """Two-channel STFT, the U-Net's input. wave (B, L) -> (B, 2, T, F): real and imaginary parts, T = 1 + L // hop
    frames, F = n_fft // 2 + 1 bins (Hann window, centred frames)."""
    window = torch.hann_window(n_fft, dtype=wave.dtype, device=wave.device)
    spec = torch.stft(wave, n_fft, hop_length=hop, window=window, center=True, return_complex=True)  # (B, F, T)
    return torch.stack((spec.real, spec.imag), dim=1).transpose(2, 3).contiguous()


def istft(spec: Tensor, length: int, n_fft: int = N_FFT, hop: int = HOP) -> Tensor:
    """The inverse of :func:`stft`. spec (B, 2, T, F) -> (B, length) waveforms (differentiable)."""
    if spec.dim() != 4 or spec.shape[1] != 2:
        raise ValueError(f"spec must be (B, 2, T, F), got shape {tuple(spec.shape)}")
    window = torch.hann_window(n_fft, dtype=spec.dtype, device=spec.device)
    complex_spec = torch.complex(spec[:, 0], spec[:, 1]).transpose(1, 2)  # (B, F, T)
    return torch.istft(complex_spec, n_fft, hop_length=hop, window=window, center=True, length=length)


# -- the split -------------------------------------------------------------------------------------------------------


def _clean_clip(
    rng: np.random.Generator, sentences: Sequence[str], use_espeak: bool, seconds: float, sample_rate: int
) -> np.ndarray:
    n = int(round(seconds * sample_rate))
    if not use_espeak:
        return formant_utterance(rng, seconds, sample_rate)
    text = sentences[int(rng.integers(len(sentences)))]
    voice = _VOICES[int(rng.integers(len(_VOICES)))]
    audio = speak(
        text, voice, speed=int(rng.integers(130, 200)), pitch=int(rng.integers(25, 80)), sample_rate=sample_rate
    )
    # a window of the utterance that starts inside it (espeak pads silence at both ends)
    loud = np.flatnonzero(np.abs(audio) > 0.02 * np.abs(audio).max())
    first, last = (int(loud[0]), int(loud[-1])) if loud.size else (0, audio.size)
    start = int(rng.integers(first, max(first + 1, last - n // 2)))
    clip = np.zeros(n, np.float32)
    piece = audio[start : start + n]
    clip[: piece.size] = piece
    return clip / max(np.abs(clip).max(), 1e-9)


def _cache_path(key: str) -> Optional[str]:
    root = os.environ.get("RTL_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "rtl"))
    return os.path.join(root, "speech", hashlib.sha256(key.encode()).hexdigest()[:16] + ".pt")


def load_speech_split(
    train_per_environment: int = 96,
    test_per_environment: int = 32,
    seed: int = 0,
    source: str = "auto",
    seconds: float = CLIP_SECONDS,
    sample_rate: int = SAMPLE_RATE,
    cache: bool = True,
) -> SpeechSplit:
    """Noisy-speech clips of every environment, deterministic given the arguments.

    Args:
        train_per_environment, test_per_environment: clips per environment in each set.
        seed: draws the sentences, voices, noises and SNRs.
        source: "espeak" (espeak-ng, an error when absent), "formant" (the numpy synthesiser) or "auto" (espeak-ng
            when installed).
        seconds, sample_rate: clip length and rate.
        cache: keep the espeak-ng split on disk (``$RTL_CACHE``, default ~/.cache/rtl) so that a resumed or repeated
            run does not synthesise it again.

    Returns:
        A :class:`SpeechSplit`; every set is ordered environment by environment.

    Raises:
        ValueError: bad counts or source; RuntimeError: source "espeak" without espeak-ng.
    """
    if train_per_environment < 1 or test_per_environment < 1:
        raise ValueError("train_per_environment and test_per_environment must be >= 1")
    if source not in ("auto", "espeak", "formant"):
        raise ValueError(f"source must be 'auto', 'espeak' or 'formant', got {source!r}")
    use_espeak = source == "espeak" or (source == "auto" and espeak_available())
    if source == "espeak" and not espeak_available():
        raise RuntimeError("source 'espeak' needs espeak-ng (Debian: apt-get install espeak-ng)")
    name = "espeak-ng" if use_espeak else "formant synthesiser"
    key = f"{name}|{train_per_environment}|{test_per_environment}|{seed}|{seconds}|{sample_rate}|{len(SENTENCES)}"
    path = _cache_path(key) if cache and use_espeak else None
    if path is not None and os.path.isfile(path):
        return SpeechSplit(
            **torch.load(path, weights_only=True), environments=ENVIRONMENTS, source=name, sample_rate=sample_rate
        )
    held_out = len(SENTENCES) * 3 // 4
    parts = {}
    for split, count, sentences in (
        ("train", train_per_environment, SENTENCES[:held_out]),
        ("test", test_per_environment, SENTENCES[held_out:]),
    ):
        # independent streams per set and environment, so changing one count leaves the other set's clips alone
        clean, noisy, env, snr = [], [], [], []
        for e, environment in enumerate(ENVIRONMENTS):
            rng = np.random.default_rng([seed, 0 if split == "train" else 1, e])
            for _ in range(count):
                speech = _clean_clip(rng, sentences, use_espeak, seconds, sample_rate)
                level = float(rng.uniform(*SNR_RANGE_DB))
                c, m = mix_at_snr(speech, environment_noise(environment, rng, seconds, sample_rate), level)
                clean.append(c), noisy.append(m), env.append(e), snr.append(level)
        parts[f"clean_{split}"] = torch.from_numpy(np.stack(clean))
        parts[f"noisy_{split}"] = torch.from_numpy(np.stack(noisy))
        parts[f"env_{split}"] = torch.tensor(env, dtype=torch.int64)
        parts[f"snr_{split}"] = torch.tensor(snr, dtype=torch.float64)
    if path is not None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        torch.save(parts, tmp)
        os.replace(tmp, path)
    return SpeechSplit(**parts, environments=ENVIRONMENTS, source=name, sample_rate=sample_rate)
