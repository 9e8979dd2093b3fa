"""OpenAI's shapes: transcription responses in every ``response_format``, streamed events, token log-probabilities
and errors (``{"error": {"message", "type", "param", "code"}}``)."""

from __future__ import annotations

import functools
import itertools
import json

from qasr_jax.io import formats
from qasr_jax.io.results import compression_ratio
from qasr_jax.transcribe import Result

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json")


class APIError(Exception):
    """A request the server refuses: HTTP ``status``, OpenAI's error ``type``, the form field (``param``) at fault
    and a machine-readable ``code``; ``headers`` go on the response (e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body OpenAI sends with an error."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's bytes_to_unicode) back to bytes: 'Ġ' -> 32."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, codes)}


def token_bytes(tok, token_id: int) -> list[int]:
    """The bytes a token stands for (a control token: its name in UTF-8)."""
    piece = tok.id_to_token(token_id) or ""
    if tok.is_added(token_id):
        return list(piece.encode("utf-8"))
    table = _byte_decoder()
    return [table[c] for c in piece if c in table]


def logprobs(tok, token_ids, token_logprobs) -> list[dict]:
    """OpenAI's ``logprobs`` list: each generated token's text, bytes and log-probability."""
    out = []
    for i, lp in zip(token_ids, token_logprobs):
        raw = bytes(token_bytes(tok, i))
        out.append({"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw), "logprob": float(lp)})
    return out


def verbose_json(result: Result, parts: list, words: bool) -> dict:
    """``verbose_json``: language, duration, text, a segment per spoken piece (time span, tokens, mean
    log-probability), and with ``words`` the aligner's words with start and end."""
    spoken = [p for p in parts if p.text.strip()]
    segments = []
    for n, (seg, part) in enumerate(zip(result.segments, spoken)):
        lps = part.token_logprobs
        segments.append({
            "id": n, "seek": int(round(seg.start * 100)), "start": seg.start, "end": seg.end, "text": seg.text,
            "tokens": part.token_ids, "temperature": 0.0,
            "avg_logprob": round(sum(lps) / len(lps), 6) if lps else 0.0,
            "compression_ratio": round(compression_ratio(seg.text), 4),
            "no_speech_prob": 0.0,  # the model has no such head; silence comes back as no segment at all
        })
    body = {"task": "transcribe", "language": (result.language or "").lower(),
            "language_probability": result.language_probability, "duration": round(result.duration, 3),
            "text": result.text, "segments": segments, "usage": {"type": "duration", "seconds": result.duration}}
    if words:
        body["words"] = [{"word": w.text, "start": w.start, "end": w.end} for w in result.words or []]
    return body


def render(result: Result, parts: list, fmt: str, tok, with_logprobs: bool, words: bool,
           cues: dict | None = None) -> tuple[str, str]:
    """A finished transcription as ``(body, media type)`` in ``fmt`` (one of RESPONSE_FORMATS); ``cues``: the
    subtitle limits of ``formats.render`` (srt, vtt)."""
    if fmt == "json":
        body = {"text": result.text, "usage": {"type": "duration", "seconds": result.duration}}
        if with_logprobs:
            body["logprobs"] = logprobs(tok, result.token_ids, result.token_logprobs)
        return json.dumps(body, ensure_ascii=False), "application/json"
    if fmt == "verbose_json":
        return json.dumps(verbose_json(result, parts, words), ensure_ascii=False), "application/json"
    return formats.render(result, "txt" if fmt == "text" else fmt, **(cues or {})), "text/plain; charset=utf-8"


def stable_text(tok, token_ids, language: str | None) -> str:
    """The start of a piece's transcript that tokens still to come cannot change (what a stream may send):
    nothing before the ``language X<asr_text>`` header is complete (unless the language was forced), and a
    character whose bytes have not all arrived or trailing spaces (stripped at the end) are held back."""
    ids = list(itertools.takewhile(lambda i: i not in tok.eos_ids, token_ids))
    if language is None:
        if tok.asr_text_id not in ids:
            return ""  # the header is not complete yet (or there is none: the text is then known at the end)
        ids = ids[ids.index(tok.asr_text_id) + 1:]
    text = tok.decode([i for i in ids if i != tok.asr_text_id])
    return text.rstrip("\ufffd").strip()


def sse(event: dict) -> str:
    """One server-sent event carrying ``event`` as JSON."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
