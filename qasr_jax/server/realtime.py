"""``WS /v1/realtime?intent=transcription``: OpenAI's realtime transcription events over the streaming engine.

A client configures the session (``transcription_session.update``: ``input_audio_transcription.language`` and
``.prompt``; audio is ``pcm16``, 24 kHz mono), sends audio as it is captured (``input_audio_buffer.append``,
base64), and ends each utterance with ``input_audio_buffer.commit`` (``input_audio_buffer.clear`` drops it).
Audio is resampled to 16 kHz as it arrives and fed to a ``qasr_jax.streaming.driver`` stream; the engine thread
advances every session's stream in one step. Back come ``conversation.item.input_audio_transcription.delta``
events as the stream commits text no later audio can change (``Partial.fixed_text``: a segment ends at a pause
after ``segment_seconds``), the rest in one delta after the utterance's commit, then ``.completed`` with its final
transcript. Deltas only ever append: their concatenation, as OpenAI's clients build it, is the transcript. Errors
(malformed events, bad settings) come as ``error`` events and the session goes on. ``turn_detection`` is off
unless the client asks for ``{"type": "server_vad", "threshold", "prefix_padding_ms", "silence_duration_ms"}``
(defaults 0.5, 300, 500): then Silero VAD (``qasr_jax.vad.rules.TurnDetector``) finds each utterance, the session
sends ``input_audio_buffer.speech_started`` / ``.speech_stopped`` and commits the turn itself.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import itertools
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import soxr
from starlette.websockets import WebSocket, WebSocketDisconnect

from qasr_jax.decoding.request import Request, RequestError, prepare
from qasr_jax.io.audio import SAMPLE_RATE
from qasr_jax.vad.network import FRAME_SAMPLES

# The error code and session field of each field of a request that decoding.request.prepare refuses.
REALTIME_ERRORS = {"language": ("unsupported_language", "language"), "context": ("context_too_long", "prompt"),
                   "hotwords": ("invalid_value", "hotwords")}
INPUT_RATE = 24000  # OpenAI's realtime pcm16 rate
_counter = itertools.count()


def _id(prefix: str) -> str:
    return f"{prefix}_{next(_counter):012d}"


class Pcm16Resampler:
    """Base64 pcm16 at 24 kHz in pieces -> 16 kHz float32 samples, as if the whole audio were resampled at once."""

    def __init__(self) -> None:
        self._stream = soxr.ResampleStream(INPUT_RATE, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def push(self, pcm16: bytes, last: bool = False) -> np.ndarray:
        """The 16 kHz samples ready after ``pcm16`` (little-endian int16); ``last`` flushes the filter's tail."""
        samples = np.frombuffer(pcm16, "<i2").astype(np.float32) / 32768.0
        return self._stream.resample_chunk(samples, last=last)


@dataclasses.dataclass(eq=False)
class Item:
    """One utterance of a session: a stream on the engine thread. ``deliver`` is called there with
    ``("partial", item, Partial)``, ``("completed", item, Result)`` or ``("failed", item, message)``."""

    request: Request  # the session's language and prompt, prepared (decoding.request)
    deliver: Callable[[tuple[str, Any, Any]], None]
    id: str = dataclasses.field(default_factory=lambda: _id("item"))
    stream: Any = None  # the engine thread's qasr_jax.streaming.driver.Stream


class RealtimeError(Exception):
    """A client event the session refuses: OpenAI's error ``code`` and the event field (``param``) at fault."""

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.message, self.code, self.param = message, code, param


def _error_event(e: RealtimeError, event_id: str | None) -> dict:
    return {"type": "error", "event_id": _id("event"), "error": {
        "type": "invalid_request_error", "code": e.code, "message": e.message, "param": e.param,
        "event_id": event_id}}


class Session:
    """One WebSocket's state: its settings, the utterance being captured, and the events it sends back."""

    def __init__(self, ws: WebSocket, server):
        self.ws, self.server = ws, server
        self.id = _id("sess")
        self.request = Request()  # the session's language and prompt (transcription_session.update)
        self.item: Item | None = None  # the utterance being captured
        self.previous: str | None = None  # the last committed item's id
        self.resampler = Pcm16Resampler()
        self.sent: dict[str, str] = {}  # item id -> the text its deltas carried so far
        self.loop = asyncio.get_running_loop()
        self.engine_events: asyncio.Queue = asyncio.Queue()
        self.turn_detection: dict | None = None  # the server_vad settings, None when the client commits
        self.turns = None  # a qasr_jax.vad.rules.TurnDetector with server_vad
        self.heard = np.zeros(0, np.float32)  # recent 16 kHz audio, for the prefix of the next turn
        self.heard_from = 0  # the stream sample where ``heard`` begins
        self.fed_to = 0  # the stream sample up to which the open turn's item has its audio

    def describe(self) -> dict:
        """The session as OpenAI describes a transcription session."""
        return {"id": self.id, "object": "realtime.transcription_session", "input_audio_format": "pcm16",
                "input_audio_transcription": {"model": self.server.model_id, "language": self.request.language,
                                              "prompt": self.request.context},
                "turn_detection": self.turn_detection, "modalities": ["text"]}

    async def send(self, event: dict) -> None:
        await self.ws.send_text(json.dumps({"event_id": _id("event"), **event}, ensure_ascii=False))

    def _deliver(self, message: tuple) -> None:  # on the engine thread
        self.loop.call_soon_threadsafe(self.engine_events.put_nowait, message)

    # -- client events -----------------------------------------------------------------------------------------------
    async def handle(self, raw: str) -> None:
        """Act on one client event; a RealtimeError becomes an ``error`` event and the session goes on."""
        event_id = None
        try:
            try:
                event = json.loads(raw)
            except json.JSONDecodeError as e:
                raise RealtimeError(f"the event is not JSON ({e}); send one JSON object per message",
                                    "invalid_json") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise RealtimeError("an event must be a JSON object with a string 'type'", "invalid_event", "type")
            event_id = event.get("event_id")
            kind = event["type"]
            if kind == "transcription_session.update":
                await self.update(event.get("session"))
            elif kind == "input_audio_buffer.append":
                await self.append(event.get("audio"))
            elif kind == "input_audio_buffer.commit":
                await self.commit()
            elif kind == "input_audio_buffer.clear":
                self.clear()
                await self.send({"type": "input_audio_buffer.cleared"})
            else:
                raise RealtimeError(f"unknown event type {kind!r}; this server takes transcription_session.update, "
                                    "input_audio_buffer.append, input_audio_buffer.commit and "
                                    "input_audio_buffer.clear", "unknown_event", "type")
        except RealtimeError as e:
            await self.ws.send_text(json.dumps(_error_event(e, event_id)))

    async def update(self, session: Any) -> None:
        if not isinstance(session, dict):
            raise RealtimeError("transcription_session.update needs a 'session' object", "invalid_event", "session")
        fmt = session.get("input_audio_format", "pcm16")
        if fmt != "pcm16":
            raise RealtimeError(f"input_audio_format {fmt!r} is not supported; send pcm16 (24 kHz, mono, "
                                "little-endian)", "unsupported_audio_format", "session.input_audio_format")
        settings = session.get("input_audio_transcription") or {}
        if not isinstance(settings, dict):
            raise RealtimeError("input_audio_transcription must be an object", "invalid_event",
                                "session.input_audio_transcription")
        language = settings.get("language", self.request.language)
        try:
            prompt = str(settings.get("prompt", self.request.context) or "")
            asked = prepare(self.server.asr.tokenizer, self.server.asr.languages,
                            str(language) if language else None, prompt, name="the prompt")
        except RequestError as e:
            code, field = REALTIME_ERRORS[e.field]
            raise RealtimeError(str(e), code, "session.input_audio_transcription." + field) from None
        if "turn_detection" in session:
            self.set_turn_detection(session["turn_detection"])
        self.request = asked
        await self.send({"type": "transcription_session.updated", "session": self.describe()})

    def set_turn_detection(self, settings: Any) -> None:
        """``None`` (the client commits) or OpenAI's server_vad settings (Silero VAD ends each turn)."""
        from qasr_jax.vad.rules import TurnDetector

        if settings is None:
            self.turn_detection, self.turns = None, None
            return
        if not isinstance(settings, dict) or settings.get("type") != "server_vad":
            raise RealtimeError("turn_detection must be null or {'type': 'server_vad', ...}; this server has no "
                                "other kind", "unsupported_turn_detection", "session.turn_detection")
        try:
            values = {"threshold": float(settings.get("threshold", 0.5)),
                      "prefix_padding_ms": int(settings.get("prefix_padding_ms", 300)),
                      "silence_duration_ms": int(settings.get("silence_duration_ms", 500))}
            turns = TurnDetector(**values)
        except (TypeError, ValueError) as e:
            raise RealtimeError(f"turn_detection: {e}", "invalid_value", "session.turn_detection") from None
        self.turn_detection, self.turns = {"type": "server_vad", **values}, turns
        self.heard, self.heard_from, self.fed_to = np.zeros(0, np.float32), 0, 0

    async def append(self, audio: Any) -> None:
        if not isinstance(audio, str):
            raise RealtimeError("input_audio_buffer.append needs 'audio': base64 pcm16", "invalid_event", "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeError("'audio' is not valid base64", "invalid_audio", "audio") from None
        if len(pcm) % 2:
            raise RealtimeError(f"'audio' holds {len(pcm)} bytes, not whole 16-bit samples", "invalid_audio",
                                "audio")
        if self.turns is not None:
            await self.detect(self.resampler.push(pcm))
            return
        if self.item is None:  # the first audio of an utterance opens its stream
            self.open()
        self.server.scheduler.realtime("feed", self.item, self.resampler.push(pcm))

    def open(self) -> None:
        self.item = Item(self.request, self._deliver)
        self.server.scheduler.realtime("open", self.item)

    async def detect(self, samples: np.ndarray) -> None:
        """server_vad: run the detector over new audio; open a turn where speech starts (with its prefix padding),
        feed it, and commit it where the speech stops."""
        self.heard = np.concatenate([self.heard, samples])
        for event in await asyncio.to_thread(self.turns.feed, samples):
            at_ms = int(round(event.sample * 1000 / SAMPLE_RATE))
            if event.kind == "speech_started":
                self.open()
                self.fed_to = max(event.sample, self.heard_from)
                self.feed_heard()
                await self.send({"type": "input_audio_buffer.speech_started", "audio_start_ms": at_ms,
                                 "item_id": self.item.id})
            elif self.item is not None:
                self.feed_heard()
                item, self.item = self.item, None
                await self.send({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": at_ms,
                                 "item_id": item.id})
                await self.committed(item)
        if self.item is not None:
            self.feed_heard()
        keep = self.turns.prefix + 4 * FRAME_SAMPLES  # enough for the next turn's prefix padding
        drop = max(0, self.heard.shape[0] - keep)
        self.heard, self.heard_from = self.heard[drop:], self.heard_from + drop

    def feed_heard(self) -> None:
        """Give the open turn's item the audio heard since ``fed_to``."""
        end = self.heard_from + self.heard.shape[0]
        self.server.scheduler.realtime("feed", self.item, self.heard[self.fed_to - self.heard_from :])
        self.fed_to = end

    async def commit(self) -> None:
        if self.item is None:
            raise RealtimeError("the input audio buffer is empty: append audio before committing",
                                "input_audio_buffer_commit_empty")
        item, self.item = self.item, None
        if self.turns is None:  # with server_vad the audio goes on: the resampler keeps its state
            self.server.scheduler.realtime("feed", item, self.resampler.push(b"", last=True))
            self.resampler = Pcm16Resampler()
        await self.committed(item)

    async def committed(self, item: Item) -> None:
        """Close an utterance: its stream finishes on the engine thread; the client hears that it was committed."""
        self.server.scheduler.realtime("commit", item)
        await self.send({"type": "input_audio_buffer.committed", "previous_item_id": self.previous,
                         "item_id": item.id})
        self.previous = item.id

    def clear(self) -> None:
        """Drop the utterance being captured (its stream's slot is freed)."""
        if self.item is not None:
            self.server.scheduler.realtime("close", self.item)
            self.item = None
        self.resampler = Pcm16Resampler()

    # -- engine events -----------------------------------------------------------------------------------------------
    async def relay(self) -> None:
        """Send the engine's results as OpenAI's item events: a delta when the stream's fixed text (or, once
        committed, its final transcript) extends what was sent, never text that a later chunk may rewrite."""
        while True:
            kind, item, payload = await self.engine_events.get()
            base = {"item_id": item.id, "content_index": 0}
            if kind == "failed":
                await self.send({"type": "conversation.item.input_audio_transcription.failed", **base,
                                 "error": {"type": "server_error", "code": "transcription_failed",
                                           "message": payload}})
                continue
            text = payload.text if kind == "completed" else payload.fixed_text
            sent = self.sent.get(item.id, "")
            if len(text) > len(sent) and text.startswith(sent):
                await self.send({"type": "conversation.item.input_audio_transcription.delta", **base,
                                 "delta": text[len(sent):]})
                self.sent[item.id] = text
            if kind == "completed":
                self.sent.pop(item.id, None)
                self.server.metrics.audio.inc(payload.duration)
                await self.send({"type": "conversation.item.input_audio_transcription.completed", **base,
                                 "transcript": text})


async def session(ws: WebSocket, server) -> None:
    """Run one realtime session until the client goes away (see the module doc)."""
    await ws.accept()
    refusal = None
    if not server.authorized(ws.headers.get("authorization")):
        refusal = RealtimeError("no or a wrong API key: send 'Authorization: Bearer KEY'", "invalid_api_key")
    elif ws.query_params.get("intent") != "transcription":
        refusal = RealtimeError("this server serves transcription sessions only: connect to "
                                "/v1/realtime?intent=transcription", "unsupported_intent", "intent")
    elif not server.config.realtime_slots:
        refusal = RealtimeError("realtime transcription is off on this server (--realtime-slots 0)", "unavailable")
    elif not server.ready.is_set():
        refusal = RealtimeError("the server is warming up; reconnect shortly", "not_ready")
    if refusal is not None:
        await ws.send_text(json.dumps(_error_event(refusal, None)))
        await ws.close(code=1008)
        server.metrics.requests.labels("/v1/realtime", refusal.code).inc()
        return
    me = Session(ws, server)
    server.metrics.sessions.inc()
    relay = asyncio.ensure_future(me.relay())
    try:
        await me.send({"type": "transcription_session.created", "session": me.describe()})
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            if message.get("text") is not None:
                await me.handle(message["text"])
            else:
                await ws.send_text(json.dumps(_error_event(RealtimeError(
                    "binary messages are not events: send JSON text, audio base64 inside input_audio_buffer.append",
                    "invalid_event"), None)))
    except WebSocketDisconnect:
        pass
    finally:
        me.clear()
        relay.cancel()
        server.metrics.sessions.dec()
        server.metrics.requests.labels("/v1/realtime", "closed").inc()
