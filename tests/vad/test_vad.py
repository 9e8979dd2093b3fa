"""Silero VAD v6 in JAX against Silero's own ONNX model under onnxruntime and its get_speech_timestamps."""

from __future__ import annotations

import math

import numpy as np
import pytest
from silero_vad import get_speech_timestamps_from_probs

from qasr_jax.decoding.compiles import count_compilations
from qasr_jax.testing import speech
from qasr_jax.testing.silero import reference_probabilities, reference_segments, v6_weights
from qasr_jax.io.hub import data_path
from qasr_jax.vad.network import FRAME_SAMPLES, WEIGHTS_FILE, initial_state, speech_probabilities, stream_probabilities
from qasr_jax.vad.rules import TurnDetector, segments_from_probabilities, speech_pieces, speech_segments

SR = 16000
PHRASES = ["hello_en.wav", "newwords/newwords_0000.wav", "newwords/newwords_0005.wav", "newwords/newwords_0003.wav"]


def noise(seconds: float, level: float, seed: int) -> np.ndarray:
    return (level * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def recording(pauses=(1.0, 2.5, 5.0, 1.5), noise_level=0.003):
    """espeak phrases separated by pauses of low noise (and a burst of louder noise in one); their true spans."""
    parts, spans, at = [noise(0.7, noise_level, 0)], [], int(0.7 * SR)
    for i, (name, pause) in enumerate(zip(PHRASES, pauses)):
        clip = speech(name)
        parts.append(clip)
        spans.append((at, at + clip.shape[0]))
        gap = noise(pause, noise_level, i + 1)
        if i == 2:  # a second of louder noise in the middle of the long pause
            gap[SR : 2 * SR] += noise(1.0, 0.05, 9)
        parts.append(gap)
        at += clip.shape[0] + gap.shape[0]
    return np.concatenate(parts), spans


@pytest.fixture(scope="module")
def rec():
    return recording()


SILENCE = np.zeros(3 * SR, np.float32)
NOISE = noise(4.0, 0.05, 42)


def test_shipped_weights_are_silero_v6():
    from safetensors.numpy import load_file

    shipped, v6 = load_file(data_path(WEIGHTS_FILE)), v6_weights()
    assert shipped.keys() == v6.keys()
    for k in v6:
        np.testing.assert_array_equal(shipped[k], v6[k], err_msg=k)


@pytest.mark.parametrize("case", ["recording", "silence", "noise"])
def test_probabilities_equal_silero_onnx(rec, case):
    wave = {"recording": rec[0], "silence": SILENCE, "noise": NOISE}[case]
    ours, ref = speech_probabilities(wave), reference_probabilities(wave)
    assert ours.shape == ref.shape == (math.ceil(wave.shape[0] / FRAME_SAMPLES),)
    assert np.abs(ours - ref).max() <= 1e-3
    if case == "recording":
        assert ref.max() > 0.9 and ref.min() < 0.1  # the case holds both speech and non-speech


def test_batched_and_streamed_equal_one_by_one(rec):
    waves = [rec[0][: 7 * SR + 123], SILENCE[:5000], speech("zh.wav")]
    alone = [speech_probabilities(w) for w in waves]
    batched = speech_probabilities(waves)
    for a, b in zip(alone, batched):
        np.testing.assert_allclose(b, a, atol=1e-5)
    # Two streams fed in uneven whole-frame chunks (one stream idle in the middle call) give the same probabilities.
    state, got = initial_state(2), [[], []]
    a, b = waves[0][: 200 * FRAME_SAMPLES], waves[2][: 60 * FRAME_SAMPLES]
    for cut_a, cut_b in [((0, 37), (0, 20)), ((37, 37), (20, 41)), ((37, 200), (41, 60))]:
        chunks = [x[lo * FRAME_SAMPLES : hi * FRAME_SAMPLES] for x, (lo, hi) in ((a, cut_a), (b, cut_b))]
        probs, state = stream_probabilities(state, chunks)
        for g, p in zip(got, probs):
            g.extend(p)
    np.testing.assert_allclose(got[0], speech_probabilities(a), atol=1e-5)
    np.testing.assert_allclose(got[1], speech_probabilities(b), atol=1e-5)


def test_new_lengths_inside_a_bucket_compile_nothing():
    speech_probabilities([noise(3.0, 0.01, 1), noise(1.0, 0.01, 2)])
    with count_compilations() as compiles:
        speech_probabilities([noise(2.9, 0.01, 3), noise(2.0, 0.01, 4)])
        speech_probabilities([noise(2.7, 0.01, 5)] * 2)
    assert compiles.count == 0


RULES = [
    {},
    {"threshold": 0.3},
    {"threshold": 0.7, "min_silence_duration_ms": 300, "speech_pad_ms": 100},
    {"min_speech_duration_ms": 1000, "speech_pad_ms": 0},
    {"max_speech_duration_s": 2.0},  # split at the longest silence, or hard where there is none
    {"max_speech_duration_s": 1.5, "min_silence_duration_ms": 2000},
]


def _ours(probs, n, options):
    names = {"threshold": "threshold", "min_speech_duration_ms": "min_speech_seconds",
             "min_silence_duration_ms": "min_silence_seconds", "speech_pad_ms": "pad_seconds",
             "max_speech_duration_s": "max_speech_seconds"}
    kwargs = {names[k]: (v / 1000 if k.endswith("_ms") else v) for k, v in options.items()}
    return segments_from_probabilities(probs, n, **kwargs)


@pytest.mark.parametrize("options", RULES)
def test_rules_equal_silero_on_the_same_probabilities(rec, options):
    """Silero's get_speech_timestamps_from_probs and ours, fed the same probabilities: the same samples exactly."""
    rng = np.random.default_rng(len(str(options)))
    flicker = np.clip(np.repeat(rng.uniform(0, 1, 60), rng.integers(1, 30, 60)), 0, 1)  # runs of random levels
    for probs, n in [(reference_probabilities(rec[0]), rec[0].shape[0]), (flicker, flicker.shape[0] * 512 - 100)]:
        ref = get_speech_timestamps_from_probs(list(probs), audio_length_samples=n, **options)
        assert _ours(probs, n, options) == [(s["start"], s["end"]) for s in ref]


def test_segments_equal_get_speech_timestamps(rec):
    wave = rec[0]
    ours = speech_segments(wave)
    ref = reference_segments(wave)
    assert len(ours) == len(ref) == len(PHRASES)
    for (a, b), (ra, rb) in zip(ours, ref):
        assert abs(a * SR - ra) <= FRAME_SAMPLES and abs(b * SR - rb) <= FRAME_SAMPLES
    # One segment per phrase, inside its true span give or take 100 ms.
    for (a, b), (ta, tb) in zip(ours, rec[1]):
        assert ta / SR - 0.1 <= a < b <= tb / SR + 0.1


def test_silence_and_noise_have_no_speech():
    assert speech_segments([SILENCE, NOISE]) == [[], []]
    assert reference_segments(NOISE) == [] and reference_segments(SILENCE) == []


def test_other_sample_rates_are_resampled(rec):
    import soxr

    wave = rec[0][: 6 * SR]
    at_8k = soxr.resample(wave, SR, 8000, quality="soxr_hq")
    got = speech_segments(at_8k, sample_rate=8000)
    assert len(got) == len(speech_segments(wave))
    for (a, b), (c, d) in zip(got, speech_segments(wave)):
        assert abs(a - c) <= 0.064 and abs(b - d) <= 0.064


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="threshold"):
        speech_segments(SILENCE, threshold=1.5)
    with pytest.raises(ValueError, match="max_speech_seconds"):
        speech_segments(SILENCE, max_speech_seconds=0.05)
    with pytest.raises(ValueError, match="512"):
        stream_probabilities(initial_state(1), [np.zeros(1000, np.float32)])
    with pytest.raises(ValueError, match="empty list"):
        speech_probabilities([])


def test_pieces_merge_neighbours_up_to_the_limit(rec):
    wave, spans = rec
    segments = [(round(a * SR), round(b * SR)) for a, b in speech_segments(wave)]
    wide, narrow = ([(round(p.offset * SR), round(p.offset * SR) + p.samples.shape[0]) for p in ps]
                          for ps in (speech_pieces([wave], 30.0)[0], speech_pieces([wave], 4.0)[0]))
    assert wide == [(segments[0][0], segments[-1][1])]  # everything fits one 30 s piece
    assert all(b - a <= 4 * SR for a, b in narrow) and len(narrow) > 1
    # Each 4 s piece is a run of whole segments: no speech is cut, none is left out.
    covered = [s for s in segments if any(a <= s[0] and s[1] <= b for a, b in narrow)]
    assert covered == segments and narrow[0][0] == segments[0][0] and narrow[-1][1] == segments[-1][1]
    piece = speech_pieces([wave], 4.0)[0][1]
    np.testing.assert_array_equal(piece.samples, wave[narrow[1][0] : narrow[1][1]])
    assert speech_pieces([SILENCE, NOISE]) == [[], []]


def test_turns_of_two_utterances_one_second_apart():
    one, two = speech("hello_en.wav"), speech("newwords/newwords_0001.wav")
    wave = np.concatenate([noise(0.5, 0.003, 1), one, noise(1.0, 0.003, 2), two, noise(1.0, 0.003, 3)])
    detector, events = TurnDetector(), []
    for i in range(0, wave.shape[0], 1234):  # odd chunk sizes, as a client sends them
        events += detector.feed(wave[i : i + 1234])
    assert [e.kind for e in events] == ["speech_started", "speech_stopped"] * 2
    second = 0.5 * SR + one.shape[0] + SR  # where the second utterance's clip begins
    assert events[0].sample < 0.5 * SR + 0.2 * SR and events[1].sample < second
    assert events[2].sample >= events[1].sample and events[2].sample < second + 0.5 * SR


# -- transcription with vad=True (the tiny random-weight checkpoint) ---------------------------------------------------

NEW = 8  # new tokens per piece: random weights rarely stop


def test_transcribe_with_vad_decodes_only_speech_pieces(asr, rec):
    wave = rec[0]
    quiet = np.concatenate([SILENCE, NOISE])
    r, silent = asr.transcribe([wave, quiet], max_new_tokens=NEW, vad=True, vad_max_seconds=4.0)
    assert silent.text == "" and silent.token_ids == [] and silent.segments == []  # nothing decoded
    assert asr.transcribe(quiet, max_new_tokens=NEW)[0].token_ids  # without VAD the noise is decoded
    pieces = speech_pieces([wave], 4.0)[0]
    alone = asr.transcribe([p.samples for p in pieces], max_new_tokens=NEW)
    assert r.token_ids == [t for a in alone for t in a.token_ids]  # each piece decoded as if alone
    spoken = [(p, a) for p, a in zip(pieces, alone) if a.text.strip()]
    assert [(s.start, s.end, s.text) for s in r.segments] == [
        (round(p.offset, 3), round(p.offset + p.samples.shape[0] / SR, 3), a.text.strip()) for p, a in spoken]
    assert r.duration == pytest.approx(wave.shape[0] / SR)
    with pytest.raises(ValueError, match="vad_max_seconds"):
        asr.transcribe(wave, vad=True, vad_max_seconds=0.5)


def test_fallback_drops_unsure_text_where_vad_hears_no_speech(asr):
    """Whisper's no-speech test in the fallback: the random model's unsure decode of noise alone is dropped (no text,
    no second try), while speech goes through the fallback as it would without the test; with the test off
    (``no_speech_threshold=None``) the noise keeps its text; the CLI names a bad threshold."""
    from qasr_jax.transcribe import Fallback

    voice, quiet = speech("hello_en.wav"), np.concatenate([SILENCE, NOISE])
    plain = asr.transcribe([voice, quiet], max_new_tokens=NEW)
    unsure = max(float(np.mean(r.token_logprobs)) for r in plain) + 0.01  # every decode under it
    assert 1 - speech_probabilities(quiet).max() > 0.6 > 1 - speech_probabilities(voice).max()
    spoken, silent = asr.transcribe([voice, quiet], max_new_tokens=NEW, fallback=Fallback(logprob_threshold=unsure))
    assert silent.text == "" and silent.token_ids == [] and plain[1].token_ids
    kept_voice, kept_noise = asr.transcribe([voice, quiet], max_new_tokens=NEW,
                                            fallback=Fallback(logprob_threshold=unsure, no_speech_threshold=None))
    assert spoken.token_ids == kept_voice.token_ids and spoken.token_ids and kept_noise.token_ids
    bad = _cli("transcribe", "x.wav", "--fallback", "--no-speech-threshold", "2")
    assert bad.returncode != 0 and "--no-speech-threshold must be a probability" in bad.stderr


def _cli(*args):
    import os
    import subprocess
    import sys

    env = {**os.environ, "QASR_JAX_COMPILATION_CACHE": "off"}
    return subprocess.run([sys.executable, "-m", "qasr_jax.cli", *args], capture_output=True, text=True, env=env)


def test_cli_vad_gives_the_api_segments(asr_dir, asr, rec, tmp_path):
    import json

    import soundfile as sf

    path = str(tmp_path / "rec.wav")
    sf.write(path, rec[0], SR, subtype="FLOAT")
    proc = _cli("transcribe", path, "--model", asr_dir, "--vad", "--vad-max-seconds", "4",
                "--max-new-tokens", str(NEW), "--output-format", "json", "--no-fallback")  # random text fails it
    assert proc.returncode == 0, proc.stderr[-3000:]
    api = asr.transcribe(path, max_new_tokens=NEW, vad=True, vad_max_seconds=4.0)[0]
    out = json.loads(proc.stdout)
    out = out[0] if isinstance(out, list) else out
    assert out["segments"] == [{"start": s.start, "end": s.end, "text": s.text} for s in api.segments]
    assert out["token_ids"] == api.token_ids
    bad = _cli("transcribe", path, "--model", asr_dir, "--vad", "--vad-max-seconds", "0.5")
    assert bad.returncode != 0 and "--vad-max-seconds" in bad.stderr


def test_wheel_ships_the_weights_and_license(tmp_path):
    """The built wheel holds the weights and Silero's license (and the example clip of ``io.hub.example_audio``),
    and the installed copy loads them."""
    import os
    import subprocess
    import sys
    import zipfile

    from qasr_jax.testing import ROOT
    from qasr_jax.vad.network import LICENSE_FILE

    import importlib.util

    # Build with this environment's setuptools when it has one (no download); otherwise pip's isolated build.
    isolation = ["--no-build-isolation"] if importlib.util.find_spec("setuptools") else []
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                            "-w", str(tmp_path / "dist"), ROOT], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("qasr_jax-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {f"qasr_jax/data/{WEIGHTS_FILE}", f"qasr_jax/data/{LICENSE_FILE}", "qasr_jax/data/tiny-en/example.ogg"}
    assert shipped <= set(names)
    target = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                              str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    probe = ("import qasr_jax.vad.network as v; print(v.__file__); print(v.data_path(v.LICENSE_FILE)); "
             "print(sorted(v.vad_params()))")
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    module, license_path, keys = run.stdout.splitlines()[-3:]
    assert module.startswith(str(target)) and license_path.startswith(str(target))
    assert "MIT License" in open(license_path).read() and "lstm_in" in keys


# -- the server: the transcription form field and the realtime WebSocket's server_vad --------------------------------

KEY = "vad-test-key"


@pytest.fixture(scope="module")
def server(asr_dir, tmp_path_factory):
    from qasr_jax.testing.serving import Served

    root = tmp_path_factory.mktemp("vad-serve")
    served = Served(asr_dir, "--max-slots", "4", "--max-audio-seconds", "30", "--served-model-name", "qwen3-asr-tiny",
                    key=KEY, cache=str(root / "xla"), log=str(root / "server.log"))
    yield served
    assert served.stop() == 0, served.output()


def test_http_vad_field_gives_the_offline_vad_result(server, asr, rec, tmp_path):
    import io
    import json

    import soundfile as sf

    from qasr_jax.testing.serving import post

    buf = io.BytesIO()
    sf.write(buf, rec[0], SR, format="WAV", subtype="PCM_16")
    path = tmp_path / "rec.wav"
    path.write_bytes(buf.getvalue())
    fields = {"model": "qwen3-asr-tiny", "response_format": "verbose_json", "vad": "true", "max_new_tokens": str(NEW)}
    status, _, body = post(server, "/v1/audio/transcriptions", fields, {"file": ("rec.wav", buf.getvalue())})
    assert status == 200, body
    offline = asr.transcribe(str(path), max_new_tokens=NEW, vad=True)[0]
    got = json.loads(body)
    assert [(s["start"], s["end"], s["text"]) for s in got["segments"]] == [
        (s.start, s.end, s.text) for s in offline.segments]
    assert got["text"] == offline.text and len(offline.segments) >= 1
    buf = io.BytesIO()
    sf.write(buf, np.concatenate([SILENCE, NOISE]), SR, format="WAV", subtype="PCM_16")
    status, _, body = post(server, "/v1/audio/transcriptions", {**fields, "response_format": "json"},
                           {"file": ("quiet.wav", buf.getvalue())})
    assert status == 200 and json.loads(body)["text"] == ""
    status, _, body = post(server, "/v1/audio/transcriptions", {**fields, "vad": "maybe"},
                           {"file": ("quiet.wav", buf.getvalue())})
    assert status == 400 and b"vad" in body


def test_realtime_server_vad_commits_two_turns(server):
    """Two utterances 1 s apart, streamed as a client captures them with turn_detection server_vad: the server
    starts, stops and commits two turns on its own, and each gets its transcript."""
    import asyncio
    import base64
    import json

    import soxr
    import websockets

    one, two = speech("hello_en.wav"), speech("newwords/newwords_0001.wav")
    wave = np.concatenate([noise(0.5, 0.003, 1), one, noise(1.0, 0.003, 2), two, noise(1.0, 0.003, 3)])
    pcm = (np.clip(soxr.resample(wave, SR, 24000, quality="HQ"), -1, 32767 / 32768) * 32768).astype("<i2").tobytes()

    async def run():
        async with websockets.connect(server.url.replace("http", "ws") + "/v1/realtime?intent=transcription",
                                      additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "transcription_session.created"
            await ws.send(json.dumps({"type": "transcription_session.update", "session": {
                "turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                   "silence_duration_ms": 500}}}))
            updated = json.loads(await ws.recv())
            assert updated["session"]["turn_detection"] == {"type": "server_vad", "threshold": 0.5,
                                                            "prefix_padding_ms": 300, "silence_duration_ms": 500}
            step = 24000 * 2 // 10  # 100 ms pieces
            for i in range(0, len(pcm), step):
                await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                          "audio": base64.b64encode(pcm[i : i + step]).decode()}))
            events = []
            while sum(e["type"].endswith(".completed") for e in events) < 2:
                events.append(json.loads(await asyncio.wait_for(ws.recv(), 600)))
            return events

    events = asyncio.run(run())
    turns = [e for e in events if e["type"].startswith("input_audio_buffer.")]
    assert [e["type"] for e in turns] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                                          "input_audio_buffer.committed"] * 2
    items = [turns[2]["item_id"], turns[5]["item_id"]]
    assert items[0] != items[1] and all(turns[k]["item_id"] == items[k // 3] for k in range(6))
    starts, ends = [turns[0]["audio_start_ms"], turns[3]["audio_start_ms"]], [turns[1]["audio_end_ms"],
                                                                              turns[4]["audio_end_ms"]]
    second_ms = (0.5 * SR + one.shape[0] + SR) / SR * 1000
    assert starts[0] < ends[0] <= starts[1] < second_ms + 300 < ends[1]
    done = [e for e in events if e["type"].endswith(".completed")]
    assert [e["item_id"] for e in done] == items and all(e["transcript"] for e in done)


def test_docs_turn_detection_event_is_taken(server):
    """docs/vad.md's ``transcription_session.update`` event, sent as written: the session takes its settings."""
    import asyncio
    import json

    import websockets

    from qasr_jax.testing.docs import page_blocks

    (block,) = page_blocks("docs/vad.md", "json")

    async def run():
        async with websockets.connect(server.url.replace("http", "ws") + "/v1/realtime?intent=transcription",
                                      additional_headers={"Authorization": f"Bearer {KEY}"}) as ws:
            assert json.loads(await ws.recv())["type"] == "transcription_session.created"
            await ws.send(block)
            return json.loads(await ws.recv())

    updated = asyncio.run(run())
    assert updated["type"] == "transcription_session.updated", updated
    assert updated["session"]["turn_detection"] == json.loads(block)["session"]["turn_detection"]
