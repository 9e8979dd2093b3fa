"""Audio front end: log-mel parity with transformers' Qwen3ASRFeatureExtractor, batching, and load_audio."""

import functools
import math
import os
import subprocess
import sys

import jax
import librosa
import numpy as np
import pytest
import soundfile as sf
import torch
from transformers.audio_utils import mel_filter_bank
from transformers.models.qwen3_asr import Qwen3ASRFeatureExtractor

from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.io import audio
from qasr_jax.testing import DATA, ROOT

TOL = 1e-4  # max |jax - reference| on log-mel features; a float32 STFT on both sides lands near 6e-5

# Lengths in samples: under 0.5 s (min padding), under 1 s, exactly 1 s and 3 s (whole chunks), a partial chunk
# on a hop boundary and off one, and over 8 s (two encoder windows).
LENGTHS = {"0.3s": 4800, "0.7s": 11200, "1.0s": 16000, "3.0s": 48000, "2.37s": 37920, "2.3723s": 37957,
           "9.5s": 152013}


@functools.lru_cache(maxsize=None)
def _reference_extractor():
    return Qwen3ASRFeatureExtractor()


def reference_log_mel(wave):
    """The reference run on this waveform alone: (128, frames padded to a multiple of 100)."""
    out = _reference_extractor()(wave, sampling_rate=16000, padding="longest", return_tensors="np")
    return out["input_features"][0]


def synthetic(n, seed=0):
    """Noise plus a rising chirp (100 Hz -> several kHz), so every mel bin carries energy."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 16000
    chirp = 0.5 * np.sin(2 * np.pi * (100 * t + 400 * t**2))
    return (0.05 * rng.standard_normal(n) + chirp).astype(np.float32)


@functools.lru_cache(maxsize=None)
def speech(name):
    wave, rate = sf.read(os.path.join(DATA, name), dtype="float32")
    assert rate == 16000 and wave.ndim == 1
    return wave


def long_speech(n):
    """The first n samples of the 10 s espeak-ng clip (speech starts within the first 0.3 s)."""
    wave = speech("long_en.wav")
    assert wave.shape[0] >= n
    return wave[:n]


def assert_matches_reference(wave):
    ref = reference_log_mel(wave)
    ours = audio.log_mel(wave)
    frames = audio.n_frames(wave.shape[0])
    assert ours.shape == (128, frames) and ours.dtype == np.float32
    # The reference pads the time axis to whole 1 s chunks with zeros; what we compare is everything before that.
    assert ref.shape == (128, math.ceil(frames / 100) * 100)
    assert np.all(ref[:, frames:] == 0.0)
    diff = np.abs(ours - ref[:, :frames]).max()
    assert diff <= TOL, f"max |diff| {diff:.3g} > {TOL}"
    return diff


def test_mel_filters_match_transformers():
    ref = mel_filter_bank(num_frequency_bins=201, num_mel_filters=128, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=16000, norm="slaney", mel_scale="slaney")
    ours = audio.mel_filters()
    assert ours.shape == (201, 128) and ours.dtype == np.float32
    # Equal to float32 rounding of the float64 reference (the reference runs them in float32 too).
    np.testing.assert_array_equal(ours, ref.astype(np.float32))


def test_n_frames_counts_stft_frames_of_min_padded_audio():
    window = torch.hann_window(400)
    for n in [0, 1, 4800, 7999, 8000, 8159, 8160, 16000, 37957, 152013]:
        padded = torch.zeros(max(n, 8000))
        # torch.stft with centre padding gives 1 + n // hop frames; the reference drops the last one.
        stft_frames = torch.stft(padded, 400, 160, window=window, return_complex=True).shape[-1]
        assert audio.n_frames(n) == stft_frames - 1, n


@pytest.mark.parametrize("length", list(LENGTHS.values()), ids=list(LENGTHS))
def test_log_mel_matches_reference_synthetic(length):
    assert_matches_reference(synthetic(length))


@pytest.mark.parametrize("length", list(LENGTHS.values()), ids=list(LENGTHS))
def test_log_mel_matches_reference_speech(length):
    # Cuts of real speech: the last frames see the reflection of the cut, and silences test the log floor.
    assert_matches_reference(long_speech(length))


@pytest.mark.parametrize("name", ["hello_en.wav", "long_en.wav", "zh.wav"])
def test_log_mel_matches_reference_whole_clips(name):
    assert_matches_reference(speech(name))


def test_log_mel_silence_and_quiet_audio_match_reference():
    assert_matches_reference(np.zeros(11200, np.float32))  # all frames at the floor
    assert_matches_reference(1e-4 * synthetic(37957, seed=1))  # tiny powers, near the 1e-10 clamp


def test_log_mel_batch_equals_each_item_alone():
    waves = [synthetic(37957), speech("hello_en.wav"), synthetic(4800, seed=2), long_speech(152013),
             np.zeros(16000, np.float32), synthetic(16000, seed=3)]
    feats, counts = audio.log_mel_batch(waves)
    expected_counts = [audio.n_frames(w.shape[0]) for w in waves]
    assert counts.dtype == np.int32 and counts.tolist() == expected_counts
    assert feats.shape == (len(waves), 128, 1000) and feats.dtype == np.float32  # 950 frames -> 10 chunks
    feats = np.asarray(feats)
    for i, wave in enumerate(waves):
        alone = audio.log_mel(wave)
        # Same math on a different batch shape: XLA may order float32 sums differently, a few ulps at most.
        np.testing.assert_allclose(feats[i, :, : counts[i]], alone, rtol=0, atol=1e-6, err_msg=f"item {i}")
        assert np.all(feats[i, :, counts[i] :] == 0.0), f"item {i}: padded frames must be exactly 0"
        # And each item still matches the reference run on it alone.
        assert np.abs(feats[i, :, : counts[i]] - reference_log_mel(wave)[:, : counts[i]]).max() <= TOL


def test_log_mel_batch_pads_to_buckets_and_reuses_compiled_function():
    waves = [synthetic(20000), synthetic(30000, seed=1)]
    feats, _ = audio.log_mel_batch(waves, pad_to=1234)
    assert feats.shape == (2, 128, 1300)
    feats, _ = audio.log_mel_batch(waves, pad_to=50)  # smaller than the longest item: ignored
    assert feats.shape == (2, 128, 200)
    # Other lengths in the same 1 s bucket must not compile again.
    with count_compilations() as compiles:
        feats2, counts2 = audio.log_mel_batch([synthetic(17000, seed=4), synthetic(31999, seed=5)])
    assert feats2.shape == (2, 128, 200) and counts2.tolist() == [106, 199]
    assert compiles.count == 0


def test_log_mel_padded_runs_inside_a_larger_jit():
    waves = [synthetic(12345), synthetic(30000, seed=1)]
    samples = np.zeros((2, 201 * 160), np.float32)
    for i, w in enumerate(waves):
        samples[i, : w.shape[0]] = w
    lengths = np.array([w.shape[0] for w in waves], np.int32)

    @jax.jit
    def mean_feature(samples, lengths):
        return audio.log_mel_padded(samples, lengths, frames=200).mean(axis=(1, 2))

    expected = np.asarray(audio.log_mel_batch(waves)[0]).mean(axis=(1, 2))
    np.testing.assert_allclose(np.asarray(mean_feature(samples, lengths)), expected, rtol=0, atol=1e-6)


def test_log_mel_rejects_non_mono_input():
    with pytest.raises(audio.AudioError, match="1-D"):
        audio.log_mel(np.zeros((2, 16000), np.float32))
    with pytest.raises(audio.AudioError, match="array input #1.*NaN"):
        audio.log_mel_batch([synthetic(16000), np.full(16000, np.nan, np.float32)])
    with pytest.raises(audio.AudioError, match="no waveforms"):
        audio.log_mel_batch([])


# ---------------------------------------------------------------------------------------------------------------
# load_audio


def stereo_44k(n=2 * 44100 + 123):
    """Two different channels at 44.1 kHz, (samples, channels) as soundfile writes them."""
    t = np.arange(n) / 44100
    left = 0.5 * np.sin(2 * np.pi * 440 * t)
    right = 0.25 * np.sin(2 * np.pi * 1000 * t + 0.3)
    return np.stack([left, right], axis=1).astype(np.float32)


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_load_audio_file_resamples_to_16k_mono(tmp_path, ext):
    data = stereo_44k()
    path = tmp_path / f"stereo.{ext}"
    sf.write(path, data, 44100)
    wave = audio.load_audio(path)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert wave.shape[0] == math.ceil(data.shape[0] * 16000 / 44100)
    # librosa.load is the usual way to read audio for these models; ours must give the same samples.
    expected, _ = librosa.load(path, sr=16000, mono=True)
    np.testing.assert_allclose(wave, expected, rtol=0, atol=1e-6)
    # And it is the channel mean: the 440 Hz tone at half its amplitude, plus the 1 kHz tone at half its amplitude.
    spectrum = np.abs(np.fft.rfft(wave[:16000])) / 8000  # 1 Hz bins, amplitude scale
    assert abs(spectrum[440] - 0.25) < 0.02 and abs(spectrum[1000] - 0.125) < 0.02
    if ext in ("wav", "flac"):  # lossless: the mono signal itself, resampled
        mono16k = librosa.resample(data.mean(axis=1), orig_sr=44100, target_sr=16000)
        np.testing.assert_allclose(wave, mono16k, rtol=0, atol=1e-4)  # 16-bit wav/flac quantisation
        # And exactly what librosa.resample gives for the samples as read (we call its default resampler directly).
        read, _ = sf.read(path, dtype="float32", always_2d=True)
        np.testing.assert_array_equal(wave, librosa.resample(read.T.mean(axis=0), orig_sr=44100, target_sr=16000))


def test_load_audio_arrays_and_tuples():
    data = stereo_44k()
    from_tuple = audio.load_audio((data.T, 44100))  # (channels, samples), librosa's convention
    expected = librosa.resample(data.T.mean(axis=0), orig_sr=44100, target_sr=16000)
    np.testing.assert_array_equal(from_tuple, expected)
    # Every rate and length librosa.resample handles, to the bit: lengths where soxr's output is a sample short or
    # long of ceil(n * 16000 / rate), one-sample inputs, downsampling and upsampling.
    for rate in (8000, 11025, 22050, 44100, 48000, 96000, 16001):
        for n in (1, 7, 160, 12345):
            wave = synthetic(n, seed=n)
            np.testing.assert_array_equal(audio.load_audio((wave, rate)),
                                          librosa.resample(wave, orig_sr=rate, target_sr=16000), err_msg=f"{rate} {n}")
    # 44100.0 is still an integer rate.
    np.testing.assert_array_equal(audio.load_audio((data.T, 44100.0)), from_tuple)

    mono = synthetic(12345)
    out = audio.load_audio(mono)
    assert out.dtype == np.float32 and np.array_equal(out, mono)
    np.testing.assert_array_equal(audio.load_audio(mono.astype(np.float64)), mono)
    np.testing.assert_array_equal(audio.load_audio((mono, 16000)), mono)
    np.testing.assert_allclose(audio.load_audio(np.stack([mono, 0 * mono])), 0.5 * mono, rtol=0, atol=1e-7)
    # Integer PCM is scaled by its full range.
    pcm = np.array([0, 16384, -32768, 32767], np.int16)
    np.testing.assert_array_equal(audio.load_audio(pcm), np.array([0, 0.5, -1, 32767 / 32768], np.float32))
    # Silence is valid input.
    assert np.all(audio.load_audio(np.zeros(100, np.float32)) == 0)


def test_reading_resampling_and_log_mel_never_import_librosa(tmp_path):
    """A plain run (wav and flac read, 44.1 kHz resampled, log-mel) leaves librosa and numba unimported: librosa's
    import compiles numba code for seconds on a machine's first run."""
    paths = []
    for ext in ("wav", "flac"):
        paths.append(str(tmp_path / f"stereo.{ext}"))
        sf.write(paths[-1], stereo_44k(), 44100)
    code = ("import sys; from qasr_jax.io.audio import load_audio, log_mel\n"
            "for p in sys.argv[1:]: assert log_mel(load_audio(p)).shape[0] == 128\n"
            "print(sorted(m for m in ('librosa', 'numba') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code, *paths], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_load_audio_speech_file_is_already_16k():
    path = os.path.join(DATA, "hello_en.wav")
    np.testing.assert_array_equal(audio.load_audio(path), speech("hello_en.wav"))


def _raises(src, *fragments, name=None):
    """load_audio(src) raises a ValueError whose message contains every fragment (the input's label first)."""
    with pytest.raises(audio.AudioError) as info:
        audio.load_audio(src, name=name)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return info.value


def test_load_audio_bad_files_name_the_path(tmp_path):
    missing = str(tmp_path / "nope.wav")
    assert isinstance(_raises(missing, missing, "no such file"), FileNotFoundError)
    _raises(str(tmp_path), str(tmp_path), "directory")

    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 2000, dtype=np.uint8).tobytes())
    _raises(garbage, str(garbage), "cannot decode", "convert")

    truncated = tmp_path / "truncated.flac"
    sf.write(truncated, stereo_44k(), 44100)
    truncated.write_bytes(truncated.read_bytes()[:40])
    _raises(truncated, str(truncated), "cannot decode")

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros((0, 2), np.float32), 44100)
    _raises(empty, str(empty), "empty")
    zero_bytes = tmp_path / "zero.wav"
    zero_bytes.write_bytes(b"")
    _raises(zero_bytes, str(zero_bytes), "file is empty (0 bytes)")

    _raises(missing, "clip 7", name="clip 7")  # a caller's name replaces the path


def test_load_audio_bad_arrays_name_the_input():
    good = synthetic(16000)
    _raises(np.zeros(0, np.float32), "array input", "empty")
    _raises(np.zeros((2, 0), np.float32), "array input", "empty")
    bad = good.copy()
    bad[100] = np.nan
    _raises(bad, "array input #2", "NaN", name="array input #2")
    bad[100] = np.inf
    _raises(bad, "array input", "Inf")
    _raises(np.zeros((1, 2, 16000), np.float32), "array input", "shape (1, 2, 16000)")
    _raises(np.float32(0.5), "array input", "1-D")
    _raises(good.astype(np.complex64), "array input", "dtype complex64")
    _raises([0.1, 0.2], "array input", "numpy array")
    _raises((good, 16000, 1), "array input", "(samples, sample_rate)")
    for rate in [0, -16000, 22050.5, "16000", None, float("nan"), True]:
        _raises((good, rate), "clip", "sample rate", name="clip")
