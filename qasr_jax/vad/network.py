"""Voice activity detection: Silero VAD v6 (16 kHz, MIT) as plain JAX functions, batched over many streams.

The network sees 512 new samples (32 ms) per frame with the 64 samples before them: a short-time Fourier transform
done as a matrix product (four 256-sample windows, hop 128, after reflect-padding 64 samples on the right), the
magnitude of its 129 bins, four 1-D convolutions that shrink the four windows to one 128-vector, an LSTM cell of 128
and a sigmoid head. Everything but the LSTM is independent per frame, so it runs for a whole block of frames of every
stream at once; only the LSTM steps through time (``lax.scan``). Frames past a stream's length leave its state alone,
so a batch of streams of different lengths, padded to a bucket, gives each stream exactly what it gives alone.

The weights are Silero's own ``silero_vad_16k.safetensors`` (shipped in ``qasr_jax/data`` with Silero's MIT license
beside it), read with safetensors' numpy loader: no torch. ``qasr_jax.vad.rules`` turns probabilities into speech
segments, transcription pieces and realtime turns.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from qasr_jax.decoding.buckets import length_bucket, next_pow2
from qasr_jax.io.audio import SAMPLE_RATE, load_audio
from qasr_jax.io.hub import data_path

FRAME_SAMPLES = 512  # new samples per frame at 16 kHz
CONTEXT_SAMPLES = 64  # samples of the previous frame the network also sees
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE  # 0.032
HIDDEN = 128  # LSTM width
WEIGHTS_FILE = "silero_vad_16k.safetensors"
LICENSE_FILE = "SILERO_VAD_LICENSE"
_WINDOW, _HOP, _BINS = 256, 128, 129  # the STFT: 4 windows over 576 + 64 reflected samples
_BLOCK = 256  # frames whose convolutions run together inside the scan (bounds memory on hour-long inputs)
MAX_STREAMS = 64  # rows of one batched call
BATCH_SAMPLES = 1 << 25  # padded samples of one batched call (35 min of audio, 128 MB)
_HIGHEST = jax.lax.Precision.HIGHEST  # GPUs and TPUs would otherwise round float32 matmuls (parity is 1e-3)


@functools.cache
def vad_params() -> dict[str, jax.Array]:
    """Silero VAD v6's 16 kHz weights from the package, laid out for ``speech_probabilities_batch``."""
    from safetensors.numpy import load_file

    w = load_file(data_path(WEIGHTS_FILE))
    params = {"stft": w["stft_conv.weight"][:, 0, :].T}  # (256, 258): real bins then imaginary bins
    for i in range(1, 5):  # torch Conv1d (out, in, k) -> (k * in, out), matching _conv's stacking of shifts
        kernel = w[f"conv{i}.weight"]
        params[f"conv{i}"] = kernel.transpose(2, 1, 0).reshape(-1, kernel.shape[0])
        params[f"conv{i}_bias"] = w[f"conv{i}.bias"]
    params["lstm_in"] = w["lstm_cell.weight_ih"].T  # (128, 512): gates i, f, g, o
    params["lstm_hidden"] = w["lstm_cell.weight_hh"].T  # (128, 512)
    params["lstm_bias"] = w["lstm_cell.bias_ih"] + w["lstm_cell.bias_hh"]
    params["head"] = w["final_conv.weight"][0, :, 0]  # (128,)
    params["head_bias"] = w["final_conv.bias"]
    return {k: jnp.asarray(v, jnp.float32) for k, v in params.items()}


def _conv(x: jax.Array, kernel: jax.Array, bias: jax.Array, stride: int) -> jax.Array:
    """Conv1d with kernel 3 and padding 1 on (n, length, channels), as one matmul over the stacked shifts."""
    length = x.shape[1]
    padded = jnp.pad(x, ((0, 0), (1, 1), (0, 0)))
    out_len = (length - 1) // stride + 1
    shifts = [padded[:, k : k + stride * (out_len - 1) + 1 : stride] for k in range(3)]
    return jnp.dot(jnp.concatenate(shifts, axis=-1), kernel, precision=_HIGHEST) + bias


def frame_features(params: dict, windows: jax.Array) -> jax.Array:
    """(n, 576) frames with their 64 context samples -> (n, 128) LSTM inputs (everything before the LSTM)."""
    x = jnp.pad(windows, ((0, 0), (0, CONTEXT_SAMPLES)), mode="reflect")  # (n, 640)
    n_windows = (x.shape[1] - _WINDOW) // _HOP + 1  # 4
    stft_in = jnp.stack([x[:, i * _HOP : i * _HOP + _WINDOW] for i in range(n_windows)], axis=1)  # (n, 4, 256)
    spec = jnp.dot(stft_in, params["stft"], precision=_HIGHEST)  # (n, 4, 258)
    x = jnp.sqrt(spec[..., :_BINS] ** 2 + spec[..., _BINS:] ** 2)  # (n, 4, 129) magnitudes
    for i, stride in ((1, 1), (2, 2), (3, 2), (4, 1)):
        x = jax.nn.relu(_conv(x, params[f"conv{i}"], params[f"conv{i}_bias"], stride))
    return x[:, 0, :]  # (n, 128): the convolutions leave one position


@flax.struct.dataclass
class VadState:
    """What a batch of streams carries between calls: the LSTM's h and c, and each stream's last 64 samples."""

    h: jax.Array  # (streams, 128)
    c: jax.Array  # (streams, 128)
    context: jax.Array  # (streams, 64)


def initial_state(streams: int = 1) -> VadState:
    """The state of ``streams`` streams before any audio (zeros, as Silero starts)."""
    zeros = jnp.zeros((streams, HIDDEN), jnp.float32)
    return VadState(zeros, zeros, jnp.zeros((streams, CONTEXT_SAMPLES), jnp.float32))


@jax.jit
def speech_probabilities_batch(params: dict, audio: jax.Array, n_frames: jax.Array, state: VadState
                               ) -> tuple[jax.Array, VadState]:
    """(streams, frames * 512) samples, each stream's real frame count, state -> (streams, frames) probabilities
    and the state after each stream's last real frame. Frames past a stream's count are padding."""
    streams, total = audio.shape
    frames = total // FRAME_SAMPLES
    block = math.gcd(frames, _BLOCK)
    new = audio.reshape(streams, frames, FRAME_SAMPLES)
    before = jnp.concatenate([state.context[:, None, :], new[:, :-1, -CONTEXT_SAMPLES:]], axis=1)  # (s, f, 64)
    windows = jnp.concatenate([before, new], axis=-1)  # (streams, frames, 576)
    blocks = windows.reshape(streams, frames // block, block, -1).transpose(1, 0, 2, 3)  # (nb, s, block, 576)

    def run_block(carry, inputs):
        block_windows, first = inputs
        feats = frame_features(params, block_windows.reshape(streams * block, -1))
        gates_in = jnp.dot(feats, params["lstm_in"], precision=_HIGHEST) + params["lstm_bias"]
        gates_in = gates_in.reshape(streams, block, -1).transpose(1, 0, 2)  # (block, streams, 512)

        def step(hc, xs):
            gate_in, t = xs
            h, c = hc
            i, f, g, o = jnp.split(gate_in + jnp.dot(h, params["lstm_hidden"], precision=_HIGHEST), 4, axis=-1)
            c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
            h_new = jax.nn.sigmoid(o) * jnp.tanh(c_new)
            live = (t < n_frames)[:, None]  # padding frames keep the state
            return (jnp.where(live, h_new, h), jnp.where(live, c_new, c)), h_new

        hc, hs = jax.lax.scan(step, carry, (gates_in, first + jnp.arange(block)))  # hs (block, streams, 128)
        logits = jnp.dot(jax.nn.relu(hs), params["head"], precision=_HIGHEST) + params["head_bias"]
        return hc, jax.nn.sigmoid(logits)  # (block, streams)

    (h, c), probs = jax.lax.scan(run_block, (state.h, state.c), (blocks, jnp.arange(frames // block) * block))
    last = jnp.clip(n_frames - 1, 0, frames - 1)
    tail = jnp.take_along_axis(new, last[:, None, None], axis=1)[:, 0, -CONTEXT_SAMPLES:]
    context = jnp.where((n_frames > 0)[:, None], tail, state.context)
    return probs.reshape(frames, streams).T, VadState(h, c, context)


def frame_count(n_samples: int) -> int:
    """Frames (probabilities) for ``n_samples`` samples at 16 kHz: one per 512, the last partial one zero-padded."""
    return -(-n_samples // FRAME_SAMPLES)


def _padded(waves: Sequence[np.ndarray], state: VadState | None) -> tuple[np.ndarray, np.ndarray, VadState]:
    """Waves -> (rows, bucketed frames * 512) zero-padded samples, frame counts, and the state padded to the rows."""
    counts = np.array([frame_count(w.shape[0]) for w in waves], np.int32)
    rows = next_pow2(len(waves))
    frames = length_bucket(max(1, int(counts.max())))
    audio = np.zeros((rows, frames * FRAME_SAMPLES), np.float32)
    for r, w in enumerate(waves):
        audio[r, : w.shape[0]] = w
    full = initial_state(rows)
    if state is not None:
        full = jax.tree.map(lambda z, s: z.at[: s.shape[0]].set(s), full, state)
    return audio, np.pad(counts, (0, rows - len(waves))), full


def _groups(lengths: list[int]) -> list[list[int]]:
    """Indices of waves in batches, longest first: at most MAX_STREAMS rows and about BATCH_SAMPLES padded samples
    each (a longer wave goes alone)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and len(groups[-1]) < MAX_STREAMS and \
                next_pow2(len(groups[-1]) + 1) * lengths[groups[-1][0]] <= BATCH_SAMPLES:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def speech_probabilities(audio, sample_rate: int = SAMPLE_RATE):
    """Speech probability per 32 ms (512 samples at 16 kHz) of one waveform, or of each of a list (batched)."""
    single = not isinstance(audio, (list, tuple))
    items = [audio] if single else list(audio)
    if not items:
        raise ValueError("speech_probabilities got an empty list; pass a waveform or a list of waveforms")
    waves = [_as_16k(w, sample_rate, f"audio #{i}") for i, w in enumerate(items)]
    out: list[np.ndarray] = [np.zeros(0)] * len(waves)
    for group in _groups([w.shape[0] for w in waves]):
        padded, counts, state = _padded([waves[i] for i in group], None)
        probs = np.asarray(speech_probabilities_batch(vad_params(), padded, counts, state)[0])
        for r, i in enumerate(group):
            out[i] = probs[r, : counts[r]]
    return out[0] if single else out


def _as_16k(wave, sample_rate: int, label: str) -> np.ndarray:
    """One waveform, checked, mono and at 16 kHz (other rates resampled with the library's resampler)."""
    return load_audio((wave, sample_rate), name=label)


def stream_probabilities(state: VadState, chunks: Sequence[np.ndarray]) -> tuple[list[np.ndarray], VadState]:
    """Advance streams by one chunk each (16 kHz, a multiple of 512 samples; empty to skip) -> their frames'
    probabilities and the new state; ``initial_state(len(chunks))`` starts them."""
    for i, chunk in enumerate(chunks):
        if chunk.ndim != 1 or chunk.shape[0] % FRAME_SAMPLES:
            raise ValueError(f"stream chunk #{i} has shape {chunk.shape}; pass 1-D 16 kHz audio in whole "
                             f"{FRAME_SAMPLES}-sample frames (keep the remainder for the next call)")
    if state.h.shape[0] != len(chunks):
        raise ValueError(f"the state holds {state.h.shape[0]} streams but {len(chunks)} chunks were given; "
                         "pass one chunk per stream (empty for a stream with no new audio)")
    padded, counts, full = _padded([np.asarray(c, np.float32) for c in chunks], state)
    probs, new_state = speech_probabilities_batch(vad_params(), padded, counts, full)
    n = len(chunks)
    probs = np.asarray(probs)
    return [probs[r, : counts[r]] for r in range(n)], jax.tree.map(lambda x: x[:n], new_state)
