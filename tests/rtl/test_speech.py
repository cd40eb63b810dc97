"""The speech experiment: its data pipeline, its metric and loss against known values, its task and a tiny run.

Everything but the espeak-ng tests runs on the numpy formant synthesiser, so the suite needs no Debian package.
"""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from rtl.data import speech
from rtl.experiments import build_task
from rtl.experiments.speech import wsdr_loss
from rtl.metrics import si_snr, si_snr_improvement

needs_espeak = pytest.mark.skipif(not speech.espeak_available(), reason="espeak-ng is not installed")


# -- SI-SNR and SI-SNRi --------------------------------------------------------------------------------------------


def _orthogonal_pair(length, gen):
    """A zero-mean reference r and a zero-mean n orthogonal to it (float64)."""
    r = torch.randn(length, generator=gen, dtype=torch.float64)
    n = torch.randn(length, generator=gen, dtype=torch.float64)
    r, n = r - r.mean(), n - n.mean()
    n = n - (n @ r) / (r @ r) * r
    return r, n


@pytest.mark.parametrize("snr_db", [-10.0, 0.0, 7.5, 30.0])
def test_si_snr_of_reference_plus_orthogonal_noise_is_the_energy_ratio(snr_db):
    gen = torch.Generator().manual_seed(int(snr_db * 10) + 100)
    r, n = _orthogonal_pair(4000, gen)
    n = n * torch.sqrt((r @ r) / (n @ n) / 10 ** (snr_db / 10))
    assert float(si_snr(r + n, r)) == pytest.approx(snr_db, abs=1e-9)


def test_si_snr_ignores_scale_and_offset_and_works_per_row():
    gen = torch.Generator().manual_seed(1)
    est, ref = torch.randn(5, 800, generator=gen), torch.randn(5, 800, generator=gen)
    est = est + 2 * ref
    base = si_snr(est, ref)
    assert base.shape == (5,) and base.dtype == torch.float64
    torch.testing.assert_close(si_snr(3.7 * est + 0.4, ref), base)
    torch.testing.assert_close(si_snr(est, 0.2 * ref), base)
    for b in range(5):
        torch.testing.assert_close(si_snr(est[b], ref[b]), base[b])


def test_si_snr_improvement_is_zero_for_the_mixture_and_the_gain_otherwise():
    gen = torch.Generator().manual_seed(2)
    r, n = _orthogonal_pair(2000, gen)
    mixture = r + n  # 10 log10(|r|^2 / |n|^2)
    half = r + 0.5 * n  # the noise energy quartered: +6.02 dB
    assert float(si_snr_improvement(mixture, mixture, r)) == pytest.approx(0.0, abs=1e-12)
    assert float(si_snr_improvement(half, mixture, r)) == pytest.approx(10 * np.log10(4), abs=1e-9)


def test_si_snr_rejects_bad_input():
    with pytest.raises(ValueError, match="same shape"):
        si_snr(torch.randn(2, 10), torch.randn(2, 11))
    with pytest.raises(ValueError, match="same shape"):
        si_snr(torch.randn(2, 3, 10), torch.randn(2, 3, 10))
    with pytest.raises(TypeError):
        si_snr(np.zeros(10), torch.zeros(10))


# -- the wSDR loss ---------------------------------------------------------------------------------------------------


def test_wsdr_loss_is_minus_one_for_a_perfect_estimate_and_matches_its_formula():
    gen = torch.Generator().manual_seed(3)
    clean = torch.randn(4, 500, generator=gen, dtype=torch.float64)
    noise = torch.randn(4, 500, generator=gen, dtype=torch.float64)
    mixture = clean + noise
    assert float(wsdr_loss(mixture, clean, clean.clone())) == pytest.approx(-1.0, abs=1e-9)
    est = clean + 0.3 * torch.randn(4, 500, generator=gen, dtype=torch.float64)
    expected = []
    for b in range(4):  # the formula written out per clip, in numpy
        c, m, e = clean[b].numpy(), mixture[b].numpy(), est[b].numpy()
        n, n_hat = m - c, m - e
        cos = lambda a, z: a @ z / (np.linalg.norm(a) * np.linalg.norm(z))  # noqa: E731
        alpha = c @ c / (c @ c + n @ n)
        expected.append(-(alpha * cos(c, e) + (1 - alpha) * cos(n, n_hat)))
    assert float(wsdr_loss(mixture, clean, est)) == pytest.approx(float(np.mean(expected)), abs=1e-9)
    est.requires_grad_(True)
    wsdr_loss(mixture, clean, est).backward()
    assert est.grad is not None and torch.isfinite(est.grad).all() and est.grad.abs().sum() > 0


# -- data ----------------------------------------------------------------------------------------------------------


def test_mix_at_snr_hits_the_requested_snr_and_peak():
    rng = np.random.default_rng(0)
    clean, noise = rng.standard_normal(8000), rng.standard_normal(8000) * 3
    for snr in (-5.0, 0.0, 5.0):
        c, m = speech.mix_at_snr(clean, noise, snr)
        n = m.astype(np.float64) - c.astype(np.float64)
        assert 10 * np.log10((c.astype(np.float64) ** 2).sum() / (n**2).sum()) == pytest.approx(snr, abs=1e-3)
        assert np.abs(m).max() == pytest.approx(0.9, rel=1e-6)
    with pytest.raises(ValueError, match="silent"):
        speech.mix_at_snr(np.zeros(10), np.ones(10), 0.0)
    with pytest.raises(ValueError, match="same shape"):
        speech.mix_at_snr(np.ones(10), np.ones(11), 0.0)


def test_stft_round_trip_and_shapes():
    wave = torch.randn(3, 8000, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    spec = speech.stft(wave)
    assert spec.shape == (3, 2, 8000 // speech.HOP + 1, speech.N_FFT // 2 + 1)
    torch.testing.assert_close(speech.istft(spec, 8000), wave)
    # the real/imaginary channels are torch's complex STFT, frames on axis 2
    ref = torch.stft(
        wave, speech.N_FFT, speech.HOP, window=torch.hann_window(speech.N_FFT, dtype=wave.dtype), return_complex=True
    )
    torch.testing.assert_close(spec[:, 0], ref.real.transpose(1, 2))
    torch.testing.assert_close(spec[:, 1], ref.imag.transpose(1, 2))
    with pytest.raises(ValueError, match=r"\(B, 2, T, F\)"):
        speech.istft(torch.randn(2, 3, 4, 5), 100)


def test_noise_environments_are_deterministic_unit_rms_and_tell_apart():
    a = speech.environment_noise("outdoor", np.random.default_rng(5))
    b = speech.environment_noise("outdoor", np.random.default_rng(5))
    np.testing.assert_array_equal(a, b)
    assert a.shape == (speech.SAMPLE_RATE,) and a.std() == pytest.approx(1.0, rel=1e-3)
    with pytest.raises(ValueError, match="unknown environment"):
        speech.environment_noise("underwater", np.random.default_rng(0))

    # the environments are distinct acoustic scenes: a nearest-centroid rule on log band energies, fitted on some
    # draws, names the environment of fresh draws
    def features(x):
        power = np.abs(np.fft.rfft(x)) ** 2
        return np.log(np.array([band.sum() for band in np.array_split(power, 16)]) + 1e-9)

    rng = np.random.default_rng(6)
    fit = {e: np.mean([features(speech.environment_noise(e, rng)) for _ in range(8)], 0) for e in speech.ENVIRONMENTS}
    right = 0
    for e in speech.ENVIRONMENTS:
        for _ in range(8):
            f = features(speech.environment_noise(e, rng))
            right += min(fit, key=lambda k: np.sum((fit[k] - f) ** 2)) == e
    assert right >= 22  # of 24


def test_formant_split_is_deterministic_ordered_and_in_range():
    split = speech.load_speech_split(4, 2, seed=7, source="formant")
    again = speech.load_speech_split(4, 2, seed=7, source="formant")
    other = speech.load_speech_split(4, 2, seed=8, source="formant")
    assert split.source == "formant synthesiser"
    assert split.clean_train.shape == split.noisy_train.shape == (12, speech.SAMPLE_RATE)
    assert split.clean_test.shape == (6, speech.SAMPLE_RATE)
    assert split.env_train.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert ((split.snr_train >= speech.SNR_RANGE_DB[0]) & (split.snr_train <= speech.SNR_RANGE_DB[1])).all()
    torch.testing.assert_close(split.noisy_train, again.noisy_train, rtol=0, atol=0)
    assert not torch.equal(split.noisy_train, other.noisy_train)
    # the recorded SNR is the SNR of the mixture
    noise = split.noisy_train.double() - split.clean_train.double()
    measured = 10 * torch.log10(split.clean_train.double().pow(2).sum(1) / noise.pow(2).sum(1))
    torch.testing.assert_close(measured, split.snr_train, atol=1e-3, rtol=0)
    # more test clips leave the training clips as they were (independent streams)
    torch.testing.assert_close(speech.load_speech_split(4, 3, seed=7, source="formant").noisy_train, split.noisy_train)
    with pytest.raises(ValueError, match="source"):
        speech.load_speech_split(2, 2, source="tts")
    with pytest.raises(ValueError, match=">= 1"):
        speech.load_speech_split(0, 2)


def test_espeak_source_without_espeak_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(speech.shutil, "which", lambda name: None)
    assert not speech.espeak_available()
    with pytest.raises(RuntimeError, match="apt-get install espeak-ng"):
        speech.load_speech_split(2, 2, source="espeak")
    assert speech.load_speech_split(2, 2, source="auto").source == "formant synthesiser"


@needs_espeak
def test_espeak_speech_is_voiced_and_cached(tmp_path, monkeypatch):
    audio = speech.speak("The birch canoe slid on the smooth planks.", "en+f2")
    assert audio.dtype == np.float32 and audio.size > speech.SAMPLE_RATE and np.abs(audio).max() > 0.1
    monkeypatch.setenv("RTL_CACHE", str(tmp_path))
    split = speech.load_speech_split(2, 1, seed=0, source="espeak")
    assert split.source == "espeak-ng" and len(list(tmp_path.rglob("*.pt"))) == 1
    # every clean clip is mostly speech, not the silence espeak-ng pads around it: most 25 ms frames carry energy
    frames = split.clean_train.reshape(split.clean_train.shape[0], -1, 200).pow(2).sum(2)
    voiced = (frames > 1e-3 * frames.amax(1, keepdim=True)).double().mean(1)
    assert (voiced > 0.5).all(), voiced
    cached = speech.load_speech_split(2, 1, seed=0, source="espeak")
    torch.testing.assert_close(cached.noisy_test, split.noisy_test, rtol=0, atol=0)


@pytest.mark.skipif(shutil.which("espeak-ng") is not None, reason="checks the path without espeak-ng")
def test_speak_without_espeak_is_a_clear_error():
    with pytest.raises(RuntimeError, match="not installed"):
        speech.speak("hello")


# -- the task and a run --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_task():
    return build_task(
        "speech-environments", "quick", 0, train_per_environment=4, test_per_environment=2, source="formant"
    )


def test_task_shapes_and_identity_scores_zero(small_task):
    task = small_task
    assert task.kind == "enhancement" and task.ticket_names == list(speech.ENVIRONMENTS)
    assert task.x_train.shape == (12, 2, speech.SAMPLE_RATE // speech.HOP + 1, speech.N_FFT // 2 + 1)
    assert task.y_train.shape == (12, 2, speech.SAMPLE_RATE)
    # a model that returns its input leaves every clip as it was: SI-SNRi 0
    scores = task.evaluate_single(lambda x: x)["speech"]
    assert scores["si_snri"] == pytest.approx(0.0, abs=1e-3)
    assert all(v == pytest.approx(0.0, abs=1e-3) for v in scores["si_snri_per_ticket"])
    routed = task.evaluate_routed(lambda x, route: x)["speech"]
    assert routed["si_snri"] == pytest.approx(0.0, abs=1e-3)


def test_task_oracle_estimate_scores_the_input_snr_gain(small_task):
    # the clean speech's own STFT as the "enhanced" output: SI-SNR of the clean (near +inf, capped by the STFT round
    # trip) minus the input's: a large positive gain on every environment
    task = small_task
    clean_spec = speech.stft(task.y_test[:, 0])
    scores = task.evaluate_routed(lambda x, route: clean_spec[: x.shape[0]])["speech"]
    assert min(scores["si_snri_per_ticket"]) > 40


def test_task_loss_trains_the_unet_on_one_batch(small_task):
    task = small_task
    torch.manual_seed(0)
    model = task.build_model(0)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    x, y = task.x_train[:6], task.y_train[:6]
    losses = []
    for _ in range(15):
        loss = task.loss_all(task.forward(model, x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert -1.0 <= min(losses) and losses[-1] < losses[0]


def test_tiny_rtl_run_writes_the_speech_report(tmp_path, tiny_budget, monkeypatch):
    monkeypatch.setenv("RTL_SPEECH_SOURCE", "formant")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "rtl", "run", "speech-environments", "--quick", "--sparsities", "0.5"]
    cmd += tiny_budget + ["--threads", "1", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    entry = metrics["sparsities"]["0.5"]
    for method in ("rtl", "single", "multi"):
        values = entry[method]["metrics"]["speech"]
        assert np.isfinite(values["si_snri"]) and len(values["si_snri_per_ticket"]) == 3
    assert entry["rtl"]["budget"] == entry["single"]["budget"] == entry["multi"]["budget"]
    report = (out / "report.md").read_text()
    assert "SI-SNRi (dB)" in report and "RTL (environment routing)" in report and "formant synthesiser" in report
