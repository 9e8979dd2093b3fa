"""A stream's cached encoder output equals the offline encoder on all audio so far, at every chunk boundary: for
boundaries inside a conv chunk and inside a window, before 0.5 s, and when later audio is louder than earlier
(the log-mel floor moves); and only the windows whose frames changed are re-encoded."""

from __future__ import annotations

import numpy as np
import pytest

import qasr_jax
from qasr_jax.io.audio import log_mel_batch
from qasr_jax.streaming.audio import StreamAudio, refresh
from qasr_jax.testing import speech, synthetic

SR = 16000


@pytest.fixture(scope="module")
def model(checkpoints):
    return qasr_jax.load(checkpoints("asr").hf)


def relative(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def offline(model, wave: np.ndarray) -> np.ndarray:
    """The offline encoder on the whole of ``wave``: (n_tokens, hidden)."""
    feats, n_frames = log_mel_batch([wave])
    out, n_tokens = model.engine.encode(feats, n_frames)
    return np.asarray(out)[0, : int(n_tokens[0])]


def feed_and_compare(model, wave: np.ndarray, step: int) -> StreamAudio:
    """Append ``wave`` ``step`` samples at a time (the last piece shorter); after each refresh the cached output
    must equal the offline encoder's on everything appended."""
    audio = StreamAudio(model.config.audio)
    for start in range(0, wave.shape[0], step):
        piece = wave[start : start + step]
        audio.append(piece)
        refresh(model.engine, [audio])
        end = start + piece.shape[0]
        want = offline(model, wave[:end])
        got = audio.embeddings()
        assert got.shape == want.shape, end
        assert relative(got, want) <= 1e-5, (end, relative(got, want))
    return audio


@pytest.mark.parametrize("seconds", [0.37, 0.5, 1.0, 2.0, 3.7])
def test_cached_encoder_equals_offline_at_every_boundary(model, seconds):
    """Speech across two 8 s windows, then noise; 0.37 s and 3.7 s put boundaries inside conv chunks and windows,
    0.37 s also starts below the 0.5 s minimum (whose zero padding counts as audio)."""
    wave = np.concatenate([speech("long_en.wav"), synthetic(2.6, 4)])
    audio = feed_and_compare(model, wave, round(seconds * SR))
    assert len(audio.windows) == 1 and len(audio.open) == 1  # 12.7 s: one final window, one open
    assert audio.stable == 1  # the last refresh kept window 0 as it was


def test_reflect_padding_changes_the_last_frames(model):
    """The trap the cache has to respect: appending audio changes the features of the last frames (the STFT read
    them reflected), so a window is kept only once all its frames are final."""
    wave = synthetic(3.0, 5)
    wave[:SR] *= 2  # the loudest frames come first: the floor stays where it is
    cut = 123 * 160 + 20  # the last frame reads 20 reflected samples
    short, full = model.log_mel(wave[:cut]), model.log_mel(wave)
    n = short.shape[1]
    assert np.max(np.abs(short[:, n - 1] - full[:, n - 1])) > 1e-3
    np.testing.assert_allclose(short[:, : n - 1], full[:, : n - 1], rtol=0, atol=1e-6)  # the others are final


def test_louder_later_chunks_recompute_exactly_the_windows_whose_frames_changed(model):
    """9 s of very quiet audio (window 0 becomes final under its own, low floor), then loud audio: the floor rises
    above window 0's frames, so window 0 must be re-encoded, once; window 1 (final later) never needs it."""
    quiet, loud = 1e-5 * synthetic(9.0, 1), synthetic(9.5, 2)
    loud[:SR] *= 2  # its loudest second first: the floor moves once, at 10 s
    wave = np.concatenate([quiet, loud])
    # The trap is real: window 0's offline output before and after the loud audio differs by far more than noise.
    before = offline(model, wave[: 9 * SR])[:104]
    after = offline(model, wave)[:104]
    assert relative(before, after) > 1e-2
    audio = StreamAudio(model.config.audio)
    recomputed_at = []
    for start in range(0, wave.shape[0], SR):
        audio.append(wave[start : start + SR])
        before = audio.recomputed
        refresh(model.engine, [audio])
        end = min(start + SR, wave.shape[0])
        assert relative(audio.embeddings(), offline(model, wave[:end])) <= 1e-5, end
        if audio.recomputed > before:
            recomputed_at.append((end / SR, audio.stable))
    assert recomputed_at == [(10.0, 0)] and audio.recomputed == 1  # the first loud chunk, window 0, once
    assert len(audio.windows) == 2


def test_many_streams_refresh_together(model):
    """Streams of different lengths and loudness refreshed in one call equal each refreshed alone."""
    waves = [speech("long_en.wav"), 0.01 * synthetic(11.0, 3), speech("zh.wav")]
    together = [StreamAudio(model.config.audio) for _ in waves]
    alone = [StreamAudio(model.config.audio) for _ in waves]
    for start in range(0, 12 * SR, 3 * SR):
        live = [i for i, w in enumerate(waves) if start < w.shape[0]]
        for i in live:
            together[i].append(waves[i][start : start + 3 * SR])
            alone[i].append(waves[i][start : start + 3 * SR])
            refresh(model.engine, [alone[i]])
        refresh(model.engine, [together[i] for i in live])
        for i in live:
            assert relative(together[i].embeddings(), alone[i].embeddings()) <= 1e-5
