"""``POST /v1/audio/transcriptions``: OpenAI's form fields in, a transcript (or a stream of text events) out.

OpenAI's fields: ``file``, ``model`` (any name is answered by the served model unless the server was started with
``--strict-model-name``), ``language`` (ISO code or name), ``prompt`` (the context), ``response_format``
(json, text, srt, vtt, verbose_json), ``temperature`` (0 only), ``stream``, ``include[]=logprobs`` and
``timestamp_granularities[]`` (``word`` needs the server's aligner). Our own: ``beam_size`` and
``max_new_tokens`` (each piece's cap; default: a budget that grows with the audio's duration), ``vad`` (true:
decode only speech, in pieces of at most 30 s, as ``transcribe(vad=True)``). Audio longer than ``--piece-seconds``
decodes as pieces cut at quiet points, as ``Transcriber.transcribe`` with that ``max_audio_seconds``, so memory
stays bounded however long the upload. For srt and vtt: ``max_line_width``, ``max_line_count``,
``max_words_per_line`` and ``max_cue_seconds`` (as ``formats.render``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import shutil
import tempfile

import numpy as np
from starlette.datastructures import UploadFile
from starlette.requests import Request as HTTPRequest
from starlette.responses import Response, StreamingResponse

from qasr_jax.decoding import hotwords as hw
from qasr_jax.decoding import language as lang_probs
from qasr_jax.decoding.longform import split_long_audio
from qasr_jax.decoding.pipeline import token_budget
from qasr_jax.decoding.request import Request, RequestError, prepare
from qasr_jax.io import formats
from qasr_jax.io.audio import SAMPLE_RATE, AudioError, load_audio
from qasr_jax.io.results import join_texts, majority_language
from qasr_jax.server.openai_format import RESPONSE_FORMATS, APIError, logprobs, render, sse, stable_text
from qasr_jax.server.scheduler import Event, Job
from qasr_jax.transcribe import ALIGN_PIECE_SECONDS, Result
from qasr_jax.vad.rules import speech_pieces

VAD_PIECE_SECONDS = 30.0  # with vad=true, as transcribe's default vad_max_seconds
MAX_BEAM = 8
MAX_HOTWORDS = 1000
# verbose_json's language probabilities score every language's header beside the requests decoding: in at most
# this much KV cache (a few languages at a time), so that the server holds its memory bound (--kv-cache-gb).
DETECT_KV_BYTES = 256 << 20

# The form field and error code of each field of a request that decoding.request.prepare refuses.
REQUEST_ERRORS = {"language": ("language", "unsupported_language"), "context": ("prompt", "context_too_long"),
                  "hotwords": ("hotwords", "invalid_value")}
CLIENT_CLOSED = 499  # the status recorded for a request whose client went away (nginx's convention)


@dataclasses.dataclass
class Options:
    """A transcription request's settings, checked."""

    response_format: str = "json"
    stream: bool = False
    logprobs: bool = False
    words: bool = False
    beam_size: int = 1
    max_new_tokens: int | None = None
    hotwords: list[str] = dataclasses.field(default_factory=list)
    hotword_boost: float = hw.DEFAULT_BOOST
    vad: bool = False
    cues: dict = dataclasses.field(default_factory=dict)  # subtitle limits (formats.CueLimits) for srt and vtt
    request: Request = Request()  # language, context and hotwords as decoding takes them (decoding.request)


def _values(form, name: str) -> list[str]:
    """A list field as OpenAI's clients send it (``name[]``, repeated) or as plain repeats of ``name``."""
    return [str(v) for v in form.getlist(f"{name}[]") + form.getlist(name)]


def _int(form, name: str, lo: int, hi: int) -> int | None:
    raw = form.get(name)
    if raw in (None, ""):
        return None
    try:
        value = int(str(raw))
    except ValueError:
        raise APIError(400, f"{name} must be an integer from {lo} to {hi}, got {raw!r}", name, "invalid_value")
    if not lo <= value <= hi:
        raise APIError(400, f"{name} must be from {lo} to {hi}, got {value}", name, "invalid_value")
    return value


def parse_options(form, server) -> Options:
    """Read and check every field but the file; an APIError names the first bad one and what to send instead."""
    model = form.get("model")
    if server.config.strict_model_name and model not in (None, "", server.model_id):
        raise APIError(404, f"model {model!r} is not served here; this server serves {server.model_id!r} "
                            "(GET /v1/models lists it; --strict-model-name is on)", "model", "model_not_found")
    o = Options()
    o.response_format = str(form.get("response_format") or "json")
    if o.response_format not in RESPONSE_FORMATS:
        raise APIError(400, f"response_format {o.response_format!r} is not supported; use one of "
                            f"{', '.join(RESPONSE_FORMATS)}", "response_format", "unsupported_response_format")
    language, context = form.get("language"), str(form.get("prompt") or "")
    raw = form.get("temperature")
    try:
        temperature = float(str(raw)) if raw not in (None, "") else 0.0
    except ValueError:
        raise APIError(400, f"temperature must be a number, got {raw!r}", "temperature", "invalid_value") from None
    if temperature != 0.0:
        raise APIError(400, f"temperature must be 0: this server decodes greedily (or by beam search with "
                            f"beam_size), it does not sample; got {temperature:g}", "temperature", "invalid_value")
    stream = str(form.get("stream") or "false").lower()
    if stream not in ("true", "false", "1", "0"):
        raise APIError(400, f"stream must be true or false, got {stream!r}", "stream", "invalid_value")
    o.stream = stream in ("true", "1")
    if o.stream and o.response_format not in ("json", "text"):
        raise APIError(400, f"stream=true sends text events, which response_format {o.response_format!r} cannot "
                            "carry; use json or text, or stream=false", "stream", "invalid_value")
    for item in _values(form, "include"):
        if item != "logprobs":
            raise APIError(400, f"include[] takes only 'logprobs', got {item!r}", "include", "invalid_value")
        o.logprobs = True
    if o.logprobs and o.response_format != "json":
        raise APIError(400, "include[]=logprobs needs response_format json", "include", "invalid_value")
    for item in _values(form, "timestamp_granularities"):
        if item not in ("word", "segment"):
            raise APIError(400, f"timestamp_granularities[] takes 'word' or 'segment', got {item!r}",
                           "timestamp_granularities", "invalid_value")
        o.words |= item == "word"
    if o.words and o.response_format != "verbose_json":
        raise APIError(400, "timestamp_granularities[]=word needs response_format verbose_json",
                       "timestamp_granularities", "invalid_value")
    if o.words and server.asr.aligner is None:
        raise APIError(400, "word timestamps need a forced aligner: start the server with --aligner "
                            "Qwen/Qwen3-ForcedAligner-0.6B (or a local aligner folder)",
                       "timestamp_granularities", "aligner_unavailable")
    o.beam_size = _int(form, "beam_size", 1, MAX_BEAM) or 1
    o.max_new_tokens = _int(form, "max_new_tokens", 1, server.token_limit)
    o.hotwords = list(dict.fromkeys(w.strip() for v in _values(form, "hotwords") for w in v.split(",") if w.strip()))
    if len(o.hotwords) > MAX_HOTWORDS:
        raise APIError(400, f"{len(o.hotwords)} hotwords is more than {MAX_HOTWORDS}; send the ones that matter",
                       "hotwords", "invalid_value")
    raw = form.get("hotword_boost")
    if raw not in (None, ""):
        try:
            o.hotword_boost = float(str(raw))
        except ValueError:
            o.hotword_boost = float("nan")
        if not (math.isfinite(o.hotword_boost) and o.hotword_boost >= 0):
            raise APIError(400, f"hotword_boost must be a non-negative number, got {raw!r}", "hotword_boost",
                           "invalid_value")
    o.vad = _flag(form, "vad")
    try:
        o.request = prepare(server.asr.tokenizer, server.asr.languages, str(language) if language else None,
                            context, o.hotwords, o.hotword_boost, name="prompt")
    except RequestError as e:
        param, code = REQUEST_ERRORS[e.field]
        raise APIError(400, str(e), param, code) from None
    for name in ("max_line_width", "max_line_count", "max_words_per_line"):
        if (value := _int(form, name, 1, 10_000)) is not None:
            o.cues[name] = value
    raw = form.get("max_cue_seconds")
    if raw not in (None, ""):
        try:
            o.cues["max_cue_seconds"] = float(str(raw))
            formats.CueLimits(max_cue_seconds=o.cues["max_cue_seconds"])
        except ValueError:
            raise APIError(400, f"max_cue_seconds must be a positive number of seconds, got {raw!r}",
                           "max_cue_seconds", "invalid_value") from None
    return o


def _flag(form, name: str) -> bool:
    """A true/false form field (absent: false)."""
    raw = str(form.get(name) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise APIError(400, f"{name} must be true or false, got {raw!r}", name, "invalid_value")
    return raw in ("true", "1")


def read_upload(upload: UploadFile, name: str) -> np.ndarray:
    """The uploaded file as 16 kHz mono samples (any format ``load_audio`` reads); AudioError if it cannot."""
    suffix = os.path.splitext(name)[1][:16]  # ffmpeg's fallback guesses the format from it
    with tempfile.NamedTemporaryFile(suffix=suffix) as f:
        upload.file.seek(0)
        shutil.copyfileobj(upload.file, f)
        f.flush()
        try:
            return load_audio(f.name, name=name)
        except AudioError as e:  # the decoders' messages name the temporary file: name the upload instead
            raise AudioError(str(e).replace(f.name, name)) from None


async def _until_disconnected(request: HTTPRequest) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def transcribe(request: HTTPRequest, server) -> Response:
    """The endpoint: check the request, queue its pieces, answer when they are done (or stream their text)."""
    limit = server.config.max_upload_mb * 2**20
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit + 65536:  # the form's own bytes are few
        raise APIError(413, f"the upload is {int(length) / 2**20:.1f} MB, over this server's limit of "
                            f"{server.config.max_upload_mb:g} MB (--max-upload-mb); send a shorter or compressed "
                            "file", "file", "file_too_large")
    form = await request.form()
    o = parse_options(form, server)
    upload = form.get("file")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "no file: send the audio as a multipart form field named 'file'", "file",
                       "missing_file")
    name = upload.filename or "upload"
    if upload.size is not None and upload.size > limit:
        raise APIError(413, f"{name} is {upload.size / 2**20:.1f} MB, over this server's limit of "
                            f"{server.config.max_upload_mb:g} MB (--max-upload-mb)", "file", "file_too_large")
    try:
        wave = await asyncio.to_thread(read_upload, upload, name)
    except AudioError as e:
        raise APIError(400, str(e), "file", "invalid_audio") from None
    duration = wave.shape[0] / SAMPLE_RATE
    if duration > server.config.max_audio_seconds:
        raise APIError(400, f"{name} is {duration:.1f} s long, over this server's limit of "
                            f"{server.config.max_audio_seconds:g} s (--max-audio-seconds); cut it into shorter "
                            "files", "file", "audio_too_long")
    result = Result(name, duration=duration)
    # Digital silence: nothing was said, as offline (no pieces, an empty transcript).
    piece_seconds = min(server.config.piece_seconds, ALIGN_PIECE_SECONDS) if o.words else server.config.piece_seconds
    pieces = split_long_audio(wave, piece_seconds) if np.any(wave) else []
    if o.vad and pieces:  # only speech, merged into pieces of at most VAD_PIECE_SECONDS (none for silence or noise)
        pieces = (await asyncio.to_thread(speech_pieces, [wave], VAD_PIECE_SECONDS))[0]
    budgets = [o.max_new_tokens or token_budget(p.duration, server.token_limit) for p in pieces]
    loop, events = asyncio.get_running_loop(), asyncio.Queue()
    job = server.admit(o.request, pieces, budgets, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev),
                       o.beam_size, o.stream)
    if o.stream:
        return StreamingResponse(_stream(server, job, events, result, o), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    try:
        collect = asyncio.ensure_future(_collect(server, job, events))
        gone = asyncio.ensure_future(_until_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not collect.done():  # the client went away: free its slots
            collect.cancel()
            server.scheduler.cancel(job)
            return Response(status_code=CLIENT_CLOSED)
        parts = collect.result()
        if parts:
            await asyncio.to_thread(server.asr.finish, result, parts, o.words)
            if o.response_format == "verbose_json" and o.request.language is None:  # language_probability, as peers
                found = await asyncio.to_thread(server.asr.detect_language, pieces[0].samples, o.request.context,
                                                kv_bytes=DETECT_KV_BYTES)
                lang_probs.attach(result, found)
    finally:
        server.release(job)
    return _respond(server, result, parts, o)


async def _collect(server, job: Job, events: asyncio.Queue) -> dict:
    """Wait for every piece of ``job`` -> its decoded parts by piece index."""
    parts = {}
    while len(parts) < len(job.pieces):
        ev: Event = await events.get()
        if ev.kind == "failed":
            raise APIError(500, ev.message, type="server_error", code="engine_error")
        if ev.kind == "piece":
            parts[ev.piece] = server.asr.decoded(job.pieces[ev.piece], ev.output, job.request.language)
    return parts


def _respond(server, result: Result, parts: dict, o: Options) -> Response:
    if result.error is not None:  # word timestamps failed (e.g. a language the aligner does not cover)
        raise APIError(400, result.error, "timestamp_granularities", "alignment_failed")
    server.metrics.audio.inc(result.duration)
    body, media = render(result, [parts[k] for k in sorted(parts)], o.response_format, server.asr.tokenizer,
                         o.logprobs, o.words, o.cues)
    return Response(body, media_type=media)


async def _stream(server, job: Job, events: asyncio.Queue, result: Result, o: Options):
    """Server-sent events as OpenAI sends them: ``transcript.text.delta`` as the text is generated, piece after
    piece (a piece's tokens stream once every piece before it is done), then ``transcript.text.done``. A beam
    search sends its text when it is done (its best beam can still change)."""
    tok, sent, n_tokens, parts, live = server.asr.tokenizer, "", 0, {}, ((), ())
    try:
        while len(parts) < len(job.pieces):
            ev: Event = await events.get()
            if ev.kind == "failed":
                yield sse({"type": "error", "error": APIError(500, ev.message, type="server_error",
                                                              code="engine_error").body()["error"]})
                return
            if ev.kind == "piece":
                if ev.piece == _leading(parts):  # the streamed piece is done: the next one streams
                    live = ((), ())
                parts[ev.piece] = server.asr.decoded(job.pieces[ev.piece], ev.output, job.request.language)
            elif ev.piece == _leading(parts):  # the piece being streamed: its tokens so far
                live = (ev.token_ids, ev.token_logprobs)
            else:
                continue
            done = [parts[k] for k in range(_leading(parts))]
            language = job.request.language or majority_language([p.language for p in done])
            text = join_texts([p.text for p in done] + [stable_text(tok, live[0], job.request.language)], language)
            if len(text) > len(sent) and text.startswith(sent):
                ids = [t for p in done for t in p.token_ids] + list(live[0])
                lps = [x for p in done for x in p.token_logprobs] + list(live[1])
                yield sse(_delta(tok, text[len(sent):], ids[n_tokens:], lps[n_tokens:], o.logprobs))
                sent, n_tokens = text, len(ids)
        if parts:
            await asyncio.to_thread(server.asr.finish, result, parts, False)
        rest = result.text[len(sent):] if result.text.startswith(sent) else ""
        if rest:
            yield sse(_delta(tok, rest, result.token_ids[n_tokens:], result.token_logprobs[n_tokens:], o.logprobs))
        done = {"type": "transcript.text.done", "text": result.text}
        if o.logprobs:
            done["logprobs"] = logprobs(tok, result.token_ids, result.token_logprobs)
        server.metrics.audio.inc(result.duration)
        yield sse(done)
    finally:
        if len(parts) < len(job.pieces):  # the client went away (or the engine failed): free its slots
            server.scheduler.cancel(job)
        server.release(job)


def _leading(parts: dict) -> int:
    """How many pieces from the first are done (the index of the piece being streamed)."""
    k = 0
    while k in parts:
        k += 1
    return k


def _delta(tok, text: str, ids, lps, with_logprobs: bool) -> dict:
    event = {"type": "transcript.text.delta", "delta": text}
    if with_logprobs:
        event["logprobs"] = logprobs(tok, ids, lps)
    return event
