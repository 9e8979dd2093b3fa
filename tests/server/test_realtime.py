"""The realtime WebSocket as clients meet it: the real ``qasr-jax serve`` (test_server.py's module fixtures, a server
of this module's own) driven by the real ``websockets`` client. Sessions end with ``asr.stream``'s text, deltas only
append, malformed events get error events.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os

import numpy as np
import pytest
import soundfile as sf
import soxr
import websockets

from qasr_jax.io.prompts import MAX_CONTEXT_TOKENS
from qasr_jax.server import realtime
from qasr_jax.testing import DATA, speech
from test_server import KEY, asr, dirs, server  # noqa: F401  (module fixtures: this module starts its own server)

def client_pcm24(wave16: np.ndarray) -> bytes:
    """What a realtime client captures for ``wave16``: 24 kHz little-endian pcm16."""
    up = soxr.resample(wave16, 16000, realtime.INPUT_RATE, quality="HQ")
    return (np.clip(up, -1, 32767 / 32768) * 32768).astype("<i2").tobytes()


async def _append(ws, pcm: bytes, piece_ms: int = 100) -> None:
    """Send ``pcm`` in ``piece_ms`` pieces of ``input_audio_buffer.append``."""
    step = realtime.INPUT_RATE * 2 * piece_ms // 1000
    for i in range(0, len(pcm), step):
        await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                  "audio": base64.b64encode(pcm[i:i + step]).decode()}))


async def _utterance(ws, pcm: bytes, piece_ms: int = 100) -> list[dict]:
    """Stream ``pcm`` in ``piece_ms`` pieces, commit, and return the events up to the item's ``completed``."""
    await _append(ws, pcm, piece_ms)
    await ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
    events = []
    while not events or events[-1]["type"] != "conversation.item.input_audio_transcription.completed":
        events.append(json.loads(await asyncio.wait_for(ws.recv(), 600)))
    return events


async def _session(server, language=None):
    ws = await websockets.connect(server.url.replace("http", "ws") + "/v1/realtime?intent=transcription",
                                  additional_headers={"Authorization": f"Bearer {KEY}"}, max_size=None)
    assert json.loads(await ws.recv())["type"] == "transcription_session.created"
    if language:
        await ws.send(json.dumps({"type": "transcription_session.update", "session": {
            "input_audio_format": "pcm16", "input_audio_transcription": {"model": "qwen3-asr-tiny",
                                                                        "language": language}}}))
        updated = json.loads(await ws.recv())
        assert updated["type"] == "transcription_session.updated"
        assert updated["session"]["input_audio_transcription"]["language"] == "English"
    return ws


def test_realtime_sessions_end_with_the_text_of_asr_stream(server, asr):
    """Two sessions at once, each streaming a file in 100 ms pieces of 24 kHz pcm16: each ends with the text
    asr.stream gives for the same audio (as the server resampled it), after deltas as the text grew."""
    waves = [sf.read(os.path.join(DATA, f), dtype="float32")[0] for f in ("long_en.wav", "zh.wav")]
    pcms = [client_pcm24(w) for w in waves]
    heard = [realtime.Pcm16Resampler().push(p, last=True) for p in pcms]
    expected = []
    for language, audio in zip(("en", None), heard):
        s = asr.stream(language=language)
        s.feed(audio)
        expected.append(s.finish().text)

    async def run():
        sessions = [await _session(server, "en"), await _session(server)]
        try:
            return await asyncio.gather(*(_utterance(ws, p) for ws, p in zip(sessions, pcms)))
        finally:
            for ws in sessions:
                await ws.close()

    for events, want in zip(asyncio.run(run()), expected):
        assert events[0]["type"] == "input_audio_buffer.committed"
        item = events[0]["item_id"]
        assert all(e["item_id"] == item for e in events)
        assert events[-1]["transcript"] == want
        assert any(e["type"].endswith(".delta") for e in events)  # the text as it grew, before the commit's end


def test_realtime_deltas_only_append(server, asr):
    """A 23 s utterance whose streamed text is rewritten along the way (shown on asr.stream, the algorithm the
    server runs, fed the same audio; the server decodes its first 2 s chunk alone, as live audio comes, and the
    text after it is rewritten later): the deltas, concatenated as OpenAI's clients do, are a prefix of the
    completed transcript at every point (in fact they end equal to it), and some came before the last (a
    segment's fixed text), so they are not the whole transcript sent at the end."""
    gap = np.zeros(16000, np.float32)
    wave = np.concatenate([speech("long_en.wav"), gap, speech("long_en.wav"), gap, speech("hello_en.wav")])
    pcm = client_pcm24(wave)
    heard = realtime.Pcm16Resampler().push(pcm, last=True)
    stream = asr.stream(language="en")
    texts = [stream.feed(heard[i:i + 32000]).text for i in range(0, len(heard), 32000)]
    final = stream.finish().text
    assert texts[0] and not any(later.startswith(texts[0]) for later in texts[1:])  # the first chunk's is rewritten
    head = int(2.5 * realtime.INPUT_RATE) * 2  # bytes: 2.5 s, one whole chunk after resampling

    async def run():
        ws = await _session(server, "en")
        try:
            await _utterance(ws, client_pcm24(speech("hello_en.wav")))  # the streams' programs are compiled
            await _append(ws, pcm[:head])
            await asyncio.sleep(3.0)  # the engine decodes the first chunk alone
            return await _utterance(ws, pcm[head:])
        finally:
            await ws.close()

    events = asyncio.run(run())
    assert events[-1]["transcript"] == final
    deltas = [e["delta"] for e in events if e["type"] == "conversation.item.input_audio_transcription.delta"]
    for n in range(1, len(deltas) + 1):
        assert final.startswith("".join(deltas[:n])), (deltas, final)
    assert "".join(deltas) == final and len(deltas) >= 2


def test_malformed_realtime_events_get_error_events(server, asr):
    """Each malformed event gets an OpenAI-shaped error event and the session goes on to transcribe; a wrong
    key or a missing intent is refused with an error event and a close."""
    bad = [
        ("not json at all", "invalid_json"),
        (json.dumps({"type": 5}), "invalid_event"),
        (json.dumps({"type": "response.create"}), "unknown_event"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": "***"}), "invalid_audio"),
        (json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(b"abc").decode()}),
         "invalid_audio"),
        (json.dumps({"type": "input_audio_buffer.commit"}), "input_audio_buffer_commit_empty"),
        (json.dumps({"type": "transcription_session.update",
                     "session": {"input_audio_transcription": {"language": "Klingon"}}}), "unsupported_language"),
        (json.dumps({"type": "transcription_session.update", "session": {"input_audio_format": "g711_ulaw"}}),
         "unsupported_audio_format"),
        (json.dumps({"type": "transcription_session.update", "session": {"input_audio_transcription": {
            "prompt": "word " * (MAX_CONTEXT_TOKENS + 100)}}}), "context_too_long"),
    ]
    wave = sf.read(os.path.join(DATA, "hello_en.wav"), dtype="float32")[0]

    async def run():
        ws = await _session(server)
        codes = []
        for raw, _ in bad:
            await ws.send(raw)
            event = json.loads(await ws.recv())
            assert event["type"] == "error" and set(event["error"]) >= {"type", "code", "message", "param"}
            codes.append(event["error"]["code"])
        events = await _utterance(ws, client_pcm24(wave))
        await ws.close()
        refused = []
        for path, headers in (("/v1/realtime?intent=transcription", {"Authorization": "Bearer wrong"}),
                              ("/v1/realtime", {"Authorization": f"Bearer {KEY}"})):
            async with websockets.connect(server.url.replace("http", "ws") + path,
                                          additional_headers=headers) as ws:
                refused.append(json.loads(await ws.recv())["error"]["code"])
                with pytest.raises(websockets.ConnectionClosed):
                    await ws.recv()
                assert ws.close_code == 1008
        return codes, events, refused

    codes, events, refused = asyncio.run(run())
    assert codes == [code for _, code in bad]
    s = asr.stream()
    s.feed(realtime.Pcm16Resampler().push(client_pcm24(wave), last=True))
    assert events[-1]["transcript"] == s.finish().text
    assert refused == ["invalid_api_key", "unsupported_intent"]
    assert server.healthy()
