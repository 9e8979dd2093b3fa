"""Audio front end: load any audio as 16 kHz mono float32, and compute Whisper-style 128-bin log-mel features.

The log-mel is the one used by Qwen3-ASR (``Qwen3ASRFeatureExtractor`` in transformers): periodic Hann window of
400 samples, hop 160, |STFT|^2 with centre reflect padding and the last frame dropped, 128 Slaney mel filters over
0-8 kHz, ``log10(max(x, 1e-10))``, floored at (max - 8) over the utterance, then ``(x + 4) / 4``. Waveforms shorter
than 0.5 s are zero-padded to 0.5 s first, and that padding counts as audio.

Batches are computed as if each waveform were alone (its own reflect padding, its own max), in one jitted call over
a zero-padded (batch, samples) array whose length is bucketed to whole seconds so the compiled function is reused.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

SAMPLE_RATE = 16000
HOP = 160
N_FFT = 400
N_MELS = 128
MIN_SAMPLES = 8000  # 0.5 s; shorter waveforms are zero-padded to this before the STFT
CHUNK_FRAMES = 100  # the encoder's 1 s chunk: feature time axes are padded to a multiple of this

_LOG_FLOOR = 1e-10
_DYNAMIC_RANGE = 8.0  # log10 units kept below each utterance's max


class AudioError(ValueError):
    """Audio input that cannot be used; the message names the input and says what to do."""


class AudioFileNotFoundError(AudioError, FileNotFoundError):
    """An audio path that does not exist (catchable as AudioError, ValueError or FileNotFoundError)."""


# ----------------------------------------------------------------------------------------------------------------
# Loading


def load_audio(src: Any, name: str | None = None) -> np.ndarray:
    """Return `src` (a file path, a ``(samples, rate)`` tuple, or a 16 kHz array) as 16 kHz mono float32 samples.

    Arrays are 1-D, ``(channels, samples)`` or ``(samples, channels)`` as ``soundfile.read`` gives them (the longer
    axis is time); channels are averaged and other rates are resampled with soxr.
    Integer PCM arrays are scaled to [-1, 1). `name` labels the input in error messages (e.g. ``"array input #3"``).
    Raises AudioError (a ValueError) for anything unusable. Silent audio is valid.
    """
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        label = name if name is not None else path
        samples, rate = _read_file(path, label)
        return _to_mono_16k(samples, rate, label)
    label = name if name is not None else "array input"
    if isinstance(src, tuple):
        if len(src) != 2:
            raise AudioError(f"{label}: a tuple input must be (samples, sample_rate), got a tuple of {len(src)} items")
        samples, rate = src
        rate = _check_rate(rate, label)
        return _to_mono_16k(_as_float_array(samples, label), rate, label)
    if isinstance(src, (bytes, bytearray, list)):
        raise AudioError(
            f"{label}: got a {type(src).__name__}; pass a file path, a (samples, sample_rate) tuple, "
            "or a numpy array of 16 kHz samples (np.asarray(...))"
        )
    return _to_mono_16k(_as_float_array(src, label), SAMPLE_RATE, label)


def _read_file(path: str, label: str) -> tuple[np.ndarray, int]:
    """Decode a file to ``(channels, samples)`` float32 and its rate; soundfile first, librosa/audioread as fallback."""
    if not os.path.exists(path):
        raise AudioFileNotFoundError(f"{label}: no such file; check the path")
    if os.path.isdir(path):
        raise AudioError(f"{label}: is a directory; pass the path of an audio file inside it")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{label}: file is empty (0 bytes); record, copy or download it again")
    import soundfile

    try:
        data, rate = soundfile.read(path, dtype="float32", always_2d=True)  # (samples, channels)
        return data.T, int(rate)
    except Exception as sf_exc:  # libsndfile cannot read it; audioread (ffmpeg/gstreamer) may, e.g. m4a
        import librosa

        try:
            with warnings.catch_warnings():  # librosa warns that its audioread path is deprecated
                warnings.simplefilter("ignore")
                data, rate = librosa.load(path, sr=None, mono=False, dtype=np.float32)
        except Exception as lr_exc:
            raise AudioError(
                f"{label}: cannot decode audio (soundfile: {sf_exc}; audioread: {type(lr_exc).__name__} {lr_exc}); "
                "the file may be corrupt "
                "or truncated, or its format unsupported: convert it to wav/flac (e.g. `sox in.x -r 16000 -c 1 out.wav`)"
            ) from lr_exc
        return np.atleast_2d(data), int(rate)


def _check_rate(rate: Any, label: str) -> int:
    if isinstance(rate, (bool, np.bool_)) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise AudioError(f"{label}: sample rate must be a positive integer in Hz, got {rate!r}")
    if not np.isfinite(rate) or rate != int(rate) or rate <= 0:
        raise AudioError(f"{label}: sample rate must be a positive integer in Hz, got {rate!r}")
    return int(rate)


def _as_float_array(samples: Any, label: str) -> np.ndarray:
    """Any array-like of real samples -> float32 ndarray; integer PCM scaled by its full range."""
    if isinstance(samples, (list, tuple)):
        samples = np.asarray(samples)
    if not (isinstance(samples, np.ndarray) or hasattr(samples, "__array__")):
        raise AudioError(
            f"{label}: got a {type(samples).__name__}; pass a file path, a (samples, sample_rate) tuple, "
            "or a numpy array of 16 kHz samples"
        )
    arr = np.asarray(samples)
    if arr.dtype.kind == "f":
        return arr.astype(np.float32, copy=False)
    if arr.dtype.kind in "iu":
        info = np.iinfo(arr.dtype)
        half = 2.0 ** (info.bits - 1)
        offset = half if arr.dtype.kind == "u" else 0.0  # unsigned PCM (e.g. 8-bit wav) is centred on half its range
        return ((arr.astype(np.float64) - offset) / half).astype(np.float32)
    raise AudioError(f"{label}: samples must be real numbers (float or integer PCM), got dtype {arr.dtype}")


def _to_mono_16k(samples: np.ndarray, rate: int, label: str) -> np.ndarray:
    """(samples,), (channels, samples) or (samples, channels) at `rate` -> (n,) float32 at 16 kHz, checked."""
    if samples.ndim == 0 or samples.ndim > 2:
        raise AudioError(
            f"{label}: expected 1-D samples or a 2-D (channels, samples) array, got shape {samples.shape}; "
            "pass one waveform at a time"
        )
    if samples.size == 0:
        raise AudioError(f"{label}: audio is empty (0 samples); pass at least one sample")
    if samples.ndim == 2:  # (channels, samples) or soundfile's (samples, channels): the long axis is time
        samples = samples.mean(axis=1 if samples.shape[0] > samples.shape[1] else 0)
    if not np.all(np.isfinite(samples)):
        raise AudioError(f"{label}: audio contains NaN or Inf samples; clean or re-decode the audio")
    if rate != SAMPLE_RATE:
        samples = _resample(samples, rate)
    return np.ascontiguousarray(samples, dtype=np.float32)


def _resample(samples: np.ndarray, rate: int) -> np.ndarray:
    """(n,) float samples at ``rate`` -> 16 kHz, exactly as ``librosa.resample`` (and so ``librosa.load(sr=16000)``)
    does by default: soxr's "HQ" filter, then cut or zero-padded to ``ceil(n * 16000 / rate)`` samples.

    Calling soxr directly keeps librosa, whose import compiles numba code for seconds on a first run, off the path.
    """
    import soxr

    n_out = int(np.ceil(samples.shape[0] * (SAMPLE_RATE / rate)))
    out = soxr.resample(samples, rate, SAMPLE_RATE, quality="soxr_hq")[:n_out]
    return np.pad(out, (0, n_out - out.shape[0])).astype(samples.dtype, copy=False)


# ----------------------------------------------------------------------------------------------------------------
# Log-mel


def n_frames(n_samples: int) -> int:
    """Number of valid mel frames for a waveform of `n_samples` at 16 kHz (0.5 s minimum, last STFT frame dropped)."""
    return max(int(n_samples), MIN_SAMPLES) // HOP


def frames_of(lengths: jax.Array) -> jax.Array:
    """Valid mel frames (batch,) of waveforms of ``lengths`` (batch,) samples: ``n_frames`` inside a program."""
    return jnp.maximum(lengths, MIN_SAMPLES) // HOP


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mels per 200 Hz), logarithmic above (27 mels per factor 6.4)."""
    mels = hz / (200.0 / 3)
    log_part = hz >= 1000.0
    return np.where(log_part, 15.0 + np.log(np.maximum(hz, 1000.0) / 1000.0) / (np.log(6.4) / 27.0), mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    """Inverse of ``_hz_to_mel``."""
    hz = mels * (200.0 / 3)
    log_part = mels >= 15.0
    return np.where(log_part, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels - 15.0)), hz)


@functools.lru_cache(maxsize=None)
def mel_filters() -> np.ndarray:
    """The (201, 128) float32 Slaney mel filter bank over 0-8 kHz, frequency bins x mel bins (read-only)."""
    # The triangles and Slaney area normalisation of transformers' mel_filter_bank (and librosa.filters.mel), in
    # float64; tests/io/test_audio.py checks that they agree to the last float32 bit.
    bins = np.fft.rfftfreq(N_FFT, d=1.0 / SAMPLE_RATE)  # (201,) Hz
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.float64(0.0)), _hz_to_mel(np.float64(SAMPLE_RATE / 2)), N_MELS + 2))
    widths = np.diff(edges)  # (129,)
    ramps = edges[:, None] - bins[None, :]  # (130, 201)
    rising = -ramps[:-2] / widths[:-1, None]  # (128, 201)
    falling = ramps[2:] / widths[1:, None]
    bank = np.maximum(0.0, np.minimum(rising, falling)) * (2.0 / (edges[2:] - edges[:-2]))[:, None]  # (mels, bins)
    bank = np.ascontiguousarray(bank.T, dtype=np.float32)
    bank.flags.writeable = False
    return bank


@functools.lru_cache(maxsize=None)
def _hann_window() -> np.ndarray:
    # Periodic Hann (as torch.hann_window's default): the DFT-even window of length N_FFT.
    k = np.arange(N_FFT, dtype=np.float64)
    return (0.5 - 0.5 * np.cos(2.0 * np.pi * k / N_FFT)).astype(np.float32)


def log10_mel_padded(samples: jax.Array, lengths: jax.Array, frames: int) -> tuple[jax.Array, jax.Array]:
    """log10 of the mel power of each row of zero-padded `samples` (batch, S), before the floor: ``(log_spec
    (batch, 128, frames) float32, valid (batch, 1, frames) bool)``; frames at and past a row's ``n_frames`` are
    not valid (their values are meaningless).

    Each row is treated as if alone (zero-padded to 0.5 s, reflect-padded at its own end); frame t depends only on
    samples t*160 - 200 .. t*160 + 199, so a stream recomputes only the frames that appended audio reaches.
    Each length must be <= S, and samples past it must be zero (they stand in for the 0.5 s minimum padding).
    """
    samples = jnp.asarray(samples, jnp.float32)
    lengths = jnp.asarray(lengths, jnp.int32)
    batch, total = samples.shape
    if total < MIN_SAMPLES:  # rows shorter than 0.5 s read zeros up to 0.5 s
        samples = jnp.pad(samples, ((0, 0), (0, MIN_SAMPLES - total)))
        total = MIN_SAMPLES
    n = jnp.maximum(lengths, MIN_SAMPLES)[:, None]  # (batch, 1) effective length, min padding included
    valid_frames = frames_of(lengths)  # (batch,)

    # Frame t covers positions t*HOP - N_FFT/2 .. + N_FFT - 1 of the signal. Framing below works in blocks of
    # gcd(HOP, N_FFT) = 80 samples, so the centred signal is read for (2 * frames + 3) blocks.
    block = 80
    ext_len = (2 * frames + 3) * block
    pos = jnp.arange(ext_len, dtype=jnp.int32)[None, :] - N_FFT // 2  # (1, ext_len)
    # Reflect about the first and each row's own last sample (numpy "reflect": the edge sample is not repeated).
    src = jnp.abs(pos)
    src = jnp.where(src >= n, 2 * (n - 1) - src, src)  # (batch, ext_len)
    # Positions beyond a row's valid frames may reflect out of range; they only feed frames masked below.
    src = jnp.clip(src, 0, total - 1)
    centred = jnp.take_along_axis(samples, src, axis=1)  # (batch, ext_len)

    # Frame t = blocks 2t .. 2t+4 (hop 160 = 2 blocks, window 400 = 5 blocks): strided slices instead of a gather.
    blocks = centred.reshape(batch, 2 * frames + 3, block)
    framed = jnp.stack([blocks[:, i : i + 2 * frames : 2] for i in range(N_FFT // block)], axis=2)
    framed = framed.reshape(batch, frames, N_FFT) * _hann_window()  # (batch, frames, N_FFT)

    spec = jnp.fft.rfft(framed, axis=-1)  # (batch, frames, 201)
    power = jnp.real(spec) ** 2 + jnp.imag(spec) ** 2
    # HIGHEST: on GPU/TPU the default float32 matmul uses TF32/bf16 passes, far outside 1e-4 parity.
    mel = jnp.einsum("bfk,km->bmf", power, mel_filters(), precision=jax.lax.Precision.HIGHEST)  # (batch, 128, frames)

    log_spec = jnp.log10(jnp.maximum(mel, _LOG_FLOOR))
    valid = (jnp.arange(frames)[None, :] < valid_frames[:, None])[:, None, :]  # (batch, 1, frames)
    return log_spec, valid


def floor_log_mel(log_spec, peak):
    """Whisper's floor and scale of log10 mel power: ``(max(log_spec, peak - 8) + 4) / 4``, where ``peak`` is the
    utterance's largest log10 value; numpy in, numpy out (the same float32 operations as under jit)."""
    xp = np if isinstance(log_spec, np.ndarray) else jnp
    return (xp.maximum(log_spec, peak - _DYNAMIC_RANGE) + 4.0) / 4.0


def log_mel_padded(samples: jax.Array, lengths: jax.Array, frames: int) -> jax.Array:
    """Log-mel of each row of zero-padded `samples` (batch, S) cut to its length, as (batch, 128, frames) float32.

    Pure jax.numpy, usable inside jit with `frames` static. Each row is treated as if alone: zero-padded to 0.5 s,
    reflect-padded at its own end, floored against its own max. Frames at and past a row's ``n_frames`` are 0.0.
    Each length must be <= S, and samples past it must be zero (they stand in for the 0.5 s minimum padding).
    """
    log_spec, valid = log10_mel_padded(samples, lengths, frames)
    peak = jnp.max(jnp.where(valid, log_spec, -jnp.inf), axis=(1, 2), keepdims=True)  # (batch, 1, 1)
    return jnp.where(valid, floor_log_mel(log_spec, peak), 0.0)


_log_mel_padded_jit = jax.jit(log_mel_padded, static_argnames="frames")
log10_mel_padded_jit = jax.jit(log10_mel_padded, static_argnames="frames")  # the unfloored values, for streams


def _round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pad_waves(waves: Sequence[np.ndarray], pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """16 kHz mono waveforms -> ``(samples (batch, S) zero-padded float32, lengths (batch,) int32, frames)``: the
    input of ``log_mel_padded`` (and of the engine's one log-mel, encoder and embedding program), checked.

    ``frames`` is the longest item's frame count (or ``pad_to``, if larger) rounded up to a multiple of 100 (1 s),
    so differing lengths reuse one compiled function; S = (frames + 1) * 160 holds every item whole.
    """
    if isinstance(waves, np.ndarray) and waves.ndim == 1:
        raise AudioError("log_mel_batch takes a list of waveforms; for one waveform use log_mel(wave)")
    if len(waves) == 0:
        raise AudioError("log_mel_batch: got no waveforms; pass a list of 1-D 16 kHz arrays")
    arrays = []
    for i, wave in enumerate(waves):
        arr = np.asarray(wave, dtype=np.float32)
        if arr.ndim != 1:
            raise AudioError(
                f"array input #{i}: log-mel takes 1-D 16 kHz mono samples, got shape {arr.shape}; use load_audio first"
            )
        if not np.all(np.isfinite(arr)):
            raise AudioError(f"array input #{i}: audio contains NaN or Inf samples; clean or re-decode the audio")
        arrays.append(arr)
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int32)
    longest = max(n_frames(int(n)) for n in lengths)
    frames = _round_up(max(longest, int(pad_to or 0)), CHUNK_FRAMES)
    # Every item fits whole: n_frames <= frames means length < (frames + 1) * HOP.
    padded = np.zeros((len(arrays), (frames + 1) * HOP), dtype=np.float32)  # (batch, whole seconds + one hop)
    for i, arr in enumerate(arrays):
        padded[i, : arr.shape[0]] = arr
    return padded, lengths, frames


def log_mel_batch(waves: Sequence[np.ndarray], pad_to: int | None = None) -> tuple[jax.Array, np.ndarray]:
    """Log-mel of 16 kHz mono waveforms of any lengths: ``(feats (batch, 128, T_pad) jax.Array, n_frames (batch,)
    int32)``.

    T_pad is the longest item's frame count (or `pad_to`, if larger) rounded up to a multiple of 100 frames (1 s),
    so differing lengths reuse one compiled function. Frames at and past each item's n_frames are 0.0; each
    item's valid frames equal ``log_mel`` of that item alone. n_frames is a host numpy array.
    """
    padded, lengths, frames = pad_waves(waves, pad_to)
    counts = np.array([n_frames(int(n)) for n in lengths], dtype=np.int32)
    feats = _log_mel_padded_jit(padded, lengths, frames=frames)
    return feats, counts


def log_mel(wave: np.ndarray) -> np.ndarray:
    """Log-mel of one 16 kHz mono waveform as a (128, n_frames) float32 numpy array (no time padding)."""
    feats, counts = log_mel_batch([wave])
    return np.asarray(feats[0, :, : counts[0]])
