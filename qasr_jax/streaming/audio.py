"""A stream's encoder output over all its audio so far, recomputing only what appended audio changes.

The encoder output of an 8 s attention window depends only on that window's 800 log-mel frames: the convs run per
1 s chunk, positions restart per chunk, attention stays inside the window. So a stream keeps the output of every
*final* window and re-encodes only the open one(s), each window as an audio of its own (windows are counted from
the start of the audio they belong to, so a window alone gives the same output as inside the whole audio).

Two things make earlier frames change as audio is appended, and both are handled here, not hidden:

* The STFT reads 200 samples either side of each frame's centre and reflects the signal at its end, so frame t is
  final only once ``160 t + 200 <= samples``. A window becomes final when all its frames are; until then it is
  recomputed from its samples at every refresh.
* The log-mel floor is ``max - 8`` over the whole utterance: a louder chunk raises it, and a peak that came from a
  reflected (not yet final) frame can lower it again. A final window keeps its unfloored frames, their minimum,
  and the floor its output was computed with; its frames change exactly when the floor moved and some frame lies
  below the higher of the two floors, and then (only then) it is re-encoded from its kept frames.

:func:`refresh` brings many streams up to date at once: one log-mel call and one encoder call for all of them.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np

from qasr_jax.decoding.buckets import pow2_rows, stream_mel_frames, stream_window_frames
from qasr_jax.io.audio import HOP, MIN_SAMPLES, N_FFT, floor_log_mel, log10_mel_padded_jit, n_frames
from qasr_jax.modeling.config import AudioConfig, audio_token_count

# Frames of real audio read before the first recomputed frame: the STFT reaches N_FFT / 2 = 200 samples (2 frames)
# back, and 50 frames more keep the slice at least 0.5 s long, so it is never zero-padded as a short clip would be.
CONTEXT_FRAMES = -(-(N_FFT // 2) // HOP) + MIN_SAMPLES // HOP


@dataclasses.dataclass
class _Window:
    """A final window: its frames never change again, only the floor applied to them may."""

    raw: np.ndarray  # (mels, window_frames) float32: log10 mel power, unfloored
    low: np.float32  # its smallest raw value: the frames the floor can reach
    high: np.float32  # its largest raw value: its share of the utterance's peak
    floor: np.float32  # the floor its embeds were computed with
    embeds: np.ndarray  # (window_tokens, hidden): projector output


class StreamAudio:
    """The samples of one stream (or segment) and its encoder output, kept up to date by :func:`refresh`."""

    def __init__(self, audio: AudioConfig):
        """An empty stream for an encoder of config ``audio``."""
        self.cfg = audio
        self.samples = 0  # samples appended so far
        self.windows: list[_Window] = []  # the final windows, in order
        self.open: list[np.ndarray] = []  # embeds of the windows after them, as of the last refresh
        self.stable = 0  # leading windows whose embeds the last refresh left as they were
        self.recomputed = 0  # final windows re-encoded because the floor moved (all refreshes together)
        self._tail = np.zeros(0, np.float32)  # samples from _tail_start on: all the open windows need
        self._tail_start = 0

    @property
    def window_frames(self) -> int:
        return self.cfg.n_window_infer

    def append(self, samples: np.ndarray) -> None:
        """Add 16 kHz float32 samples (read at the next refresh)."""
        self._tail = np.concatenate([self._tail, np.asarray(samples, np.float32)])
        self.samples += samples.shape[0]

    def recent(self, n: int) -> np.ndarray:
        """The last ``n`` samples appended (fewer at the start)."""
        return self._tail[-n:]

    @property
    def n_tokens(self) -> int:
        """Audio tokens of everything appended (what the next refresh yields)."""
        return audio_token_count(n_frames(self.samples), self.cfg)

    def embeddings(self, start_window: int = 0) -> np.ndarray:
        """The encoder output (n_tokens, hidden) from window ``start_window`` on, as of the last refresh."""
        parts = [w.embeds for w in self.windows[start_window:]] + self.open[max(0, start_window - len(self.windows)):]
        return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)

    # -- the refresh, in the steps refresh() batches over streams -------------------------------------------------
    def _mel_slice(self) -> tuple[np.ndarray, int]:
        """The samples the open windows' frames read, and the global frame the slice's frame 0 stands for."""
        return self._tail, self._tail_start // HOP

    def _is_final(self, frame: int) -> bool:
        return HOP * frame + N_FFT // 2 <= self.samples

    def _plan(self, raw: np.ndarray) -> tuple[list[tuple[str, int, np.ndarray]], np.float32]:
        """Given the unfloored frames from the first open window on (mels, frames), the rows to encode: each
        (kind, window index, floored features) with kind "final" (a kept window whose floor moved) or "open"."""
        wf = self.window_frames
        first = len(self.windows)  # first window of ``raw``
        peak = np.max(raw) if raw.shape[1] else np.float32(-np.inf)
        for w in self.windows:
            peak = max(peak, w.high)
        floor = np.float32(peak) - np.float32(8.0)  # as floor_log_mel computes it
        rows = []
        for i, w in enumerate(self.windows):
            if w.floor != floor and w.low < max(w.floor, floor):
                rows.append(("final", i, floor_log_mel(w.raw, np.float32(peak))))
        for j in range(0, raw.shape[1], wf):
            rows.append(("open", first + j // wf, floor_log_mel(raw[:, j : j + wf], np.float32(peak))))
        return rows, floor

    def _apply(self, rows, outputs: list[np.ndarray], raw: np.ndarray, floor: np.float32) -> None:
        """Store the encoder outputs of the planned rows; windows whose frames are all final now join the kept."""
        wf = self.window_frames
        before = len(self.windows)
        self.stable = before
        first = before
        self.open = []
        for (kind, index, _), out in zip(rows, outputs):
            if kind == "final":
                self.windows[index].embeds, self.windows[index].floor = out, floor
                self.stable = min(self.stable, index)
                self.recomputed += 1
            elif self._is_final((index + 1) * wf - 1) and index == len(self.windows):
                part = raw[:, (index - first) * wf : (index - first + 1) * wf]
                self.windows.append(_Window(part.copy(), part.min(), part.max(), floor, out))
            else:
                self.open.append(out)
        if len(self.windows) > before:  # drop the samples no open window reads any more
            start = max(0, HOP * (len(self.windows) * wf - CONTEXT_FRAMES))
            self._tail = self._tail[start - self._tail_start :]
            self._tail_start = start


def refresh(engine, streams: list[StreamAudio]) -> None:
    """Bring each stream's encoder output up to its samples: one log-mel and one encoder call for all streams."""
    if not streams:
        return
    cfg = streams[0].cfg
    raws = _open_frames(streams)
    plans = [s._plan(raw) for s, raw in zip(streams, raws)]
    rows = [r for plan, _ in plans for r in plan]
    outputs = _encode(engine, cfg, [feats for _, _, feats in rows])
    at = 0
    for s, raw, (plan, floor) in zip(streams, raws, plans):
        s._apply(plan, outputs[at : at + len(plan)], raw, floor)
        at += len(plan)


def _open_frames(streams: list[StreamAudio]) -> list[np.ndarray]:
    """For each stream, the unfloored log10 mel (mels, frames) of every frame from its first open window on."""
    cfg = streams[0].cfg
    slices = [s._mel_slice() for s in streams]
    counts = [n_frames(x.shape[0]) for x, _ in slices]
    frames = stream_mel_frames(max(counts), cfg)
    padded = np.zeros((pow2_rows(len(streams)), (frames + 1) * HOP), np.float32)
    lengths = np.zeros(padded.shape[0], np.int32)
    for i, (x, _) in enumerate(slices):
        padded[i, : x.shape[0]] = x
        lengths[i] = x.shape[0]
    log_spec = np.asarray(jax.device_get(log10_mel_padded_jit(padded, lengths, frames=frames)[0]))
    out = []
    for i, (s, (x, first_frame)) in enumerate(zip(streams, slices)):
        skip = len(s.windows) * s.window_frames - first_frame  # context frames before the first open window
        out.append(log_spec[i, :, skip : counts[i]])
    return out


def _encode(engine, cfg: AudioConfig, feats: list[np.ndarray]) -> list[np.ndarray]:
    """Encode windows given as floored features (mels, <= window frames), batched: their embeds, trimmed."""
    if not feats:
        return []
    frames = stream_window_frames(max(f.shape[1] for f in feats), cfg)
    rows = pow2_rows(len(feats), engine.data_size)
    batch = np.zeros((rows, cfg.num_mel_bins, frames), np.float32)
    valid = np.full(rows, frames, np.int32)  # padding rows: a full window of zeros
    for i, f in enumerate(feats):
        batch[i, :, : f.shape[1]] = f
        valid[i] = f.shape[1]
    out, _ = engine.encode(batch, valid)
    out = np.asarray(jax.device_get(out), np.float32)
    return [out[i, : audio_token_count(f.shape[1], cfg)] for i, f in enumerate(feats)]
